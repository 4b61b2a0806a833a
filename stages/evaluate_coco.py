"""COCO instance segmentation evaluation: mask AP/AR with pycocotools and point accuracy.

What is computed is stated in docs/method.md, section 4. Inputs are the data set's COCO instances
file, the run's manifest and the phrases and masks tables of all shards; outputs are the predictions
in COCO results format and ``{"instance_seg": {metric: value}}`` as JSON.

    python -m stages.evaluate_coco --instances instances.json --manifest manifest.parquet \\
        --masks masks/shard-0.parquet masks/shard-1.parquet \\
        --phrases phrases/shard-0.parquet phrases/shard-1.parquet \\
        --predictions predictions.json --metrics metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from schemas.artifacts import METRICS_PROVENANCE_FIELD
from stages import provenance
from stages.datasets import unusable_images
from stages.evaluation import (
    INSTANCES_GT,
    check_mask_size,
    check_rows_belong,
    coco_segm_summary,
    concat_tables,
    good_rows,
    gt_image_ids,
    load_ground_truth,
    read_manifest_image_ids,
    results_coco,
    rle_of,
    write_json,
)
from stages.io.tables import read_provenance, read_tables

log = logging.getLogger(__name__)

MASK_KEY = ("image_id", "phrase_index", "mask_index")
REQUIRED_MASK_COLUMNS = ("phrase_index", "category_id", "score", "rle_counts", "height", "width")


class InstanceSegEvaluator:
    """Mask AP/AR and point accuracy of one data set against its COCO instances ground truth.

    Use it as detectron2's evaluators: ``reset()``, then ``process(phrases, masks)`` for each shard
    (or once with all shards), then ``evaluate()`` -> ``{"instance_seg": {metric: value}}``.

    Definitions:

    - Evaluated images: all of ``image_ids`` (the manifest's images) except those whose ground
      truth cannot be used (:func:`stages.datasets.unusable_images`: an image id the file lists
      more than once, an image with an annotation without segmentation), which are left out, their
      annotations and any prediction alike (``num_images_excluded``; each is logged with its
      reason, and the manifest has an error row for it). An image with no mask row, only error
      rows, or an unreadable image is evaluated as an image with no predictions; its ground truth
      still counts.
    - Predictions (:meth:`predictions`): one per mask row without error, so with ``more_masks``
      the three masks of a phrase are three predictions. COCO results format: ``image_id`` = the
      ground truth's own id (the artifact's text id mapped back), ``category_id`` = the row's
      category (phrases stage), ``segmentation`` = the row's RLE, ``score`` = SAM's predicted IoU.
    - ``AP`` ... ``AR100``: pycocotools COCOeval, iouType ``segm``, ``useCats=1``, all ground-truth
      categories, restricted to the evaluated images; fractions in [0, 1]; None where pycocotools
      reports -1 (no ground truth to measure against).
    - ``point_accuracy``: among the point prompts of the phrases that reached SAM with a category
      (one point per phrase, not per mask: the masks of a phrase share its point; phrases without
      a point, as in mask-prompt mode, are not counted), the share that falls inside the union of
      the ground-truth masks (crowd regions included, as the release does) of the phrase's category
      in that image. A point whose SAM mask came out empty (error row "SAM predicted an empty
      mask") still counts: it is a predicted point, and leaving it out would hide exactly the
      points that missed every object. A point (x, y) (x right, y down) lies in the pixel of
      column floor(x) and row floor(y): the pixel itself for integer (column, row) points and for
      pixel centres (column + 0.5, row + 0.5) alike; a point outside the image is a miss. None
      when there is no point.
    - ``point_chance``: the point accuracy a point drawn uniformly over each image would have for the
      same phrases: the mean over the counted points of the area share (pixels / image pixels) of
      the ground-truth union of the phrase's category in its image, 0 where the image has none of
      that category. What ``point_accuracy`` is to be read against: a model that names categories
      at random and points at random scores about this; large objects make it large.
    - ``point_accuracy_per_prediction``: the same test counted the way the public release's
      ``aas/eval_instance_seg.py`` counts it, the number its papers' tables report: once per
      prediction (per non-empty mask), so with ``more_masks`` a phrase's point counts up to three
      times and the point of an empty mask never counts. With one non-empty mask per phrase the
      two agree. ``num_prediction_points``: the predictions that carry a point.
    - Counts: ``num_images`` (evaluated images), ``num_images_excluded``, ``num_images_with_predictions``,
      ``num_predictions``, ``num_points``, ``num_phrase_error_rows`` and ``num_mask_error_rows``
      (error rows of each table; an upstream error may appear in both).

    Everything is linear in images, annotations and rows (ground truth and predictions are indexed
    by image once).
    """

    def __init__(self, ground_truth: COCO, image_ids: Sequence[str], *, source: str = "the ground truth"):
        self._gt = ground_truth
        self._manifest_ids = list(image_ids)
        self._gt_ids = gt_image_ids(self._manifest_ids, ground_truth, source)
        unusable = unusable_images(ground_truth.dataset["images"], ground_truth.dataset["annotations"])
        self._excluded = {image_id: unusable[image_id] for image_id in self._manifest_ids if image_id in unusable}
        for image_id, reason in self._excluded.items():
            log.warning("image %s is left out of the evaluation: %s", image_id, reason)
        self._image_ids = [image_id for image_id in self._manifest_ids if image_id not in self._excluded]
        self.reset()

    def reset(self) -> None:
        self._masks: list[pd.DataFrame] = []
        self._num_phrase_error_rows = 0
        self._num_mask_error_rows = 0

    def process(self, phrases: pd.DataFrame, masks: pd.DataFrame) -> None:
        """Take the phrases and masks tables of one or more shards (DataFrames as read by
        :func:`stages.io.tables.read_tables`)."""
        self._num_phrase_error_rows += int(phrases["error"].notna().sum())
        self._num_mask_error_rows += int(masks["error"].notna().sum())
        self._masks.append(masks)

    def _good_masks(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The rows without error of the processed masks ``rows`` of the evaluated images, checked."""
        good = good_rows(rows, REQUIRED_MASK_COLUMNS, "masks")
        check_rows_belong(good, self._manifest_ids, MASK_KEY, "masks")
        return good[~good["image_id"].isin(set(self._excluded))]

    def predictions(self) -> list[dict[str, Any]]:
        """The processed masks in COCO results format (see the class docstring), in row order."""
        return self._results(self._good_masks(concat_tables(self._masks, "masks")))

    def _results(self, good: pd.DataFrame) -> list[dict[str, Any]]:
        results = []
        for row in good.itertuples(index=False):
            gt_id = self._gt_ids[row.image_id]
            rle = rle_of(row.rle_counts, row.height, row.width)
            check_mask_size(rle, self._gt, gt_id)
            results.append({"image_id": gt_id, "category_id": int(row.category_id),
                            "segmentation": rle, "score": float(row.score)})
        return results

    def evaluate(self) -> dict[str, dict[str, Any]]:
        rows = concat_tables(self._masks, "masks")
        good = self._good_masks(rows)
        results = self._results(good)
        gt_ids = [self._gt_ids[image_id] for image_id in self._image_ids]
        metrics: dict[str, Any] = coco_segm_summary(self._gt, results_coco(self._gt, results), gt_ids)
        points = self._points(rows)
        hits, chance = self._point_hits(points)
        prediction_points = self._prediction_points(good)
        prediction_hits, _ = self._point_hits(prediction_points)
        metrics.update(
            point_accuracy=hits / len(points) if len(points) else None,
            point_chance=chance / len(points) if len(points) else None,
            num_points=len(points),
            point_accuracy_per_prediction=(prediction_hits / len(prediction_points)
                                           if len(prediction_points) else None),
            num_prediction_points=len(prediction_points),
            num_images=len(self._image_ids),
            num_images_excluded=len(self._excluded),
            num_images_with_predictions=int(good["image_id"].nunique()),
            num_predictions=len(results),
            num_phrase_error_rows=self._num_phrase_error_rows,
            num_mask_error_rows=self._num_mask_error_rows,
        )
        return {"instance_seg": metrics}

    def _points(self, rows: pd.DataFrame) -> pd.DataFrame:
        """One row per phrase of the mask ``rows`` that got a point prompt and a category (rows with
        or without error: an empty SAM mask keeps its point), restricted to the evaluated images."""
        rows = rows[rows["point_x"].notna() & rows["point_y"].notna() & rows["category_id"].notna()
                    & rows["phrase_index"].notna() & rows["image_id"].isin(set(self._image_ids))]
        return rows.drop_duplicates(["image_id", "phrase_index"])

    @staticmethod
    def _prediction_points(good: pd.DataFrame) -> pd.DataFrame:
        """One row per prediction (mask row without error) that carries a point prompt."""
        return good[good["point_x"].notna() & good["point_y"].notna()]

    def _point_hits(self, points: pd.DataFrame) -> tuple[int, float]:
        """How many ``points`` fall inside the ground-truth union of their predicted category, and the
        sum over ``points`` of that union's share of its image's pixels (see ``point_chance``).

        One pass over the points' columns, image after image (a stable sort by image), keeping only
        the current image's decoded unions (pandas' groupby and itertuples cost milliseconds per
        image, which made 2,000 images take a minute on a loaded machine)."""
        hits, chance = 0, 0.0
        points = points.sort_values("image_id", kind="stable")
        current, unions, height, width, gt_id = None, {}, 0, 0, None
        for image_id, x, y, category in zip(points["image_id"], points["point_x"], points["point_y"],
                                            points["category_id"]):
            if image_id != current:
                current, unions = image_id, {}
                gt_id = self._gt_ids[image_id]
                height, width = self._gt.imgs[gt_id]["height"], self._gt.imgs[gt_id]["width"]
            category_id = int(category)
            if category_id not in unions:
                union = self._category_union(gt_id, category_id)
                unions[category_id] = (union, 0.0 if union is None else float(union.mean()))
            union, share = unions[category_id]
            chance += share
            column, line = math.floor(x), math.floor(y)
            hits += bool(union is not None and 0 <= column < width and 0 <= line < height
                         and union[line, column])
        return hits, chance

    def _category_union(self, gt_id: Any, category_id: int):
        """Decoded union (height x width, uint8) of the image's ground-truth masks of the category,
        or None when the image has none."""
        rles = [self._gt.annToRLE(ann) for ann in self._gt.imgToAnns[gt_id]
                if ann["category_id"] == category_id]
        return mask_utils.decode(mask_utils.merge(rles)) if rles else None


def run(instances_path: str | os.PathLike, manifest_path: str | os.PathLike,
        masks_paths: Sequence[str | os.PathLike], phrases_paths: Sequence[str | os.PathLike],
        predictions_path: str | os.PathLike, metrics_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Evaluate the masks of all shards against the COCO instances file (see
    :class:`InstanceSegEvaluator`); write the predictions (COCO results JSON) and the metrics
    (``{"instance_seg": {...}, "provenance": {...}}`` JSON, None for undefined values; the record has no
    config section of its own and carries its inputs' models) atomically; return the metrics."""
    ground_truth = load_ground_truth(instances_path, INSTANCES_GT)
    evaluator = InstanceSegEvaluator(ground_truth, read_manifest_image_ids(manifest_path),
                                     source=f"COCO instances file {instances_path}")
    evaluator.process(read_tables(phrases_paths, "phrases"), read_tables(masks_paths, "masks"))
    metrics = evaluator.evaluate()
    write_json(evaluator.predictions(), predictions_path)
    inputs = [read_provenance(path) for path in (manifest_path, *masks_paths, *phrases_paths)]
    record = provenance.record("evaluate_coco", "metrics", {}, inputs=inputs)
    write_json({**metrics, METRICS_PROVENANCE_FIELD: record}, metrics_path)
    log.info("instance segmentation metrics: %s", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate_coco",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--instances", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--manifest", required=True, help="manifest.parquet of the run")
    parser.add_argument("--masks", required=True, nargs="+", help="masks tables of all shards")
    parser.add_argument("--phrases", required=True, nargs="+", help="phrases tables of all shards")
    parser.add_argument("--predictions", required=True, help="output: predictions in COCO results format")
    parser.add_argument("--metrics", required=True, help="output: metrics JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = run(args.instances, args.manifest, args.masks, args.phrases, args.predictions, args.metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
