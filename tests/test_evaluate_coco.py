"""COCO instance segmentation evaluation: hand-built ground truth and predictions with known metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from stages import evaluate_coco
from stages.evaluate_coco import InstanceSegEvaluator
from stages.evaluation import INSTANCES_GT, load_ground_truth
from stages.io.tables import read_tables, write_table

H, W = 10, 12
REPO = Path(__file__).resolve().parents[1]


def box(y0: int, y1: int, x0: int, x1: int, height: int = H, width: int = W) -> np.ndarray:
    """Mask of rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def instances(images: dict[int, list[tuple[int, np.ndarray]]], categories=(1, 2)) -> dict:
    """COCO instances: {image id: [(category_id, mask), ...]}, every image H x W."""
    annotations = []
    for image_id, objects in images.items():
        for category_id, mask in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": rle(mask), "area": int(mask.sum()), "iscrowd": 0,
                                "bbox": mask_utils.toBbox(rle(mask)).tolist()})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in images],
            "annotations": annotations,
            "categories": [{"id": c, "name": f"category {c}"} for c in categories]}


def mask_row(image_id: str, phrase_index: int, mask: np.ndarray, category_id: int, point: tuple[float, float],
             *, score: float = 0.9, mask_index: int = 2) -> dict:
    encoded = rle(mask)
    return {"image_id": image_id, "phrase_index": phrase_index, "mask_index": mask_index, "text": "a thing",
            "category_id": category_id, "score": score, "point_x": point[0], "point_y": point[1],
            "rle_counts": encoded["counts"], "height": mask.shape[0], "width": mask.shape[1],
            "area": int(mask.sum())}


def error_row(image_id: str) -> dict:
    return {"image_id": image_id, "error": "no noun phrase in the answer"}


def write_inputs(folder: Path, gt: dict, image_ids: list[str], masks_by_shard: list[list[dict]],
                 phrases_by_shard: list[list[dict]] | None = None) -> dict:
    """Write the ground truth, the manifest and per-shard phrases/masks tables; return run()'s paths."""
    (folder / "instances.json").write_text(json.dumps(gt))
    write_table([{"image_id": i, "file": f"{i}.jpg", "width": W, "height": H, "shard": 0} for i in image_ids],
                folder / "manifest.parquet", "manifest")
    phrases_by_shard = phrases_by_shard or [[] for _ in masks_by_shard]
    masks_paths, phrases_paths = [], []
    for shard, (masks, phrases) in enumerate(zip(masks_by_shard, phrases_by_shard)):
        masks_paths.append(folder / f"masks-{shard}.parquet")
        phrases_paths.append(folder / f"phrases-{shard}.parquet")
        write_table(masks, masks_paths[-1], "masks")
        write_table(phrases, phrases_paths[-1], "phrases")
    return {"instances_path": folder / "instances.json", "manifest_path": folder / "manifest.parquet",
            "masks_paths": masks_paths, "phrases_paths": phrases_paths,
            "predictions_path": folder / "out" / "predictions.json",
            "metrics_path": folder / "out" / "metrics.json"}


def evaluate_in_memory(folder: Path, gt: dict, image_ids: list[str], masks: list[dict],
                       phrases: tuple[dict, ...] | list[dict] = ()) -> dict:
    """Evaluate through the evaluator class (tables still written and read through stages.io)."""
    paths = write_inputs(folder, gt, image_ids, [masks], [list(phrases)])
    evaluator = InstanceSegEvaluator(load_ground_truth(paths["instances_path"], INSTANCES_GT), image_ids)
    evaluator.process(read_tables(paths["phrases_paths"], "phrases"),
                      read_tables(paths["masks_paths"], "masks"))
    return evaluator.evaluate()["instance_seg"]


def test_perfect_predictions_over_two_shards(tmp_path):
    dog, cat, car = box(1, 5, 1, 5), box(5, 9, 6, 11), box(2, 8, 2, 8)
    gt = instances({7: [(1, dog), (2, cat)], 8: [(1, car)]})
    shards = [[mask_row("7", 0, dog, 1, (2.5, 2.5)), mask_row("7", 1, cat, 2, (8.0, 6.0))],
              [mask_row("8", 0, car, 1, (4.0, 4.0), score=0.5)]]
    paths = write_inputs(tmp_path, gt, ["7", "8"], shards)

    metrics = evaluate_coco.run(**paths)["instance_seg"]

    for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name
    # Every object is small (area < 32^2): medium and large are undefined (-1 in pycocotools).
    assert metrics["APm"] is None and metrics["APl"] is None
    assert metrics["point_accuracy"] == 1.0
    assert (metrics["num_images"], metrics["num_images_with_predictions"], metrics["num_predictions"],
            metrics["num_points"], metrics["num_mask_error_rows"]) == (2, 2, 3, 3, 0)
    written = json.loads(paths["metrics_path"].read_text())
    assert written["instance_seg"]["APm"] is None and written["instance_seg"]["AP"] == pytest.approx(1.0)
    predictions = json.loads(paths["predictions_path"].read_text())
    assert [(p["image_id"], p["category_id"], p["score"]) for p in predictions] == [
        (7, 1, pytest.approx(0.9)), (7, 2, pytest.approx(0.9)), (8, 1, pytest.approx(0.5))]
    assert np.array_equal(mask_utils.decode(predictions[1]["segmentation"]), cat)
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files left behind"


def test_empty_predictions_give_zero_ap_and_no_point_accuracy(tmp_path):
    gt = instances({1: [(1, box(1, 5, 1, 5))], 2: [(2, box(2, 6, 2, 6))]})
    metrics = evaluate_in_memory(tmp_path, gt, ["1", "2"], [])
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    assert metrics["point_accuracy"] is None and metrics["point_chance"] is None
    counts = (metrics["num_images"], metrics["num_images_with_predictions"], metrics["num_predictions"])
    assert counts == (2, 0, 0)


def test_empty_ground_truth_makes_ap_undefined(tmp_path):
    gt = instances({1: []})
    metrics = evaluate_in_memory(tmp_path, gt, ["1"], [mask_row("1", 0, box(1, 5, 1, 5), 1, (2.0, 2.0))])
    assert all(metrics[name] is None for name in ("AP", "AP50", "AR100"))
    assert metrics["point_accuracy"] == 0.0
    assert metrics["point_chance"] == 0.0  # no object of the category: no point could hit
    assert metrics["num_predictions"] == 1


def test_no_images_at_all(tmp_path):
    metrics = evaluate_in_memory(tmp_path, instances({}), [], [])
    assert metrics["AP"] is None and metrics["point_accuracy"] is None and metrics["num_images"] == 0


def test_image_with_only_error_rows_counts_as_image_without_predictions(tmp_path):
    first, second = box(1, 5, 1, 5), box(2, 6, 2, 6)
    gt = instances({1: [(1, first)], 2: [(1, second)]})
    masks = [mask_row("1", 0, first, 1, (2.0, 2.0)), error_row("2")]
    metrics = evaluate_in_memory(tmp_path, gt, ["1", "2"], masks, phrases=[error_row("2")])
    # One of two ground-truth objects found, with precision 1 up to recall 0.5 and 0 beyond:
    # COCO's 101-point interpolated AP is 51/101, recall 0.5.
    assert metrics["AR100"] == pytest.approx(0.5)
    assert metrics["AP"] == pytest.approx(51 / 101)
    counts = (metrics["num_images"], metrics["num_images_with_predictions"],
              metrics["num_phrase_error_rows"], metrics["num_mask_error_rows"])
    assert counts == (2, 1, 1, 1)


def test_point_accuracy_counts_points_per_phrase_against_the_category_union(tmp_path):
    near, far, other = box(2, 6, 2, 6), box(7, 9, 9, 11), box(6, 9, 2, 5)  # far and near: category 1
    gt = instances({1: [(1, near), (1, far), (2, other)]})
    masks = [
        mask_row("1", 0, near, 1, (5, 3)),                      # last column of `near`: inside
        mask_row("1", 1, near, 1, (6, 3)),                      # first column right of it: outside
        mask_row("1", 2, near, 1, (1, 3)),                      # first column left of it: outside
        mask_row("1", 3, near, 1, (5.5, 5.5)),                  # centre of its bottom-right pixel: inside
        mask_row("1", 4, other, 1, (3, 7)),                     # inside `other`, but that is category 2
        *[mask_row("1", 5, far, 1, (9, 7), mask_index=k, score=0.3 + 0.1 * k) for k in range(3)],
        # SAM gave an empty mask: no prediction, but its point was predicted and counts (a hit).
        {**mask_row("1", 6, near, 1, (3, 3)), "error": "SAM predicted an empty mask"},
        {**mask_row("1", 7, far, 1, (0, 0)), "error": "SAM predicted an empty mask"},  # a miss
        # An upstream error (the phrase never reached SAM): no point, not counted.
        {**mask_row("1", 8, near, 1, (3, 3)), "point_x": None, "point_y": None, "error": "no category"},
    ]
    metrics = evaluate_in_memory(tmp_path, gt, ["1"], masks)
    # more_masks: phrase 5 has three masks but one point, inside the second mask of category 1.
    assert metrics["num_predictions"] == 8 and metrics["num_points"] == 8
    assert metrics["point_accuracy"] == pytest.approx(4 / 8)
    # Every counted point names category 1: a uniformly random point hits its union this often.
    assert metrics["point_chance"] == pytest.approx((near | far).mean())
    # The release's count: one point per prediction (phrase 5's point three times, hits; phrases 0
    # and 3 hit; 1, 2 and 4 miss); the empty masks' points and the upstream error are not counted.
    assert metrics["num_prediction_points"] == 8
    assert metrics["point_accuracy_per_prediction"] == pytest.approx(5 / 8)


def test_points_outside_the_image_are_misses(tmp_path):
    gt = instances({1: [(1, box(0, H, 0, W))]})
    whole = box(0, H, 0, W)
    masks = [mask_row("1", 0, whole, 1, (-1, 1)), mask_row("1", 1, whole, 1, (1, H)),
             mask_row("1", 2, whole, 1, (W, 1))]
    assert evaluate_in_memory(tmp_path, gt, ["1"], masks)["point_accuracy"] == 0.0


@pytest.mark.parametrize("breakage, field", [
    (lambda gt: gt.pop("annotations"), "annotations"),
    (lambda gt: gt["annotations"][0].pop("image_id"), "image_id"),
    (lambda gt: gt["annotations"][0].pop("category_id"), "category_id"),
    (lambda gt: gt["images"][0].pop("height"), "height"),
    (lambda gt: gt.pop("categories"), "categories"),
])
def test_missing_ground_truth_field_is_a_clear_error(tmp_path, breakage, field):
    gt = instances({1: [(1, box(1, 5, 1, 5))]})
    breakage(gt)
    paths = write_inputs(tmp_path, gt, ["1"], [[]])
    with pytest.raises(ValueError, match=rf"instances\.json.*'{field}'"):
        evaluate_coco.run(**paths)


@pytest.mark.parametrize("breakage, message", [
    (lambda gt: gt["images"].append("x"), "images[2] must be an object, found str"),
    (lambda gt: gt.update(annotations={}), "field 'annotations' must be a list, found dict"),
    (lambda gt: gt["annotations"][0].pop("id"), "annotations[0] has no field 'id'"),
    (lambda gt: gt["annotations"][1].pop("area"), "annotations[1] has no field 'area'"),
    (lambda gt: gt["annotations"][0].pop("iscrowd"), "annotations[0] has no field 'iscrowd'"),
    (lambda gt: gt["images"][1].pop("width"), "images[1] has no field 'width'"),
    (lambda gt: gt["categories"][0].pop("id"), "categories[0] has no field 'id'"),
    (lambda gt: gt["annotations"][1].update(id=1), "annotations[1] repeats id 1"),
    (lambda gt: gt["categories"][1].update(id=1), "categories[1] repeats id 1"),
    (lambda gt: gt["annotations"][1].update(image_id=7), "annotations[1].image_id 7 is not in images"),
    (lambda gt: gt["annotations"][0].update(category_id=9),
     "annotations[0].category_id 9 is not in categories"),
    (lambda gt: gt["images"][0].update(height=0), "images[0].height must be a positive integer, got 0"),
    (lambda gt: gt["annotations"][1].update(segmentation="x"),
     "annotations[1].segmentation must be a polygon list or an RLE object, found str"),
    (lambda gt: gt["annotations"][0]["segmentation"].pop("size"),
     "annotations[0].segmentation (RLE) has no field 'size'"),
])
def test_malformed_ground_truth_names_file_entry_and_field(tmp_path, breakage, message):
    gt = instances({1: [(1, box(1, 5, 1, 5))], 2: [(2, box(0, 3, 0, 3))]})
    breakage(gt)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError) as info:
        load_ground_truth(path, INSTANCES_GT)
    assert f"COCO instances file {path}: {message}" in str(info.value)


@pytest.mark.parametrize("breakage", [
    lambda gt: gt["images"].append({"id": 2, "file_name": "2b.jpg", "height": H + 1, "width": W}),  # id twice
    lambda gt: gt["annotations"][1].pop("segmentation"),
    lambda gt: gt["annotations"][1].update(segmentation=None),
], ids=["repeated image id", "no segmentation", "null segmentation"])
def test_images_with_unusable_ground_truth_are_left_out(tmp_path, breakage):
    """Image 2's ground truth cannot be used (its id listed twice: its annotations cannot be told
    apart; an annotation without segmentation: no mask to compare with): the image is left out,
    its annotations and predictions alike, and counted in num_images_excluded. Image 1 is evaluated
    as if image 2 were not there."""
    dog, cat = box(1, 5, 1, 5), box(0, 3, 0, 3)
    gt = instances({1: [(1, dog)], 2: [(2, cat)]})
    breakage(gt)
    masks = [mask_row("1", 0, dog, 1, (2.0, 2.0)), mask_row("2", 0, box(5, 9, 5, 9), 2, (6.0, 6.0))]
    paths = write_inputs(tmp_path, gt, ["1", "2"], [masks])
    metrics = evaluate_coco.run(**paths)["instance_seg"]
    assert metrics["num_images"] == 1 and metrics["num_images_excluded"] == 1
    assert metrics["AP"] == pytest.approx(1.0) and metrics["point_accuracy"] == 1.0
    assert (metrics["num_predictions"], metrics["num_points"]) == (1, 1)
    predictions = json.loads(paths["predictions_path"].read_text())
    assert [p["image_id"] for p in predictions] == [1]


@pytest.mark.parametrize("content, message", [
    (None, "ground-truth file not found"),
    ("{", "is not valid JSON"),
    ("[]", "expected a JSON object at the top level, found list"),
])
def test_unparsable_ground_truth_names_the_file(tmp_path, content, message):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_ground_truth(path, INSTANCES_GT)
    assert str(path) in str(info.value)


def test_manifest_image_missing_from_ground_truth_is_an_error(tmp_path):
    paths = write_inputs(tmp_path, instances({1: []}), ["1", "2"], [[]])
    with pytest.raises(ValueError, match=r"not in COCO instances file .*'2'"):
        evaluate_coco.run(**paths)


def test_a_shard_given_twice_is_an_error(tmp_path):
    mask = box(1, 5, 1, 5)
    paths = write_inputs(tmp_path, instances({1: [(1, mask)]}), ["1"], [[mask_row("1", 0, mask, 1, (2.0, 2.0))]])
    paths["masks_paths"] = paths["masks_paths"] * 2
    with pytest.raises(ValueError, match="given twice"):
        evaluate_coco.run(**paths)


def test_mask_of_another_size_than_the_image_is_an_error(tmp_path):
    gt = instances({1: [(1, box(1, 5, 1, 5))]})
    wrong = mask_row("1", 0, box(1, 5, 1, 5, height=W, width=H), 1, (2.0, 2.0))
    with pytest.raises(ValueError, match="size"):
        evaluate_in_memory(tmp_path, gt, ["1"], [wrong])


def test_cli_writes_predictions_and_metrics(tmp_path):
    mask = box(1, 5, 1, 5)
    paths = write_inputs(tmp_path, instances({3: [(1, mask)]}), ["3"],
                         [[mask_row("3", 0, mask, 1, (2.0, 2.0))]])
    command = [sys.executable, "-m", "stages.evaluate_coco", "--instances", str(paths["instances_path"]),
               "--manifest", str(paths["manifest_path"]), "--masks", *map(str, paths["masks_paths"]),
               "--phrases", *map(str, paths["phrases_paths"]),
               "--predictions", str(paths["predictions_path"]), "--metrics", str(paths["metrics_path"])]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert json.loads(paths["metrics_path"].read_text())["instance_seg"]["AP"] == pytest.approx(1.0)
    assert json.loads(paths["predictions_path"].read_text())[0]["image_id"] == 3


def test_two_thousand_images_evaluate_in_seconds(tmp_path):
    n = 2000
    mask = box(1, 5, 1, 5)
    gt = instances({i: [(1, mask)] for i in range(n)})
    masks = [mask_row(str(i), 0, mask, 1, (2.0, 2.0)) for i in range(n)]
    start = time.perf_counter()
    metrics = evaluate_in_memory(tmp_path, gt, [str(i) for i in range(n)], masks)
    elapsed = time.perf_counter() - start
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images_with_predictions"] == n
    assert elapsed < 20, f"{n} images took {elapsed:.1f} s"
