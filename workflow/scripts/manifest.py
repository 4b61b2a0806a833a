"""Rule manifest: Snakemake job -> stages.manifest.run."""
from stages import manifest
from stages.config import from_mapping
from stages.datasets import DatasetConfig
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    dataset = from_mapping(DatasetConfig, snakemake.params.dataset, where="datasets")  # noqa: F821
    manifest.run(dataset, snakemake.params.shards, snakemake.output[0])  # noqa: F821
