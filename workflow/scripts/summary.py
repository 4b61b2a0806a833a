"""Rule summary: every run's metrics on every data set in one table."""
from stages import summary
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    summary.run(list(snakemake.input), snakemake.output.table, snakemake.output.json)  # noqa: F821
