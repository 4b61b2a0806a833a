"""Rule evaluate_png: Snakemake job -> stages.evaluate_png.run over all shards."""
from stages import evaluate_png
from stages.config import from_mapping
from stages.datasets import DatasetConfig
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    dataset = from_mapping(DatasetConfig, snakemake.params.dataset, where="datasets")  # noqa: F821
    inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
    evaluate_png.run(dataset, inputs.manifest, list(inputs.masks), outputs.predictions, outputs.metrics)
