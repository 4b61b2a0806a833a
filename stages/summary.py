"""Summary of a workflow's metrics: every run (main configuration and controls) on every data set.

Input: metrics files at ``{out}/{run}/{dataset}/metrics/{task}.json`` (as the evaluators write
them, ``{task: {metric: value}}``). Output: a Markdown table (one row per run and data set, the
task's headline metrics as columns) and the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.evaluation import write_json
from stages.io.atomic import atomic_path

HEADLINE_METRICS = {
    "instance_seg": ("point_accuracy", "point_chance", "point_accuracy_per_prediction", "AP", "AP50", "AR100", "num_images", "num_images_with_predictions"),
    "gcg": ("METEOR", "CIDEr", "AP50", "mIoU", "recall", "num_images", "num_images_with_predictions"),
    "res": ("gIoU", "cIoU", "P@0.5", "P@0.9", "num_samples", "num_predicted"),
    "png": ("AA", "AA_things", "AA_stuff", "AA_singulars", "AA_plurals", "num_phrases", "num_predicted"),
}


def summary_rows(metrics_paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per metrics file: run, dataset, task and the task's headline metrics."""
    rows = []
    for path in metrics_paths:
        path = Path(path)
        task = path.stem
        run, dataset = path.parts[-4], path.parts[-3]
        metrics = json.loads(path.read_text())[task]
        rows.append({"run": run, "dataset": dataset, "task": task,
                     **{name: metrics.get(name) for name in HEADLINE_METRICS.get(task, sorted(metrics))}})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table per task, runs as rows."""
    parts = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        columns = ["run", "dataset", *HEADLINE_METRICS.get(task, [k for k in task_rows[0] if k not in
                                                                      ("run", "dataset", "task")])]
        parts.append(f"### {task}\n")
        parts.append("| " + " | ".join(columns) + " |")
        parts.append("|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in task_rows]
        parts.append("")
    return "\n".join(parts)


def run(metrics_paths: Sequence[str | os.PathLike], table_path: str | os.PathLike,
        json_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Write the Markdown table and the JSON rows of ``metrics_paths``; return the rows."""
    rows = summary_rows(metrics_paths)
    with atomic_path(table_path) as tmp:
        tmp.write_text(markdown(rows), encoding="utf-8")
    write_json(rows, json_path)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.summary", description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics files {out}/{run}/{dataset}/metrics/{task}.json")
    parser.add_argument("--table", required=True, help="Markdown table to write")
    parser.add_argument("--json", required=True, help="JSON rows to write")
    args = parser.parse_args(argv)
    print(markdown(run(args.metrics, args.table, args.json)))


if __name__ == "__main__":
    main()
