"""The RES and PNG evaluators' ``run`` (what rules evaluate_res and evaluate_png call): ground truth read
from tiny data sets in the official layouts (the writers of tests/test_refer_png_datasets.py), manifest
and masks tables written as the manifest and segment stages write them (two masks shards), metrics and
predictions checked against values counted by hand.

RES data set (``res_config``, split val): eight samples, three with ground truth on two images:
"100-7" and "100-3" (ann 11: RECT_A and RECT_B of image 581857, 6 x 8 pixels, 12 + 9 = 21 pixels) and
"5-9" (ann 13 of image 2, 4 x 5 pixels: rows 1-2 of columns 0-1, 4 pixels); the other five are error
samples (no usable ground truth). PNG data set (``png_config``): six narratives, four with ground truth
("139-0": phrases 0 (PERSON_A, 6 pixels, a thing) and 2 (SKY, 12 pixels, stuff); "285-0": phrase 0
(GRASS, the whole 3 x 5 image, stuff); "139-1": phrase 0 (PERSON_A and PERSON_B, 8 pixels, plural,
a thing); "139-2": no segment ids, no phrase), two error samples.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from test_refer_png_datasets import IDS_139, PERSON_A, RECT_A, SKY, png_config, res_config

from schemas.artifacts import METRICS_PROVENANCE_FIELD
from stages import evaluate_png, evaluate_res, provenance
from stages.datasets import list_samples
from stages.io.tables import write_table

RES_SAMPLES = ["100-7", "100-3", "5-9", "102-10", "102-11", "103-12", "104-13", "105-14"]
PNG_SAMPLES = ["139-0", "285-0", "139-1", "632-0", "999-0", "139-2"]


def counts(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def polygon_mask(polygon: list[int], height: int, width: int) -> np.ndarray:
    """The pixels pycocotools fills for an integer rectangle polygon (as the ground truth is drawn)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)


def mask_row(sample_id: str, image_id: str, mask: np.ndarray, *, phrase_index: int = 0, mask_index: int = 0,
             score: float = 1.0) -> dict:
    """A masks row as the segment stage writes it with mask_source proposals."""
    return {"sample_id": sample_id, "image_id": image_id, "phrase_index": phrase_index,
            "mask_index": mask_index, "score": score, "rle_counts": counts(mask), "height": mask.shape[0],
            "width": mask.shape[1], "area": int(mask.sum()), "error": None}


def error_row(sample_id: str, image_id: str, error: str, phrase_index: int | None = None) -> dict:
    return {"sample_id": sample_id, "image_id": image_id, "phrase_index": phrase_index, "mask_index": None,
            "score": None, "rle_counts": None, "height": None, "width": None, "area": None, "error": error}


def write_manifest(cfg, path) -> None:
    """The manifest of ``cfg`` as the manifest stage writes it (sizes from the ground truth; an error
    sample keeps its error), with a provenance record."""
    rows = [{"sample_id": entry.sample_id, "image_id": entry.image_id, "file": str(entry.file),
             "width": entry.width, "height": entry.height, "expression": entry.expression,
             "forced_answer": None if entry.forced_answer is None else list(entry.forced_answer),
             "shard": position % 2, "error": entry.error}
            for position, entry in enumerate(list_samples(cfg))]
    write_table(rows, path, "manifest", provenance.record("manifest", "manifest", {"shards": 2}))


def write_masks(shards: list[list[dict]], folder) -> list:
    paths = []
    for shard, rows in enumerate(shards):
        paths.append(folder / f"masks-{shard}.parquet")
        record = provenance.record("segment", "masks", {"segment": {"shard": shard}})
        write_table(rows, paths[-1], "masks", record)
    return paths


def check_provenance(metrics_path, stage: str) -> None:
    record = json.loads(metrics_path.read_text())[METRICS_PROVENANCE_FIELD]
    assert (record["stage"], record["artifact"]) == (stage, "metrics")
    assert {(entry["stage"], entry["artifact"]) for entry in record["upstream"]} == {("manifest", "manifest"),
                                                                                    ("segment", "masks")}


# ------------------------------------------------------------------------------------------------
# RES


def res_masks() -> list[list[dict]]:
    """Shard 0: "100-7" predicts RECT_A (I 12, U 21); "102-10", an error sample, has a mask (ignored).
    Shard 1: "100-3" has the whole image (score 0.3) and, at mask index 1, its ground truth (score 0.9,
    chosen: I = U = 21). "5-9" has no row (I 0, U 4)."""
    ground_truth = polygon_mask(RECT_A, 6, 8) | polygon_mask([5, 3, 8, 3, 8, 6, 5, 6], 6, 8)
    return [[mask_row("100-7", "581857", polygon_mask(RECT_A, 6, 8)),
             mask_row("102-10", "2", np.ones((4, 5), dtype=bool))],
            [mask_row("100-3", "581857", np.ones((6, 8), dtype=bool), score=0.3),
             mask_row("100-3", "581857", ground_truth, mask_index=1, score=0.9)]]


def run_res(tmp_path, shards):
    cfg = res_config(tmp_path)
    write_manifest(cfg, tmp_path / "manifest.parquet")
    masks = write_masks(shards, tmp_path)
    predictions, metrics = tmp_path / "predictions" / "res.json", tmp_path / "metrics" / "res.json"
    predictions.parent.mkdir()
    metrics.parent.mkdir()
    returned = evaluate_res.run(cfg, tmp_path / "manifest.parquet", masks, predictions, metrics)
    return returned, predictions, metrics


def test_res_run_counts_every_sample_with_ground_truth(tmp_path):
    assert [entry.sample_id for entry in list_samples(res_config(tmp_path))] == RES_SAMPLES
    returned, predictions_path, metrics_path = run_res(tmp_path, res_masks())
    written = json.loads(metrics_path.read_text())
    assert {key: value for key, value in written.items() if key != METRICS_PROVENANCE_FIELD} == returned
    metrics = returned["res"]
    ious = [12 / 21, 1.0, 0.0]
    assert metrics["gIoU"] == pytest.approx(100 * sum(ious) / 3)              # 52.38
    assert metrics["cIoU"] == pytest.approx(100 * (12 + 21 + 0) / (21 + 21 + 4))  # 71.74
    assert metrics["P@0.5"] == pytest.approx(200 / 3)
    for threshold in (0.6, 0.7, 0.8, 0.9):
        assert metrics[f"P@{threshold}"] == pytest.approx(100 / 3)
    assert (metrics["num_samples"], metrics["num_predicted"], metrics["num_empty_ground_truth"],
            metrics["num_samples_without_ground_truth"]) == (3, 2, 0, 5)
    check_provenance(metrics_path, "evaluate_res")

    records = json.loads(predictions_path.read_text())
    assert [record["sample_id"] for record in records] == ["100-7", "100-3", "5-9"]     # one per sample
    assert [(record["mask_index"], record["intersection"], record["union"]) for record in records] == [
        (0, 12, 21), (1, 21, 21), (None, 0, 4)]
    assert [record["iou"] for record in records] == pytest.approx(ious)
    assert records[1]["score"] == pytest.approx(0.9) and records[2]["score"] is None


def test_res_run_without_any_mask_row_scores_0(tmp_path):
    shards = [[error_row("100-7", "581857", "the answer has none of the verbs")], []]
    metrics = run_res(tmp_path, shards)[0]["res"]
    assert (metrics["gIoU"], metrics["cIoU"], metrics["P@0.5"]) == (0.0, 0.0, 0.0)
    assert (metrics["num_samples"], metrics["num_predicted"]) == (3, 0)


def test_res_run_refuses_a_mask_row_of_a_sample_outside_the_manifest(tmp_path):
    shards = res_masks()
    shards[1].append(mask_row("100-99", "581857", np.ones((6, 8), dtype=bool)))
    with pytest.raises(ValueError, match=r"1 row\(s\) name samples that are not in the manifest \(e\.g\. "
                                         r"'100-99'\)"):
        run_res(tmp_path, shards)
    assert not (tmp_path / "metrics" / "res.json").exists()
    assert not (tmp_path / "predictions" / "res.json").exists()


# ------------------------------------------------------------------------------------------------
# PNG


def png_masks() -> list[list[dict]]:
    """Shard 0: "139-0" phrase 0 predicts PERSON_A (IoU 1), phrase 2 the bottom row (6 of SKY's 12 pixels:
    IoU 0.5), phrase 1 (no segment ids: no phrase) a mask that is ignored; "139-2" (a narrative without
    segment ids) a mask for its piece 0, ignored too; "632-0", an error sample, an error row. Shard 1:
    "139-1" phrase 0 predicts PERSON_A (6 of 8 pixels: IoU 0.75). "285-0" has no row (IoU 0)."""
    bottom_row = np.zeros((4, 6), dtype=bool)
    bottom_row[3] = True
    return [[mask_row("139-0", "139", IDS_139 == PERSON_A),
             mask_row("139-0", "139", bottom_row, phrase_index=2),
             mask_row("139-0", "139", np.ones((4, 6), dtype=bool), phrase_index=1),
             mask_row("139-2", "139", np.ones((4, 6), dtype=bool)),
             error_row("632-0", "632", "generation failed: image listed in the panoptic file not found")],
            [mask_row("139-1", "139", IDS_139 == PERSON_A)]]


def run_png(tmp_path, shards):
    cfg = png_config(tmp_path)
    write_manifest(cfg, tmp_path / "manifest.parquet")
    masks = write_masks(shards, tmp_path)
    predictions, metrics = tmp_path / "png-predictions.json", tmp_path / "png-metrics.json"
    returned = evaluate_png.run(cfg, tmp_path / "manifest.parquet", masks, predictions, metrics)
    return returned, predictions, metrics


def test_png_run_counts_every_phrase_with_segment_ids(tmp_path):
    assert [entry.sample_id for entry in list_samples(png_config(tmp_path))] == PNG_SAMPLES
    assert (IDS_139 == SKY).sum() == 12 and (IDS_139[3] == SKY).all()
    returned, predictions_path, metrics_path = run_png(tmp_path, png_masks())
    written = json.loads(metrics_path.read_text())
    assert {key: value for key, value in written.items() if key != METRICS_PROVENANCE_FIELD} == returned
    metrics = returned["png"]
    assert metrics["AA"] == pytest.approx(100 * (1 + 0.5 + 0 + 0.75) / 4)       # 56.25
    assert metrics["AA_things"] == pytest.approx(100 * (1 + 0.75) / 2)          # PERSON_A; the plural phrase
    assert metrics["AA_stuff"] == pytest.approx(100 * (0.5 + 0) / 2)            # SKY, GRASS
    assert metrics["AA_singulars"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert metrics["AA_plurals"] == pytest.approx(75.0)
    counts = {"num_phrases": 4, "num_things": 2, "num_stuff": 2, "num_singulars": 3, "num_plurals": 1,
              "num_samples": 3, "num_predicted": 3, "num_empty_ground_truth": 0,
              "num_samples_without_ground_truth": 2}
    assert {key: metrics[key] for key in counts} == counts
    check_provenance(metrics_path, "evaluate_png")

    records = json.loads(predictions_path.read_text())                        # one per phrase
    assert [(r["sample_id"], r["phrase_index"], r["is_thing"], r["plural"]) for r in records] == [
        ("139-0", 0, True, False), ("139-0", 2, False, False), ("285-0", 0, False, False),
        ("139-1", 0, True, True)]
    assert [(r["mask_index"], r["intersection"], r["union"]) for r in records] == [
        (0, 6, 6), (0, 6, 12), (None, 0, 15), (0, 6, 8)]
    assert [r["iou"] for r in records] == pytest.approx([1.0, 0.5, 0.0, 0.75])


def test_png_run_refuses_a_mask_row_of_a_sample_outside_the_manifest(tmp_path):
    shards = png_masks()
    shards[0].append(mask_row("139-7", "139", IDS_139 == PERSON_A))
    with pytest.raises(ValueError, match=r"not in the manifest \(e\.g\. '139-7'\)"):
        run_png(tmp_path, shards)
    assert not (tmp_path / "png-metrics.json").exists()
