"""Summary over runs: one row per run and data set, the task's headline metrics, null as n/a."""

import json

from stages import summary


def write_metrics(root, run, dataset, task, values):
    path = root / run / dataset / "metrics" / f"{task}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({task: values}))
    return path


def test_rows_and_table(tmp_path):
    paths = [
        write_metrics(tmp_path, "main", "coco", "instance_seg", {"point_accuracy": 0.75, "point_chance": 0.2, "point_accuracy_per_prediction": 0.8,
                                                              "AP": None, "AP50": 0.5}),
        write_metrics(tmp_path, "random_lmm", "coco", "instance_seg", {"point_accuracy": 0.125, "AP": 0.0}),
        write_metrics(tmp_path, "main", "grandf", "gcg", {"mIoU": 0.4, "recall": 0.25, "METEOR": 0.1}),
    ]
    rows = summary.run(paths, tmp_path / "summary.md", tmp_path / "summary.json")
    assert [(r["run"], r["dataset"], r["task"]) for r in rows] == [
        ("main", "coco", "instance_seg"), ("random_lmm", "coco", "instance_seg"), ("main", "grandf", "gcg")]
    assert rows[0]["point_accuracy"] == 0.75 and rows[1]["AP50"] is None
    table = (tmp_path / "summary.md").read_text()
    assert "| main | coco | 0.750 | 0.200 | 0.800 | n/a | 0.500 |" in table
    assert "### gcg" in table and "| main | grandf | 0.100 |" in table
    assert json.loads((tmp_path / "summary.json").read_text())[2]["recall"] == 0.25
