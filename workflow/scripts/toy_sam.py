"""Rule toy_sam: the tiny random SAM built from segment_anything's modeling classes."""
from stages.models.sam import build_toy_sam
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    build_toy_sam(snakemake.output[0], seed=snakemake.params.seed)  # noqa: F821
