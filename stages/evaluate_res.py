"""Referring expression segmentation (RES) metrics: gIoU, cIoU and Prec@X of one mask per sentence.

The protocol is the release's ``aas/res.py`` (RefCOCO, RefCOCO+, RefCOCOg): a sample is one referring
sentence with one ground-truth mask; the pipeline predicts at most one mask for it, and every sample
counts, with or without a prediction. This module is the metric core: ground truth and masks come in as
Python objects and a pandas DataFrame (the masks table of all shards, keyed on ``sample_id``), metrics go
out as ``{"res": {metric: value}}`` (ready for :func:`stages.evaluation.write_json`) plus a per-sample
table.

Conventions:

- Masks are COCO compressed RLE dicts ``{"size": [height, width], "counts": str | bytes}``; the masks
  table holds them as ``rle_counts`` (text), ``height`` and ``width`` (:func:`stages.evaluation.rle_of`).
  Intersections and unions are pixel counts computed by pycocotools on the RLEs (no mask is decoded).
- Which mask row is a sample's prediction (:func:`chosen_masks`, shared with :mod:`stages.evaluate_png`):
  among its rows whose ``error`` is null and whose mask is not empty, the one with the highest
  ``score``; ties go to the lowest ``mask_index``. With ``segment.more_masks`` that is the mask SAM
  rates best, whatever its multimask index; with one row per phrase (the release, the default) it is
  that row. An empty mask is no prediction (the segment stage already writes it as an error row).
- RES reads the rows of ``phrase_index`` :data:`RES_PHRASE_INDEX` (the first phrase of the answer);
  rows of other phrases are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from schemas.artifacts import METRICS_PROVENANCE_FIELD
from stages.evaluation import check_unique, rle_of, write_json
from stages.io.tables import read_provenance, read_table, read_tables

if TYPE_CHECKING:
    from stages.datasets import DatasetConfig

log = logging.getLogger(__name__)

# The phrase whose mask is a RES sample's prediction.
RES_PHRASE_INDEX = 0
# Prec@X thresholds: a sample is a hit at X when its IoU >= X.
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MASK_KEY = ("sample_id", "phrase_index", "mask_index")
# Columns every masks table must have, and those that must not be null on a row without error.
MASK_COLUMNS = ("sample_id", "phrase_index", "mask_index", "score", "rle_counts", "height", "width", "error")
REQUIRED_MASK_COLUMNS = ("phrase_index", "mask_index", "score", "rle_counts", "height", "width")
PER_SAMPLE_COLUMNS = ("sample_id", "mask_index", "score", "intersection", "union", "iou")


class ChosenMask(NamedTuple):
    """The mask row used as the prediction of one phrase: its ``mask_index``, ``score`` and RLE."""

    mask_index: int
    score: float
    rle: dict[str, Any]


def chosen_masks(masks: pd.DataFrame, sizes: Mapping[str, tuple[int, int]]) -> dict[tuple[str, int], ChosenMask]:
    """The prediction of every (sample_id, phrase_index) that has one, from a masks table.

    ``masks``: the masks table of all shards (``sample_id`` str, ``phrase_index`` / ``mask_index`` int,
    ``score`` float, ``rle_counts`` str, ``height`` / ``width`` int, ``error`` str or null; other columns
    are ignored). ``sizes``: {sample_id: (height, width)} of every evaluated sample's image.

    A prediction is a row whose ``error`` is null and whose mask is not empty; among several for one
    phrase (SAM's three masks with ``more_masks``), the highest ``score`` wins, ties going to the lowest
    ``mask_index``. Raises ``ValueError`` for a missing column, a row (error rows too) naming a sample
    outside ``sizes``, and, among rows without error, a null in :data:`REQUIRED_MASK_COLUMNS`, two rows
    with one (sample_id, phrase_index, mask_index) (a shard given twice?) or a mask whose
    (height, width) is not its sample's; each message names a sample.
    """
    missing = [column for column in MASK_COLUMNS if column not in masks.columns]
    if missing:
        raise ValueError(f"masks table: no column {missing} (columns: {list(masks.columns)})")
    outside = ~masks["sample_id"].isin(set(sizes))
    if outside.any():
        raise ValueError(f"masks table: {int(outside.sum())} row(s) name samples that are not evaluated "
                         f"(e.g. {masks.loc[outside, 'sample_id'].iloc[0]!r})")
    good = masks[masks["error"].isna()]
    for column in REQUIRED_MASK_COLUMNS:
        null = good[column].isna()
        if null.any():
            raise ValueError(f"masks table: {int(null.sum())} row(s) without error have a null {column!r} "
                             f"(e.g. sample {good.loc[null, 'sample_id'].iloc[0]!r})")
    check_unique(good, MASK_KEY, "masks")
    rows = pd.DataFrame({
        "sample_id": good["sample_id"].astype(str),
        "phrase_index": good["phrase_index"].astype(np.int64),
        "mask_index": good["mask_index"].astype(np.int64),
        "score": good["score"].astype(np.float64),
        "rle": [rle_of(counts, height, width)
                for counts, height, width in zip(good["rle_counts"], good["height"], good["width"])],
    })
    for sample_id, rle in zip(rows["sample_id"], rows["rle"]):
        if tuple(rle["size"]) != tuple(sizes[sample_id]):
            raise ValueError(f"predicted mask of sample {sample_id!r} has size {list(rle['size'])}, "
                             f"its ground truth is {list(sizes[sample_id])} (height, width)")
    # One RLE per call: pycocotools 2.0.11's area() of a list of more than 255 RLEs raises OverflowError
    # under numpy 2 (it first builds a throwaway uint8 array holding the count).
    rows = rows[np.array([int(mask_utils.area(rle)) > 0 for rle in rows["rle"]], dtype=bool)]
    rows = rows.sort_values(["sample_id", "phrase_index", "score", "mask_index"],
                            ascending=[True, True, False, True], kind="stable")
    rows = rows.drop_duplicates(["sample_id", "phrase_index"])
    return {(sample_id, phrase_index): ChosenMask(mask_index, score, rle)
            for sample_id, phrase_index, mask_index, score, rle
            in zip(rows["sample_id"], rows["phrase_index"], rows["mask_index"], rows["score"], rows["rle"])}


class Overlap(NamedTuple):
    """How a predicted mask covers a ground-truth mask: pixel counts and their IoU in [0, 1]."""

    intersection: int
    union: int
    iou: float
    empty_ground_truth: bool


def overlap(gt_rle: Mapping[str, Any], pred_rle: Mapping[str, Any] | None, name: str) -> Overlap:
    """Intersection, union and IoU of a ground-truth RLE and a predicted one (None: no prediction).

    No prediction: intersection 0, union = area of the ground truth, IoU 0. An empty ground truth (a
    degenerate polygon; the release would divide 0 by 0, or 0 by the predicted area) gives IoU 0 whatever
    is predicted, intersection 0 and union = the predicted area, with a warning naming ``name`` (e.g.
    "sample 'x'"): the item keeps its place in the metrics, since dropping it would change what their
    denominators count. Raises ``ValueError`` naming ``name`` when the two RLEs' sizes differ
    (pycocotools would silently give an empty intersection).
    """
    gt_area = int(mask_utils.area(gt_rle))
    if pred_rle is None:
        intersection, union = 0, gt_area
    else:
        if list(pred_rle["size"]) != list(gt_rle["size"]):
            raise ValueError(f"predicted mask of {name} has size {list(pred_rle['size'])}, "
                             f"its ground truth is {list(gt_rle['size'])} (height, width)")
        intersection = int(mask_utils.area(mask_utils.merge([gt_rle, pred_rle], intersect=True)))
        union = gt_area + int(mask_utils.area(pred_rle)) - intersection
    if gt_area == 0:
        log.warning("%s has an empty ground-truth mask: counted with IoU 0", name)
        return Overlap(intersection, union, 0.0, True)
    return Overlap(intersection, union, intersection / union, False)


def usable(prediction: ChosenMask | None) -> ChosenMask | None:
    """``prediction``, or None when it is None or its mask is empty (an empty mask is no prediction)."""
    if prediction is None or int(mask_utils.area(prediction.rle)) == 0:
        return None
    return prediction


class ResEvaluator:
    """gIoU, cIoU and Prec@X over RES samples, one (ground truth, prediction) pair at a time.

    Use it as detectron2's evaluators: ``reset()``, ``process(sample_id, gt_rle, prediction)`` for every
    sample, then ``evaluate()`` -> ``{"res": {metric: value}}`` and :meth:`per_sample`.

    Definitions (I, U: pixel counts of one sample's intersection and union):

    - A sample without prediction (no mask row, only error rows, an empty mask: ``prediction`` None)
      has I = 0, U = |GT| and IoU 0.
    - A sample whose ground truth is empty (a degenerate polygon) has IoU 0 whatever is predicted (the
      release's I / U would be 0 / 0 or 0 / |pred|), I = 0 and U = |pred|; it is counted, with a
      warning, and reported as ``num_empty_ground_truth``.
    - ``gIoU``: mean over samples of IoU. ``cIoU``: sum of I over sum of U (the release's mean I / mean
      U, the same). ``P@0.5`` ... ``P@0.9``: share of samples with IoU >= the threshold (RES papers'
      Prec@X; an IoU exactly at the threshold is a hit). All x100, as the literature reports them;
      None when there is no sample (cIoU also when the total union is 0).
    - ``num_samples``; ``num_predicted``: samples with a prediction.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._rows: list[tuple[str, int | None, float, int, int, float]] = []
        self._seen: set[str] = set()
        self._num_empty_ground_truth = 0

    def process(self, sample_id: str, gt_rle: Mapping[str, Any], prediction: ChosenMask | None) -> None:
        """Add one sample: its ground-truth RLE and its prediction (:func:`chosen_masks`; None when it has
        none; an empty mask counts as none). Raises ``ValueError`` for a sample given twice or a
        prediction of another size."""
        if sample_id in self._seen:
            raise ValueError(f"RES sample {sample_id!r} is given twice")
        self._seen.add(sample_id)
        prediction = usable(prediction)
        pair = overlap(gt_rle, None if prediction is None else prediction.rle, f"RES sample {sample_id!r}")
        self._num_empty_ground_truth += pair.empty_ground_truth
        self._rows.append((sample_id, None if prediction is None else prediction.mask_index,
                           np.nan if prediction is None else prediction.score,
                           pair.intersection, pair.union, pair.iou))

    def per_sample(self) -> pd.DataFrame:
        """One row per processed sample, in processing order: ``sample_id`` (str), ``mask_index``
        (nullable Int64: the row used, null without prediction), ``score`` (float64, NaN without
        prediction), ``intersection`` and ``union`` (int64 pixels), ``iou`` (float64 in [0, 1])."""
        table = pd.DataFrame(self._rows, columns=list(PER_SAMPLE_COLUMNS))
        return table.astype({"sample_id": str, "mask_index": "Int64", "score": np.float64,
                             "intersection": np.int64, "union": np.int64, "iou": np.float64})

    def evaluate(self) -> dict[str, dict[str, Any]]:
        table = self.per_sample()
        iou = table["iou"].to_numpy()
        total_union = int(table["union"].sum())
        metrics: dict[str, Any] = {
            "gIoU": 100.0 * float(iou.mean()) if len(iou) else None,
            "cIoU": 100.0 * int(table["intersection"].sum()) / total_union if total_union else None,
        }
        for threshold in PRECISION_THRESHOLDS:
            metrics[f"P@{threshold}"] = 100.0 * float((iou >= threshold).mean()) if len(iou) else None
        metrics.update(num_samples=len(table), num_predicted=int(table["mask_index"].notna().sum()),
                       num_empty_ground_truth=self._num_empty_ground_truth)
        return {"res": metrics}


def res_metrics(ground_truth: Mapping[str, Mapping[str, Any]],
                masks: pd.DataFrame) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """RES metrics of a masks table against the ground truth (see :class:`ResEvaluator`).

    ``ground_truth``: {sample_id: compressed RLE}, every evaluated sample, in the order of the per-sample
    table. ``masks``: the masks table of all shards as a DataFrame (:func:`chosen_masks`: rows of phrase
    :data:`RES_PHRASE_INDEX` give the predictions). Returns ``({"res": metrics}, per-sample table)``.
    """
    chosen = chosen_masks(masks, {sample_id: tuple(rle["size"]) for sample_id, rle in ground_truth.items()})
    evaluator = ResEvaluator()
    for sample_id, gt_rle in ground_truth.items():
        evaluator.process(sample_id, gt_rle, chosen.get((sample_id, RES_PHRASE_INDEX)))
    return evaluator.evaluate(), evaluator.per_sample()


def run(dataset: DatasetConfig, manifest_path: str | os.PathLike, masks_paths: Sequence[str | os.PathLike],
        predictions_path: str | os.PathLike, metrics_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Evaluate a ``res`` data set's masks (all shards) against its referring ground truth
    (:func:`stages.datasets.load_refer_ground_truth`: the ref's annotation, polygons merged at image
    size); write the per-sample table as a JSON list of records (``predictions_path``) and the metrics
    (``{"res": {...}, "provenance": {...}}``, ``metrics_path``); return the metrics.

    Every sample with ground truth counts, whether the pipeline predicted for it or not (a manifest
    error, a failed generation: IoU 0). A sample whose ground truth cannot be built (its ref's
    annotation or image missing: an error sample of the listing) is left out and counted in
    ``num_samples_without_ground_truth``. A masks row naming a sample outside the manifest is an error.
    """
    from stages.datasets import load_refer_ground_truth

    targets = load_refer_ground_truth(dataset)
    masks, num_samples = manifest_masks(manifest_path, masks_paths, set(targets))
    metrics, per_sample = res_metrics({sample_id: target.rle() for sample_id, target in targets.items()}, masks)
    metrics["res"]["num_samples_without_ground_truth"] = num_samples - len(targets)
    write_results("evaluate_res", metrics, per_sample, manifest_path, masks_paths, predictions_path, metrics_path)
    return metrics


def manifest_masks(manifest_path: str | os.PathLike, masks_paths: Sequence[str | os.PathLike],
                   evaluated: set[str]) -> tuple[pd.DataFrame, int]:
    """The masks rows (all shards) of the ``evaluated`` samples, after checking that every row's sample is
    in the manifest (ValueError naming one that is not), and the number of the manifest's samples."""
    manifest_ids = set(read_table(manifest_path, "manifest")["sample_id"])
    masks = read_tables(masks_paths, "masks")
    outside = ~masks["sample_id"].isin(manifest_ids)
    if outside.any():
        raise ValueError(f"masks table: {int(outside.sum())} row(s) name samples that are not in the manifest "
                         f"(e.g. {masks.loc[outside, 'sample_id'].iloc[0]!r}); were shards of another data set "
                         "given?")
    return masks[masks["sample_id"].isin(evaluated)], len(manifest_ids)


def write_results(stage: str, metrics: dict[str, dict[str, Any]], per_item: pd.DataFrame,
                  manifest_path: str | os.PathLike, masks_paths: Sequence[str | os.PathLike],
                  predictions_path: str | os.PathLike, metrics_path: str | os.PathLike) -> None:
    """Write an evaluator's per-sample (per-phrase) table as a JSON list of records and its metrics with
    the provenance record of ``stage`` (inputs: the manifest and the masks shards)."""
    from stages import provenance

    write_json(per_item.to_dict("records"), predictions_path)
    record = provenance.record(stage, "metrics", {},
                               inputs=[read_provenance(path) for path in (manifest_path, *masks_paths)])
    write_json({**metrics, METRICS_PROVENANCE_FIELD: record}, metrics_path)
    log.info("%s metrics: %s", stage, metrics)
