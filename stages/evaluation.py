"""Pieces shared by the evaluators (:mod:`stages.evaluate_coco`, :mod:`stages.evaluate_gcg`).

- Ground truth: COCO-format JSON files are validated field by field before pycocotools sees them,
  so that a missing field is a ``ValueError`` naming the file and the field, never a ``KeyError``
  deep inside pycocotools.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.io.atomic import atomic_path
from stages.io.tables import read_table, schema_of

log = logging.getLogger(__name__)

# COCOeval's summary, in the order of ``COCOeval.stats`` (its first nine entries).
COCO_SEGM_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroundTruthSpec:
    """The fields a kind of COCO-format ground-truth file must have.

    ``image_fields`` / ``annotation_fields``: keys every entry of ``images`` / ``annotations``
    must hold; ``annotation_list_fields``: those of the annotation fields whose value must be a
    list; ``needs_categories``: whether a ``categories`` list (each with an ``id``) is required.
    """

    kind: str
    image_fields: tuple[str, ...]
    annotation_fields: tuple[str, ...]
    needs_categories: bool
    annotation_list_fields: tuple[str, ...] = ()


# COCOeval (iouType segm) reads every image's height/width (``annToRLE``) and every annotation's
# area and iscrowd, so a mask file needs all of them.
INSTANCES_GT = GroundTruthSpec(
    kind="COCO instances", image_fields=("id", "height", "width"),
    annotation_fields=("id", "image_id", "category_id", "segmentation", "area", "iscrowd"),
    needs_categories=True)
GCG_MASK_GT = GroundTruthSpec(
    kind="GCG mask ground truth", image_fields=("id", "height", "width"),
    annotation_fields=("id", "image_id", "category_id", "segmentation", "area", "iscrowd"),
    needs_categories=False)
GCG_CAPTION_GT = GroundTruthSpec(
    kind="GCG caption ground truth", image_fields=("id",),
    annotation_fields=("id", "image_id", "caption", "labels"),
    needs_categories=False, annotation_list_fields=("labels",))


def validate_ground_truth(data: Any, path: str | os.PathLike, spec: GroundTruthSpec) -> None:
    """Raise ``ValueError`` (naming ``path``, the entry and the field) unless ``data`` is a
    ``spec``-conforming COCO-format dict: lists ``images`` and ``annotations`` whose entries hold
    ``spec``'s fields, unique image ids and annotation ids, and every annotation's ``image_id``
    among the images. Linear in the number of images and annotations."""
    where = f"{spec.kind} file {path}"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}")
    required_lists = ["images", "annotations"] + (["categories"] if spec.needs_categories else [])
    for key in required_lists:
        if key not in data:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{where}: field {key!r} must be a list, found {type(data[key]).__name__}")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        _require_fields(image, spec.image_fields, f"{where}: images[{i}]")
        if image["id"] in image_ids:
            raise ValueError(f"{where}: image id {image['id']!r} appears twice")
        image_ids.add(image["id"])
    annotation_ids = set()
    for i, annotation in enumerate(data["annotations"]):
        _require_fields(annotation, spec.annotation_fields, f"{where}: annotations[{i}]")
        for field in spec.annotation_list_fields:
            if not isinstance(annotation[field], list):
                raise ValueError(f"{where}: annotations[{i}] field {field!r} must be a list, "
                                 f"found {type(annotation[field]).__name__}")
        if annotation["id"] in annotation_ids:
            raise ValueError(f"{where}: annotation id {annotation['id']!r} appears twice")
        annotation_ids.add(annotation["id"])
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{where}: annotations[{i}] refers to image_id {annotation['image_id']!r}, "
                             "which is not in 'images'")
    if spec.needs_categories:
        for i, category in enumerate(data["categories"]):
            _require_fields(category, ("id",), f"{where}: categories[{i}]")


def _require_fields(entry: Any, fields: Iterable[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object, found {type(entry).__name__}")
    for field in fields:
        if field not in entry:
            raise ValueError(f"{where} has no field {field!r}")


def load_ground_truth(path: str | os.PathLike, spec: GroundTruthSpec) -> COCO:
    """Read, validate (:func:`validate_ground_truth`) and index a COCO-format file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{spec.kind} file not found: {path}")
    with path.open() as f:
        data = json.load(f)
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
