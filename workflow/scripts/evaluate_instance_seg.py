"""Rule evaluate_instance_seg: Snakemake job -> stages.evaluate_coco.run over all shards."""
from stages import evaluate_coco
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
    evaluate_coco.run(inputs.instances, inputs.manifest, list(inputs.masks), list(inputs.phrases),
                      outputs.predictions, outputs.metrics)
