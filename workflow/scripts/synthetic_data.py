"""Rule synthetic_data: Snakemake job -> stages.toy.world.run."""
from pathlib import Path

from stages.config import from_mapping
from stages.runner import stage_logging
from stages.toy import world

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(world.SyntheticConfig, snakemake.params.synthetic, where="synthetic")  # noqa: F821
    world.run(cfg, Path(snakemake.output.instances).parent)  # noqa: F821
