"""Rule summary: every run's metrics on every data set in one table (Markdown, JSON, and an HTML page for
the report)."""
from stages import report_pages, summary
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    summary.run(list(snakemake.input), snakemake.output.table, snakemake.output.json)  # noqa: F821
    report_pages.write_page(snakemake.output.table, snakemake.output.html, "Summary")  # noqa: F821
