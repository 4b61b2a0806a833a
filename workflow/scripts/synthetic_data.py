"""Rule synthetic_data: Snakemake job -> stages.synthetic.run."""
from pathlib import Path

from stages import synthetic
from stages.config import from_mapping
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(synthetic.SyntheticConfig, snakemake.params.synthetic, where="synthetic")  # noqa: F821
    synthetic.run(cfg, Path(snakemake.output.instances).parent)  # noqa: F821
