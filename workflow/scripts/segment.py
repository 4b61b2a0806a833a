"""Rule segment: Snakemake job -> stages.segment.run on this job's own device (the CPU when the rule's gpu
resource is 0: config cluster.request_gpus false)."""
from stages import segment
from stages.config import from_mapping
from stages.devices import claimed_devices
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(segment.SegmentConfig, snakemake.params.stage["segment"], where="segment")  # noqa: F821
    sam_cfg = from_mapping(segment.SamConfig, snakemake.params.stage["sam"], where="sam")  # noqa: F821
    inputs = snakemake.input  # noqa: F821
    with claimed_devices(int(snakemake.resources.gpu)) as (device,):  # noqa: F821
        segment.run(cfg, sam_cfg, inputs.manifest, inputs.generations, inputs.attention, inputs.phrases,
                    snakemake.output[0], device=device, proposals=inputs.get("proposals"),  # noqa: F821
                    proposals_folder=inputs.get("proposals_folder"))
