"""Rule segment: Snakemake job -> stages.segment.run on this job's own device."""
from stages import segment
from stages.config import from_mapping
from stages.devices import claimed_device
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(segment.SegmentConfig, snakemake.params.stage["segment"], where="segment")  # noqa: F821
    sam_cfg = from_mapping(segment.SamConfig, snakemake.params.stage["sam"], where="sam")  # noqa: F821
    inputs = snakemake.input  # noqa: F821
    with claimed_device() as device:
        segment.run(cfg, sam_cfg, inputs.manifest, inputs.generations, inputs.attention, inputs.phrases,
                    snakemake.output[0], device=device)  # noqa: F821
