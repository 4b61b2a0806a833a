"""RES metrics (gIoU, cIoU, Prec@X): 4 x 5 hand-built masks whose intersections and unions are counted by hand."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from stages.evaluate_res import ChosenMask, ResEvaluator, chosen_masks, overlap, res_metrics
from stages.evaluation import write_json

H, W = 4, 5
MASK_COLUMNS = ("sample_id", "image_id", "phrase_index", "mask_index", "text", "category_id", "score", "point_x",
                "point_y", "rle_counts", "height", "width", "area", "error")


def box(y0: int, y1: int, x0: int, x1: int, height: int = H, width: int = W) -> np.ndarray:
    """height x width uint8 mask of rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def first_pixels(count: int) -> np.ndarray:
    """H x W mask of the first ``count`` pixels of the two top rows, row by row (a subset of box(0, 2, 0, W))."""
    mask = np.zeros(H * W, dtype=np.uint8)
    mask[:count] = 1
    return mask.reshape(H, W)


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def mask_row(sample_id: str, mask: np.ndarray, *, phrase_index: int = 0, mask_index: int = 0,
             score: float = 1.0, error: str | None = None) -> dict:
    """A masks-table row as the segment stage writes it (counts as text)."""
    return {"sample_id": sample_id, "image_id": "img", "phrase_index": phrase_index, "mask_index": mask_index,
            "text": "the thing", "category_id": None, "score": score, "point_x": 0.0, "point_y": 0.0,
            "rle_counts": rle(mask)["counts"], "height": mask.shape[0], "width": mask.shape[1],
            "area": int(mask.sum()), "error": error}


def error_row(sample_id: str) -> dict:
    """A phrase-less error row: only the ids and the error are set."""
    return {"sample_id": sample_id, "image_id": "img", "error": "no noun phrase in the answer"}


def table(rows: list[dict]) -> pd.DataFrame:
    """The masks table of ``rows``; with error rows, phrase_index and the sizes become float (NaN), as pandas
    reads nullable integers."""
    return pd.DataFrame(rows, columns=list(MASK_COLUMNS))


def metrics_of(gt: dict[str, np.ndarray], rows: list[dict]) -> tuple[dict, pd.DataFrame]:
    metrics, per_sample = res_metrics({sample_id: rle(mask) for sample_id, mask in gt.items()}, table(rows))
    return metrics["res"], per_sample


def test_perfect_prediction_scores_100_everywhere():
    metrics, per_sample = metrics_of({"a": box(0, 2, 0, W)}, [mask_row("a", box(0, 2, 0, W))])
    assert metrics == {"gIoU": 100.0, "cIoU": 100.0, "P@0.5": 100.0, "P@0.6": 100.0, "P@0.7": 100.0,
                       "P@0.8": 100.0, "P@0.9": 100.0, "num_samples": 1, "num_predicted": 1,
                       "num_empty_ground_truth": 0}
    assert per_sample.to_dict("records") == [{"sample_id": "a", "mask_index": 0, "score": 1.0, "intersection": 10,
                                              "union": 10, "iou": 1.0}]


def test_half_overlap_counts_pixels():
    # GT: the two top rows (10 px); prediction: the second and third rows (10 px). I = 5 (row 1), U = 15.
    metrics, per_sample = metrics_of({"a": box(0, 2, 0, W)}, [mask_row("a", box(1, 3, 0, W))])
    assert per_sample.loc[0, ["intersection", "union"]].tolist() == [5, 15]
    assert metrics["gIoU"] == pytest.approx(100 / 3)
    assert metrics["cIoU"] == pytest.approx(100 / 3)
    assert metrics["P@0.5"] == 0.0


def test_giou_and_ciou_differ_when_sizes_differ():
    # a: GT = prediction = two top rows: I = 10, U = 10, IoU 1.
    # b: GT = pixel (3, 4), prediction = pixel (3, 0): I = 0, U = 2, IoU 0.
    # gIoU = (1 + 0) / 2 = 50; cIoU = (10 + 0) / (10 + 2) = 83.33: the large sample weighs more.
    metrics, _ = metrics_of({"a": box(0, 2, 0, W), "b": box(3, 4, 4, 5)},
                            [mask_row("a", box(0, 2, 0, W)), mask_row("b", box(3, 4, 0, 1))])
    assert metrics["gIoU"] == pytest.approx(50.0)
    assert metrics["cIoU"] == pytest.approx(100 * 10 / 12)


def test_missing_prediction_counts_as_iou_0_with_the_gt_as_union():
    # a: perfect (I = U = 10); b: no mask row, GT 5 px: I = 0, U = 5.
    # gIoU = (1 + 0) / 2 = 50; cIoU = 10 / (10 + 5) = 66.67.
    metrics, per_sample = metrics_of({"a": box(0, 2, 0, W), "b": box(3, 4, 0, W)}, [mask_row("a", box(0, 2, 0, W))])
    assert metrics["gIoU"] == pytest.approx(50.0)
    assert metrics["cIoU"] == pytest.approx(100 * 10 / 15)
    assert (metrics["num_samples"], metrics["num_predicted"]) == (2, 1)
    assert per_sample["mask_index"].isna().tolist() == [False, True]
    assert per_sample["score"].isna().tolist() == [False, True]
    assert per_sample.loc[1, ["intersection", "union", "iou"]].tolist() == [0, 5, 0.0]


def test_error_rows_and_empty_masks_are_no_prediction():
    gt = {"a": box(0, 2, 0, W), "b": box(0, 2, 0, W), "c": box(0, 2, 0, W)}
    rows = [error_row("a"),                                                  # a: a phrase-less error row
            mask_row("b", box(0, 2, 0, W), error="SAM predicted an empty mask"),  # b: an error row with a mask
            mask_row("c", np.zeros((H, W), dtype=np.uint8))]                 # c: an empty mask without error
    metrics, per_sample = metrics_of(gt, rows)
    assert metrics["gIoU"] == 0.0 and metrics["cIoU"] == 0.0
    assert metrics["num_predicted"] == 0
    assert per_sample["union"].tolist() == [10, 10, 10]
    assert per_sample["mask_index"].isna().all()


def test_precision_counts_an_iou_exactly_at_the_threshold():
    # GT = two top rows (10 px); prediction k of its pixels: I = k, U = 10, IoU = k / 10 exactly.
    ious = {"k5": 5, "k6": 6, "k7": 7, "k8": 8, "k9": 9}
    gt = {sample_id: box(0, 2, 0, W) for sample_id in ious}
    metrics, per_sample = metrics_of(gt, [mask_row(s, first_pixels(k)) for s, k in ious.items()])
    assert per_sample["iou"].tolist() == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert [metrics[f"P@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == [100.0, 80.0, 60.0, 40.0, 20.0]
    assert metrics["gIoU"] == pytest.approx(70.0)


def test_precision_misses_an_iou_just_under_the_threshold():
    # Prediction: 5 px of the GT's 10 and 1 px outside: I = 5, U = 11, IoU = 0.4545 < 0.5.
    metrics, _ = metrics_of({"a": box(0, 2, 0, W)}, [mask_row("a", first_pixels(5) | box(3, 4, 0, 1))])
    assert metrics["P@0.5"] == 0.0
    assert metrics["gIoU"] == pytest.approx(100 * 5 / 11)


def test_highest_score_wins_ties_go_to_the_lowest_mask_index():
    gt = {"a": box(0, 2, 0, W)}
    rows = [mask_row("a", box(0, 2, 0, W), mask_index=0, score=0.7),          # perfect, but lower score
            mask_row("a", box(1, 3, 0, W), mask_index=2, score=0.9),          # tie: higher mask index
            mask_row("a", first_pixels(5), mask_index=1, score=0.9),          # chosen: IoU 0.5
            mask_row("a", box(0, 4, 0, W), mask_index=3, score=0.99, error="SAM predicted an empty mask"),
            mask_row("a", np.zeros((H, W), dtype=np.uint8), mask_index=4, score=0.95),
            mask_row("a", box(0, 2, 0, W), phrase_index=1, mask_index=0, score=1.0)]  # another phrase
    metrics, per_sample = metrics_of(gt, rows)
    assert per_sample.loc[0, "mask_index"] == 1 and per_sample.loc[0, "score"] == pytest.approx(0.9)
    assert metrics["gIoU"] == pytest.approx(50.0)


def test_more_than_255_rows():
    # pycocotools 2.0.11's area() of a list of more than 255 RLEs fails under numpy 2; 300 samples,
    # IoU k / 10 for k = 1 ... 10 in turn: gIoU 55.
    gt = {f"s{i}": box(0, 2, 0, W) for i in range(300)}
    metrics, _ = metrics_of(gt, [mask_row(f"s{i}", first_pixels(i % 10 + 1)) for i in range(300)])
    assert metrics["num_predicted"] == 300 and metrics["gIoU"] == pytest.approx(55.0)


def test_rows_of_other_phrases_are_not_predictions():
    metrics, _ = metrics_of({"a": box(0, 2, 0, W)}, [mask_row("a", box(0, 2, 0, W), phrase_index=1)])
    assert metrics["num_predicted"] == 0 and metrics["gIoU"] == 0.0


def test_size_mismatch_names_the_sample():
    with pytest.raises(ValueError, match=r"sample 'b' has size \[5, 4\].*\[4, 5\]"):
        metrics_of({"a": box(0, 2, 0, W), "b": box(0, 2, 0, W)},
                   [mask_row("a", box(0, 2, 0, W)), mask_row("b", box(0, 2, 0, 4, height=5, width=4))])
    with pytest.raises(ValueError, match=r"RES sample 'a' has size \[5, 4\]"):
        ResEvaluator().process("a", rle(box(0, 2, 0, W)), ChosenMask(0, 1.0, rle(box(0, 1, 0, 4, height=5, width=4))))


@pytest.mark.parametrize("rows, message", [
    ([mask_row("z", box(0, 2, 0, W))], r"not evaluated \(e.g. 'z'\)"),
    ([error_row("z")], r"not evaluated \(e.g. 'z'\)"),
    ([mask_row("a", box(0, 2, 0, W)), mask_row("a", box(0, 1, 0, W))], "repeat the same.*shard given twice"),
    ([{**mask_row("a", box(0, 2, 0, W)), "score": None}], r"null 'score' \(e.g. sample 'a'\)"),
])
def test_bad_mask_tables_are_refused(rows, message):
    with pytest.raises(ValueError, match=message):
        metrics_of({"a": box(0, 2, 0, W)}, rows)


def test_a_table_without_sample_id_is_refused():
    with pytest.raises(ValueError, match=r"no column \['sample_id'\]"):
        chosen_masks(table([mask_row("a", box(0, 2, 0, W))]).drop(columns="sample_id"), {"a": (H, W)})


def test_empty_ground_truth_counts_as_iou_0_with_a_warning(caplog):
    # a: empty GT, prediction 10 px: I = 0, U = 10, IoU 0 (not 0/10 by accident: 0 by rule).
    # b: empty GT, no prediction: I = 0, U = 0, IoU 0 (the release: 0/0 = nan).
    # c: perfect, 10 px. gIoU = 1/3; cIoU = 10 / (10 + 0 + 10) = 50.
    empty = np.zeros((H, W), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="stages.evaluate_res"):
        metrics, per_sample = metrics_of({"a": empty, "b": empty, "c": box(0, 2, 0, W)},
                                         [mask_row("a", box(0, 2, 0, W)), mask_row("c", box(0, 2, 0, W))])
    assert per_sample["iou"].tolist() == [0.0, 0.0, 1.0]
    assert per_sample["union"].tolist() == [10, 0, 10]
    assert metrics["gIoU"] == pytest.approx(100 / 3) and metrics["cIoU"] == pytest.approx(50.0)
    assert metrics["num_empty_ground_truth"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "RES sample 'a' has an empty ground-truth mask: counted with IoU 0",
        "RES sample 'b' has an empty ground-truth mask: counted with IoU 0"]


def test_overlap_without_prediction_and_with_bytes_counts():
    gt = mask_utils.encode(np.asfortranarray(box(0, 2, 0, W)))  # counts as bytes, as pycocotools gives them
    assert overlap(gt, None, "x") == (0, 10, 0.0, False)
    assert overlap(gt, rle(box(0, 4, 0, 1)), "x") == (2, 12, 2 / 12, False)


def test_evaluator_refuses_a_sample_twice_and_resets():
    evaluator = ResEvaluator()
    evaluator.process("a", rle(box(0, 2, 0, W)), None)
    with pytest.raises(ValueError, match="'a' is given twice"):
        evaluator.process("a", rle(box(0, 2, 0, W)), None)
    evaluator.reset()
    evaluator.process("a", rle(box(0, 2, 0, W)), ChosenMask(2, 0.8, rle(box(0, 2, 0, W))))
    assert evaluator.evaluate()["res"]["gIoU"] == 100.0


def test_no_sample_gives_null_metrics_and_an_empty_table():
    metrics, per_sample = res_metrics({}, table([]))
    assert metrics == {"res": {"gIoU": None, "cIoU": None, "P@0.5": None, "P@0.6": None, "P@0.7": None,
                               "P@0.8": None, "P@0.9": None, "num_samples": 0, "num_predicted": 0,
                               "num_empty_ground_truth": 0}}
    assert list(per_sample.columns) == ["sample_id", "mask_index", "score", "intersection", "union", "iou"]
    assert len(per_sample) == 0


def test_metrics_and_table_types_survive_json(tmp_path):
    metrics, per_sample = metrics_of({"a": box(0, 2, 0, W), "b": box(3, 4, 0, W)}, [mask_row("a", box(1, 3, 0, W))])
    write_json(metrics, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert pd.api.types.is_string_dtype(per_sample["sample_id"])
    assert per_sample.dtypes.astype(str).tolist()[1:] == ["Int64", "float64", "int64", "int64", "float64"]
