"""Rule generate: Snakemake job -> stages.generate.run on this job's own devices (as many as the
rule's gpu resource, the run's lmm.gpus)."""
from stages import generate
from stages.config import from_mapping
from stages.devices import claimed_devices
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    params = snakemake.params.stage  # noqa: F821
    generate_cfg = from_mapping(generate.GenerateConfig, params["generate"], where="generate")
    lmm_cfg = from_mapping(generate.LMMConfig, params["lmm"], where="lmm")
    with claimed_devices(int(snakemake.resources.gpu)) as devices:  # noqa: F821
        generate.run(generate_cfg, lmm_cfg, snakemake.input.manifest, int(snakemake.wildcards.shard),  # noqa: F821
                     snakemake.output.generations, snakemake.output.attention, device=devices)  # noqa: F821
