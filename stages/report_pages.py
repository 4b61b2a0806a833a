"""Markdown tables as standalone HTML pages, for ``snakemake --report``.

The report's viewer shows images, HTML and PDF in place and offers any other file (Markdown, JSON) only
as a download, so the summary (``{out}/summary.md``) and the toy diagnostics (``{out}/toy_diagnostics.md``)
also go to the report as HTML pages: the same text rendered with markdown-it (CommonMark plus tables),
with a small inline stylesheet and no external resource, since the report embeds the page as a data URI.

CLI::

    python -m stages.report_pages TABLE.md PAGE.html [--title TITLE]
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Sequence
from pathlib import Path

from markdown_it import MarkdownIt

from stages.io.atomic import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; color: #1e293b; background: #fff; margin: 1.5em; }
h1, h2, h3 { color: #0f172a; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #cbd5e1; padding: 0.3em 0.7em; text-align: right; }
th { background: #e2e8f0; }
td:first-child, th:first-child, td:nth-child(2), th:nth-child(2) { text-align: left; }
tbody tr:nth-child(even) { background: #f1f5f9; }
"""


def html_page(markdown_text: str, title: str) -> str:
    """A whole HTML document holding ``markdown_text`` rendered (CommonMark and pipe tables)."""
    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}</body>\n</html>\n")


def write_page(markdown_path: str | os.PathLike, html_path: str | os.PathLike, title: str) -> None:
    """Write :func:`html_page` of the Markdown file ``markdown_path`` to ``html_path`` (atomic)."""
    page = html_page(Path(markdown_path).read_text(encoding="utf-8"), title)
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report_pages", description=__doc__.split("\n")[0])
    parser.add_argument("markdown", help="Markdown file to render")
    parser.add_argument("html", help="HTML page to write")
    parser.add_argument("--title", default=None, help="page title (default: the Markdown file's name)")
    args = parser.parse_args(argv)
    write_page(args.markdown, args.html, args.title or Path(args.markdown).stem)


if __name__ == "__main__":
    main()
