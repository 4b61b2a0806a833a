"""Rule visualize: Snakemake job -> stages.visualize.run (overlays and attention grids)."""
from stages import visualize
from stages.config import from_mapping
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    inputs = snakemake.input  # noqa: F821
    cfg = from_mapping(visualize.VisualizeConfig, snakemake.params.visualize, where="visualize")  # noqa: F821
    visualize.run(cfg, inputs.manifest, list(inputs.generations), list(inputs.attention), list(inputs.phrases),
                  list(inputs.masks), snakemake.output[0],  # noqa: F821
                  upsample=snakemake.params.upsample)  # noqa: F821
