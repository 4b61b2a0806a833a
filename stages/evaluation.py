"""Pieces shared by the evaluators (:mod:`stages.evaluate_coco`, :mod:`stages.evaluate_gcg`).

- Ground truth: COCO-format JSON files are validated field by field before pycocotools sees them,
  by :func:`stages.datasets.validate_ground_truth` with the stricter specs below (COCOeval's
  fields), so that a missing field is a ``ValueError`` naming the file and the field, never a
  ``KeyError`` deep inside pycocotools.
- Image ids: artifacts store ``image_id`` as text; :func:`gt_image_ids` maps it back to the ground
  truth's own id (an int for COCO instances, a string for GranD-f).
- Predictions: :func:`results_coco` is pycocotools' ``COCO.loadRes`` for segmentation results,
  except that an empty result list is allowed (``loadRes([])`` raises ``IndexError``).
- Matching: the two greedy one-to-one loops of GLaMM's GCG protocol, on IoU matrices computed
  from RLEs by pycocotools (no mask is decoded).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.datasets import (
    CAPTION_RULES,
    IMAGE_SIZE_RULES,
    OPTIONAL_SEGMENTATION_RULE,
    SEGMENTATION_RULE,
    GroundTruthSpec,
    load_json,
    validate_ground_truth,
)
from stages.io.atomic import atomic_path
from stages.io.tables import read_table, schema_of

log = logging.getLogger(__name__)

# COCOeval's summary, in the order of ``COCOeval.stats`` (its first nine entries).
COCO_SEGM_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------

# COCOeval (iouType segm) reads every image's height/width (``annToRLE``) and every annotation's
# area and iscrowd, so a mask file needs all of them; ids must be unique in every list (COCO's index
# is by id). The value rules are those of stages.datasets' specs, less GranD-f's naming conventions
# (string image ids, category_id 1), which the evaluators do not rely on. A COCO instances file may
# repeat an image id and have annotations without segmentation: those images are left out of the
# evaluation (stages.datasets.unusable_images, stages.evaluate_coco).
INSTANCES_GT = GroundTruthSpec(
    kind="COCO instances", images=("id", "height", "width"),
    annotations=("id", "image_id", "category_id", "area", "iscrowd"), categories=("id",),
    rules=(*IMAGE_SIZE_RULES, OPTIONAL_SEGMENTATION_RULE), repeated_image_ids=True)
GCG_MASK_GT = GroundTruthSpec(
    kind="GCG mask ground truth", images=("id", "height", "width"),
    annotations=("id", "image_id", "category_id", "segmentation", "area", "iscrowd"),
    rules=(*IMAGE_SIZE_RULES, SEGMENTATION_RULE))
GCG_CAPTION_GT = GroundTruthSpec(
    kind="GCG caption ground truth", images=("id",), annotations=("id", "image_id", "caption", "labels"),
    rules=CAPTION_RULES)


def load_ground_truth(path: str | os.PathLike, spec: GroundTruthSpec) -> COCO:
    """Read, validate (:func:`stages.datasets.validate_ground_truth`, which raises
    :class:`~stages.datasets.DatasetError`, a ``ValueError``) and index a COCO-format file."""
    data = load_json(path)
    validate_ground_truth(data, path, spec)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_image_ids(image_ids: Sequence[str], coco: COCO, source: str) -> dict[str, Any]:
    """Map each artifact image id (text) to the ground truth's own id: the id whose text
    (``str(id)``) equals it. Raise ``ValueError`` naming ``source`` (the ground truth, e.g. its
    path) for an id the ground truth does not hold."""
    by_text = {str(gt_id): gt_id for gt_id in coco.imgs}
    missing = [image_id for image_id in image_ids if image_id not in by_text]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ValueError(f"{len(missing)} manifest image(s) are not in {source} (e.g. {shown})")
    return {image_id: by_text[image_id] for image_id in image_ids}


def read_manifest_image_ids(manifest_path: str | os.PathLike) -> list[str]:
    """The manifest's image ids in manifest order; every one of them is evaluated, including
    images whose manifest row is an error row (they count as images without predictions)."""
    image_ids = read_table(manifest_path, "manifest")["image_id"]
    duplicated = image_ids[image_ids.duplicated()]
    if len(duplicated):
        raise ValueError(f"manifest {manifest_path} lists image_id {duplicated.iloc[0]!r} more than once")
    return image_ids.tolist()


# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------

def concat_tables(tables: Sequence[pd.DataFrame], artifact: str) -> pd.DataFrame:
    """The DataFrames of one artifact, concatenated (an empty table of its schema when none)."""
    if not tables:
        return schema_of(artifact).empty_table().to_pandas()
    return pd.concat(tables, ignore_index=True)


def good_rows(table: pd.DataFrame, required: Sequence[str], artifact: str) -> pd.DataFrame:
    """The rows of ``table`` whose ``error`` is null, after checking that none of them has a null
    in a ``required`` column (``ValueError`` naming the column and an image otherwise)."""
    good = table[table["error"].isna()]
    for column in required:
        null = good[column].isna()
        if null.any():
            image_id = good.loc[null, "image_id"].iloc[0]
            raise ValueError(f"{artifact} table: {int(null.sum())} row(s) without error have a null "
                             f"{column!r} (e.g. image {image_id!r})")
    return good


def check_rows_belong(table: pd.DataFrame, image_ids: Iterable[str], key: Sequence[str],
                      artifact: str) -> None:
    """Raise ``ValueError`` when a row of ``table`` names an image outside ``image_ids`` (the
    manifest) or when two rows share the same ``key`` (e.g. image, phrase and mask index)."""
    outside = ~table["image_id"].isin(set(image_ids))
    if outside.any():
        raise ValueError(f"{artifact} table: {int(outside.sum())} row(s) name images that are not in the "
                         f"manifest (e.g. {table.loc[outside, 'image_id'].iloc[0]!r})")
    check_unique(table, key, artifact)


def check_unique(table: pd.DataFrame, key: Sequence[str], artifact: str) -> None:
    """Raise ``ValueError`` when two rows of ``table`` share the same ``key`` (a shard given twice)."""
    duplicated = table.duplicated(list(key))
    if duplicated.any():
        first = table.loc[duplicated, list(key)].iloc[0].to_dict()
        raise ValueError(f"{artifact} table: {int(duplicated.sum())} row(s) repeat the same {list(key)} "
                         f"(e.g. {first}); was a shard given twice?")


def rle_of(counts: str, height: int, width: int) -> dict[str, Any]:
    """COCO compressed RLE (the JSON form: counts as text) of a masks-table row."""
    return {"size": [int(height), int(width)], "counts": counts}


def check_mask_size(rle: Mapping[str, Any], coco: COCO, gt_id: Any) -> None:
    """Raise ``ValueError`` unless the RLE's [height, width] is the ground-truth image's size."""
    image = coco.imgs[gt_id]
    if list(rle["size"]) != [image["height"], image["width"]]:
        raise ValueError(f"predicted mask of image {gt_id!r} has size {list(rle['size'])}, "
                         f"the ground truth's image is {[image['height'], image['width']]} (height, width)")


def results_coco(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """A COCO object holding segmentation ``results`` (COCO results format) against ``gt``.

    Same as ``gt.loadRes(results)`` for segmentation results (each result gets ``id`` = 1-based
    position, ``iscrowd`` 0, ``area`` and ``bbox`` from its RLE; images and categories are
    ``gt``'s), but an empty list gives an empty result set instead of an ``IndexError``.
    ``results`` are copied, not modified.
    """
    annotations = []
    for position, result in enumerate(results, start=1):
        annotation = dict(result)
        annotation["area"] = float(mask_utils.area(annotation["segmentation"]))
        annotation["bbox"] = mask_utils.toBbox(annotation["segmentation"]).tolist()
        annotation["id"] = position
        annotation["iscrowd"] = 0
        annotations.append(annotation)
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset.get("categories", [])),
                  "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_segm_summary(gt: COCO, dt: COCO, image_ids: Sequence[Any],
                      category_ids: Sequence[int] | None = None) -> dict[str, float | None]:
    """COCOeval (iouType ``segm``) over ``image_ids`` (ground-truth ids), on ``category_ids`` (all
    of ``gt``'s categories when None), with pycocotools' default ``useCats=1``.

    Returns :data:`COCO_SEGM_METRICS` as fractions in [0, 1]; pycocotools' -1 ("undefined": no
    ground truth in the evaluated set) becomes None, and so does every metric when ``image_ids`` is
    empty. pycocotools' printed summary goes to this module's logger at INFO level.
    """
    if not image_ids:
        return dict.fromkeys(COCO_SEGM_METRICS)
    coco_eval = COCOeval(gt, dt, iouType="segm")
    coco_eval.params.imgIds = list(image_ids)
    if category_ids is not None:
        coco_eval.params.catIds = list(category_ids)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.info("COCOeval segm summary:\n%s", printed.getvalue())
    return {name: (None if value < 0 else float(value))
            for name, value in zip(COCO_SEGM_METRICS, coco_eval.stats)}


def iou_matrix(rows: Sequence[Mapping[str, Any]], columns: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """IoU (intersection / union, never crowd-adjusted) of every RLE in ``rows`` with every RLE in
    ``columns``, shape (len(rows), len(columns)). Two empty masks have IoU 0 (pycocotools), where
    GLaMM's ``compute_iou`` gives NaN."""
    if not rows or not columns:
        return np.zeros((len(rows), len(columns)))
    return np.asarray(mask_utils.iou(list(rows), list(columns), [0] * len(columns)), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Greedy one-to-one matching (GLaMM eval/gcg/evaluate.py)
# --------------------------------------------------------------------------------------------------

def greedy_positive_pairs(iou: np.ndarray) -> list[tuple[int, int]]:
    """GLaMM's ``compute_miou`` pairing: repeatedly take the largest IoU among the rows and columns
    not yet paired, pair that row with that column, and stop when it is not > 0 (or no row or
    column is left). Ties go to the first entry in row-major order (``np.argmax``), which is also
    what GLaMM's row/column deletion gives. Returns (row, column) pairs in the order taken."""
    return _greedy_pairs(iou, lambda row, column: iou[row, column] > 0)


def greedy_admissible_pairs(iou: np.ndarray, text_sim: np.ndarray, iou_thresh: float,
                            text_sim_thresh: float) -> list[tuple[int, int]]:
    """GLaMM's ``find_best_matches`` loop: repeatedly take the largest IoU among the rows and
    columns not yet matched (ties: first in row-major order); if that pair has IoU >= ``iou_thresh``
    and text similarity >= ``text_sim_thresh`` it is a match, otherwise the loop stops, even when
    a pair of lower IoU would have passed both thresholds. GLaMM removes a matched row and column
    by zeroing them, which for ``iou_thresh > 0`` is the same as removing them."""
    if iou.shape != text_sim.shape:
        raise ValueError(f"IoU matrix {iou.shape} and text similarity matrix {text_sim.shape} "
                         "differ in shape")
    return _greedy_pairs(iou, lambda row, column: bool(
        iou[row, column] >= iou_thresh and text_sim[row, column] >= text_sim_thresh))


def _greedy_pairs(scores: np.ndarray, admissible) -> list[tuple[int, int]]:
    remaining = np.array(scores, dtype=np.float64, copy=True)
    pairs: list[tuple[int, int]] = []
    for _ in range(min(remaining.shape)):
        row, column = np.unravel_index(int(np.argmax(remaining)), remaining.shape)
        if not admissible(row, column):
            break
        pairs.append((int(row), int(column)))
        remaining[row, :] = -np.inf
        remaining[:, column] = -np.inf
    return pairs


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers and NaN into None, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(value: Any, path: str | os.PathLike) -> None:
    """Write ``value`` as JSON to ``path`` atomically (temporary sibling, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(json_ready(value), f, allow_nan=False)
