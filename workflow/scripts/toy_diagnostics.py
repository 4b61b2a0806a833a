"""Rule toy_diagnostics: probe, teacher-forced naming and point accuracy of the trained toy LMM and its
untrained twin on the toy world's val split (stages.toy.diagnostics), as JSON, Markdown and an HTML page
for the report."""
import tempfile
from pathlib import Path

from stages import report_pages
from stages.runner import stage_logging
from stages.toy import diagnostics

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    settings = dict(snakemake.params.settings)  # noqa: F821
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in ("trained", "untrained"):
            results[name] = diagnostics.diagnose(
                snakemake.input[name], Path(work) / name, split=settings["split"],  # noqa: F821
                num_images=settings["num_images"], world_seed=settings["world_seed"],
                image_size=tuple(settings["image_size"]), question=settings["question"])
    diagnostics.write_report(results, snakemake.output.json, snakemake.output.markdown,  # noqa: F821
                             settings=settings)
    report_pages.write_page(snakemake.output.markdown, snakemake.output.html,  # noqa: F821
                            "Toy LMM diagnostics")
