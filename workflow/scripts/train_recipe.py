"""Rules train_stage1 / train_stage2: one stage of a training recipe on this job's devices (as many as
the rule's gpu resource, the recipe's gpus), stages.training.launch.run_stage."""
from stages.devices import claimed_devices
from stages.runner import stage_logging
from stages.training.launch import run_stage

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    with claimed_devices(int(snakemake.resources.gpu)) as devices, \
            open(snakemake.log[0], "a", buffering=1) as stream:  # noqa: F821
        run_stage(snakemake.params.recipe, int(snakemake.params.stage), snakemake.params.run_dir,  # noqa: F821
                  snakemake.output[0], projector=snakemake.input.get("projector"),  # noqa: F821
                  name=snakemake.wildcards.trained, devices=devices, log_stream=stream)  # noqa: F821
