"""The report's HTML pages of the Markdown tables (summary, toy diagnostics): real tables, standalone."""

import json

from stages import report_pages, summary


def test_summary_page_holds_one_html_table_per_task(tmp_path):
    paths = []
    for run, dataset, task, values in [("main", "coco", "instance_seg", {"point_accuracy": 0.75, "AP50": 0.5}),
                                       ("random_lmm", "coco", "instance_seg", {"point_accuracy": 0.125}),
                                       ("main", "grandf", "gcg", {"METEOR": 0.1, "mIoU": 0.4})]:
        path = tmp_path / run / dataset / "metrics" / f"{task}.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({task: values}))
        paths.append(path)
    summary.run(paths, tmp_path / "summary.md", tmp_path / "summary.json")
    report_pages.write_page(tmp_path / "summary.md", tmp_path / "summary.html", "Summary <runs>")
    page = (tmp_path / "summary.html").read_text()
    assert page.startswith("<!doctype html>") and "<title>Summary &lt;runs&gt;</title>" in page
    assert page.count("<table>") == 2 and "<h3>instance_seg</h3>" in page and "<h3>gcg</h3>" in page
    assert "<th>point_accuracy</th>" in page and "<th>METEOR</th>" in page
    assert "<td>random_lmm</td>" in page and "<td>0.750</td>" in page and "<td>n/a</td>" in page
    assert "http" not in page and "<script" not in page      # embedded as a data URI: nothing to fetch


def test_paragraphs_and_emphasis_render_and_the_cli_writes_the_page(tmp_path):
    markdown = tmp_path / "diagnostics.md"
    markdown.write_text("# Toy LMM diagnostics\n\nMeasured on **val**.\n\n| model | colour |\n|---|---|\n"
                        "| trained | 0.300 |\n\nProbe chance: 0.500.\n")
    report_pages.main([str(markdown), str(tmp_path / "page.html")])
    page = (tmp_path / "page.html").read_text()
    assert "<title>diagnostics</title>" in page and "<h1>Toy LMM diagnostics</h1>" in page
    assert "<strong>val</strong>" in page and "<td>trained</td>" in page and "<p>Probe chance: 0.500.</p>" in page
