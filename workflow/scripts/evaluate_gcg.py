"""Rule evaluate_gcg: Snakemake job -> stages.evaluate_gcg.run over all shards."""
from stages import evaluate_gcg
from stages.config import from_mapping
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
    cfg = from_mapping(evaluate_gcg.GcgEvalConfig, snakemake.params.gcg, where="evaluate.gcg")  # noqa: F821
    evaluate_gcg.run(cfg, inputs.mask_gt, inputs.caption_gt, inputs.manifest, list(inputs.generations),
                     list(inputs.masks), outputs.mask_predictions, outputs.caption_predictions, outputs.metrics)
