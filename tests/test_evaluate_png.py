"""PNG metrics (average accuracy): the exact area under the recall curve against the release's grid, and
hand-built phrases on 4 x 5 masks split into things, stuff, singulars and plurals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_evaluate_res import H, W, box, error_row, first_pixels, mask_row, rle, table

from stages.evaluate_png import PngEvaluator, PngPhrase, average_accuracy, png_metrics
from stages.evaluate_res import ChosenMask
from stages.evaluation import write_json

EMPTY = np.zeros((H, W), dtype=np.uint8)
# How far the release's grid may be from the exact area: 1e-5 (average_accuracy's docstring), plus rounding.
GRID_TOLERANCE = 1e-5 + 1e-9


def release_average_accuracy(ious) -> float:
    """The release's (F-LMM's) ``average_accuracy``, vectorised: recall(t) = share of IoUs >= t on
    t = np.arange(0, 1, 1e-5), summed as recall(t_k) * (t_{k+1} - t_k) over consecutive thresholds."""
    ious = np.asarray(ious, dtype=np.float64)
    thresholds = np.arange(0, 1, 0.00001)
    accuracy = (ious[None, :] >= thresholds[:, None]).mean(axis=1)
    return float(np.sum(np.abs(np.diff(thresholds)) * accuracy[:-1]))


def phrase(sample_id: str, phrase_index: int, mask: np.ndarray, *, is_thing: bool = True,
           plural: bool = False) -> PngPhrase:
    return PngPhrase(sample_id, phrase_index, rle(mask), is_thing, plural)


@pytest.mark.parametrize("ious", [[0.0], [1.0], [0.5], [0.0, 0.5, 1.0], [0.25, 0.25, 0.75], [0.3, 1e-6, 0.99999]])
def test_exact_average_accuracy_is_the_mean_iou_and_agrees_with_the_grid(ious):
    assert average_accuracy(ious) == pytest.approx(float(np.mean(ious)), abs=1e-15)
    assert abs(average_accuracy(ious) - release_average_accuracy(ious)) <= GRID_TOLERANCE


def test_exact_and_grid_agree_on_random_iou_sets():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 50, 200):
        ious = rng.random(size)
        ious[rng.random(size) < 0.2] = 0.0  # misses, as phrases without prediction give
        assert abs(average_accuracy(ious) - release_average_accuracy(ious)) <= GRID_TOLERANCE


def test_average_accuracy_refuses_no_iou_and_ious_outside_0_1():
    with pytest.raises(ValueError, match="no IoU"):
        average_accuracy([])
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            average_accuracy([0.5, bad])


def narrative() -> tuple[list[PngPhrase], list[dict]]:
    """Four phrases of two narratives and their mask rows, IoUs counted by hand:

    s1/0 thing, singular: GT two top rows (10 px), prediction the same: IoU 1.
    s1/1 stuff, singular: GT rows 2-3 (10 px), prediction row 2 (5 px): I 5, U 10, IoU 0.5.
    s1/3 plural (two segments, a thing): GT columns 0 and 4 (8 px), prediction column 0 and pixel (0, 1)
         (5 px): I 4, U 8 + 5 - 4 = 9, IoU 4/9.
    s2/0 stuff, singular: GT the whole image, no mask row: IoU 0.
    """
    plural = PngPhrase.from_segments("s1", 3, [rle(box(0, H, 0, 1)), rle(box(0, H, 4, 5))], [True, False], True)
    phrases = [phrase("s1", 0, box(0, 2, 0, W)), phrase("s1", 1, box(2, 4, 0, W), is_thing=False), plural,
               phrase("s2", 0, box(0, H, 0, W), is_thing=False)]
    rows = [mask_row("s1", box(0, 2, 0, W), phrase_index=0), mask_row("s1", box(2, 3, 0, W), phrase_index=1),
            mask_row("s1", box(0, H, 0, 1) | box(0, 1, 1, 2), phrase_index=3),
            mask_row("s1", box(0, 2, 0, W), phrase_index=2)]  # a narrative segment without ids: ignored
    return phrases, rows


def test_groups_split_things_stuff_singulars_and_plurals():
    phrases, rows = narrative()
    metrics, per_phrase = png_metrics(phrases, table(rows))
    assert per_phrase["iou"].tolist() == pytest.approx([1.0, 0.5, 4 / 9, 0.0])
    assert per_phrase[["is_thing", "plural"]].values.tolist() == [[True, False], [False, False], [True, True],
                                                                  [False, False]]
    assert metrics["png"] == pytest.approx({
        "AA": 100 * (1 + 0.5 + 4 / 9 + 0) / 4,
        "AA_things": 100 * (1 + 4 / 9) / 2,           # s1/0, s1/3
        "AA_stuff": 100 * (0.5 + 0) / 2,              # s1/1, s2/0
        "AA_singulars": 100 * (1 + 0.5 + 0) / 3,      # s1/0, s1/1, s2/0
        "AA_plurals": 100 * 4 / 9,                    # s1/3
        "num_phrases": 4, "num_things": 2, "num_stuff": 2, "num_singulars": 3, "num_plurals": 1,
        "num_samples": 2, "num_predicted": 3, "num_empty_ground_truth": 0})


def test_a_group_without_phrases_is_null_not_0(tmp_path):
    metrics, _ = png_metrics([phrase("s1", 0, box(0, 2, 0, W)), phrase("s1", 1, box(2, 4, 0, W))],
                             table([mask_row("s1", first_pixels(5), phrase_index=0)]))
    assert metrics["png"]["AA"] == pytest.approx(25.0)  # (0.5 + 0) / 2
    assert metrics["png"]["AA_things"] == pytest.approx(25.0) and metrics["png"]["AA_singulars"] == pytest.approx(25.0)
    assert metrics["png"]["AA_stuff"] is None and metrics["png"]["AA_plurals"] is None
    assert metrics["png"]["num_stuff"] == 0 and metrics["png"]["num_plurals"] == 0
    write_json(metrics, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text())["png"]["AA_stuff"] is None


def test_void_predictions_count_as_iou_0():
    phrases = [phrase("s1", i, box(0, 2, 0, W)) for i in range(4)]
    rows = [error_row("s1"),                                                            # phrase-less error row
            mask_row("s1", box(0, 2, 0, W), phrase_index=0, error="SAM predicted an empty mask"),
            mask_row("s1", EMPTY, phrase_index=1),                                      # empty mask, no error
            mask_row("s1", box(2, 4, 0, W), phrase_index=2),                            # disjoint: I 0, U 20
            mask_row("s1", EMPTY, phrase_index=3, mask_index=0, score=0.99),            # empty best-scored mask:
            mask_row("s1", first_pixels(5), phrase_index=3, mask_index=1, score=0.5)]   # the next one is used
    metrics, per_phrase = png_metrics(phrases, table(rows))
    assert per_phrase["iou"].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert per_phrase["union"].tolist() == [10, 10, 20, 10]
    assert per_phrase["mask_index"].tolist()[2:] == [0, 1] and per_phrase["mask_index"].isna().tolist()[:2] == [True, True]
    assert metrics["png"]["num_predicted"] == 2
    assert metrics["png"]["AA"] == pytest.approx(12.5)


def test_from_segments_merges_and_sets_the_release_groups():
    two = PngPhrase.from_segments("s", 0, [rle(box(0, 1, 0, W)), rle(box(3, 4, 0, W))], [False, False], True)
    assert (two.is_thing, two.plural) == (True, True)  # several segments: a thing, even of stuff categories
    assert two.gt_rle["size"] == [H, W]
    one = PngPhrase.from_segments("s", 1, [rle(box(0, 1, 0, W))], [False], True)
    assert (one.is_thing, one.plural) == (False, True)  # one stuff segment flagged plural: stuff, plural
    # The union's area: rows 0 and 3, 10 px, measured by a perfect prediction.
    _, per_phrase = png_metrics([two], table([mask_row("s", box(0, 1, 0, W) | box(3, 4, 0, W))]))
    assert per_phrase.loc[0, ["intersection", "union"]].tolist() == [10, 10]
    with pytest.raises(ValueError, match="2 segments but is not flagged plural"):
        PngPhrase.from_segments("s", 0, [rle(box(0, 1, 0, W)), rle(box(3, 4, 0, W))], [True, True], False)
    with pytest.raises(ValueError, match="at least one segment"):
        PngPhrase.from_segments("s", 0, [], [], False)
    with pytest.raises(ValueError, match="differ in size"):
        PngPhrase.from_segments("s", 0, [rle(box(0, 1, 0, W)), rle(box(0, 1, 0, 4, height=5, width=4))],
                                [True, True], True)


def test_mask_rows_of_unknown_samples_and_phrases_of_two_sizes_are_refused():
    with pytest.raises(ValueError, match=r"not evaluated \(e.g. 'other'\)"):
        png_metrics([phrase("s1", 0, box(0, 2, 0, W))], table([mask_row("other", box(0, 2, 0, W))]))
    with pytest.raises(ValueError, match=r"sample 's1': its phrases' ground-truth masks differ in size"):
        png_metrics([phrase("s1", 0, box(0, 2, 0, W)), phrase("s1", 1, box(0, 2, 0, 4, height=5, width=4))],
                    table([]))
    with pytest.raises(ValueError, match=r"sample 's1' has size \[5, 4\]"):
        png_metrics([phrase("s1", 0, box(0, 2, 0, W))],
                    table([mask_row("s1", box(0, 2, 0, 4, height=5, width=4))]))


def test_empty_ground_truth_counts_as_iou_0_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="stages.evaluate_res"):
        metrics, per_phrase = png_metrics([phrase("s1", 0, EMPTY)], table([mask_row("s1", box(0, 2, 0, W))]))
    assert per_phrase["iou"].tolist() == [0.0]
    assert metrics["png"]["num_empty_ground_truth"] == 1 and metrics["png"]["AA"] == 0.0
    assert "PNG phrase 0 of sample 's1' has an empty ground-truth mask" in caplog.text


def test_evaluator_refuses_a_phrase_twice_and_no_phrase_gives_null_metrics():
    evaluator = PngEvaluator()
    evaluator.process(phrase("s1", 0, box(0, 2, 0, W)), ChosenMask(0, 1.0, rle(box(0, 2, 0, W))))
    with pytest.raises(ValueError, match="phrase 0 of sample 's1' is given twice"):
        evaluator.process(phrase("s1", 0, box(0, 2, 0, W)), None)
    evaluator.reset()
    metrics = evaluator.evaluate()["png"]
    assert [metrics[k] for k in ("AA", "AA_things", "AA_stuff", "AA_singulars", "AA_plurals")] == [None] * 5
    assert metrics["num_phrases"] == 0 and metrics["num_samples"] == 0
    assert list(evaluator.per_phrase().columns) == ["sample_id", "phrase_index", "is_thing", "plural", "mask_index",
                                                    "score", "intersection", "union", "iou"]
