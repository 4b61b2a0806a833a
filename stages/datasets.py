"""Data sets: their config, their ground-truth files and the list of their samples.

A sample is what one generate job answers: an image and, for some tasks, what is asked or forced
about it (:class:`SampleEntry`). Five kinds of data set (``task``):

- ``instance_seg``: a COCO instances file (``images[id, file_name, width, height]``,
  ``annotations[image_id, category_id, segmentation]``, ``categories[id, name]``); the image of
  ``images[i]`` is ``<images>/<file_name>``. One sample per image.
- ``gcg``: a GranD-f pair as in GLaMM's protocol: ``*_gcg_coco_mask_gt.json`` (COCO format,
  ``category_id`` 1, string image ids) and ``*_gcg_coco_caption_gt.json`` (``annotations`` with
  ``image_id``, ``caption``, ``labels``); the image of id ``I`` is ``<images>/I.jpg``. One sample per
  image.
- ``images``: a plain folder; every file with an image extension is an image whose id is the file's
  stem. One sample per image.
- ``res`` (referring expression segmentation: RefCOCO, RefCOCO+, RefCOCOg in the layout GLaMM and the
  release read): a refs pickle ``refs(unc).p`` / ``refs(umd).p`` (a list of refs ``{ref_id, ann_id,
  image_id, split, sentences: [{sent_id, sent, ...}], ...}``, :func:`load_refs`) and that data set's
  COCO-format ``instances.json`` (COCO train2014 images, polygon annotations); the image of a ref is
  ``<images>/<file_name of its image in instances.json>`` (the ref's own ``file_name`` names no
  file). One sample per sentence of each ref of the configured ``split``, asking about the sentence
  (``expression``); its ground truth is the ref's one annotation (:func:`load_refer_ground_truth`).
- ``png`` (panoptic narrative grounding on COCO val2017): the narratives file
  ``png_coco_val2017.json`` (a list of ``{image_id: str, segments: [{utterance, segment_ids, plural,
  ...}], ...}``), the COCO panoptic file ``panoptic_val2017.json`` and its folder of id PNGs. One
  sample per narrative, whose utterances are the forced answer (``forced_answer``); its ground
  truth is, per utterance with segments, the union of those segments' pixels
  (:func:`load_png_ground_truth`).

Every loader checks the fields the pipeline reads and raises :class:`DatasetError` with a message
naming the file, the entry and the missing or wrong field, so that a bad file fails at once instead of
as a ``KeyError`` deep inside a later stage. The checks of COCO-format files are one validator,
:func:`validate_ground_truth`, driven by a :class:`GroundTruthSpec` per kind of file; the evaluators
(:mod:`stages.evaluation`) use it too, with specs that also require the fields COCOeval reads. The
refs pickle and the narratives file, lists of another shape, have their own checks
(:func:`load_refs`, :func:`load_narratives`); the pickle is read without running code it might carry
(:mod:`stages.io.safe_pickle`).

Faults that concern one image or one sample only become error samples instead of stopping the run,
which the manifest makes error rows and the evaluators leave out: in a COCO instances file
(:func:`unusable_images`) an image id listed more than once (the annotations of that id cannot be
told apart) and an annotation without ``segmentation`` (missing or null: there is no ground-truth
mask to evaluate against); for ``res`` a ref whose image or annotation is not in ``instances.json``
or whose annotation has no segmentation (each of its sentences); for ``png`` a narrative whose image
or panoptic annotation is not in the panoptic file. Every other fault of a ground-truth file stops
the job.

Image ids and sample ids are strings everywhere in the pipeline (COCO's integer ids are written as
decimal text, see :mod:`schemas.artifacts`). Masks are indexed ``[row, column]`` = ``[y, x]`` in the
image's stored pixel grid, ``(height, width)`` as the ground truth declares it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from stages.config import DATASET_SECTIONS, ConfigError, from_mapping, schema_default
from stages.io.safe_pickle import PickleFileError, load_pickle

TASKS = ("instance_seg", "gcg", "images", "res", "png")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GCG_IMAGE_EXTENSION = ".jpg"
GCG_CATEGORY_ID = 1

# Keys each task needs (DatasetConfig field names): its ground-truth files, and res's split.
_TASK_KEYS = {"instance_seg": ("instances",), "gcg": ("mask_gt", "caption_gt"), "images": (),
              "res": ("refs", "instances", "split"), "png": ("narratives", "panoptic", "panoptic_masks")}
_ALL_TASK_KEYS = tuple(dict.fromkeys(key for keys in _TASK_KEYS.values() for key in keys))
_NOT_FILES = ("split",)
# Optional keys of any task: precomputed masks that segment.mask_source proposals picks from
# (stages.proposals), not ground truth.
PROPOSAL_KEYS = ("proposals", "proposals_folder")


class DatasetError(ValueError):
    """A ground-truth file or image folder is missing or malformed; the message names it."""


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of the config's ``datasets`` section.

    ``images`` is the image folder; the task's keys (:data:`_TASK_KEYS`) name its ground truth:
    ``instances`` (instance_seg), ``mask_gt`` + ``caption_gt`` (gcg), ``refs`` + ``instances`` +
    ``split`` (res: the refs pickle, that data set's instances.json, the split whose refs are the
    samples, e.g. ``val``, ``testA``), ``narratives`` + ``panoptic`` + ``panoptic_masks`` (png: the
    narratives JSON, the COCO panoptic JSON, the folder of its PNGs); ``proposals`` (a COCO results
    JSON of instance masks) or ``proposals_folder`` (panoptic PNGs, ``proposals`` then being their
    JSON if any) are the precomputed masks ``segment.mask_source: proposals`` picks from
    (:mod:`stages.proposals`); ``question`` overrides the generate stage's default question; images
    with more than ``max_pixels`` pixels become error rows of the manifest.
    """

    name: str
    task: str
    images: str
    instances: str | None = None
    mask_gt: str | None = None
    caption_gt: str | None = None
    refs: str | None = None
    split: str | None = None
    narratives: str | None = None
    panoptic: str | None = None
    panoptic_masks: str | None = None
    proposals: str | None = schema_default("datasets", "*", "proposals")
    proposals_folder: str | None = schema_default("datasets", "*", "proposals_folder")
    question: str | None = schema_default("datasets", "*", "question")
    max_pixels: int = schema_default("datasets", "*", "max_pixels")

    def __post_init__(self) -> None:
        where = f"datasets.{self.name}"
        if self.task not in TASKS:
            raise ConfigError(f"{where}.task is {self.task!r}; expected one of {list(TASKS)}")
        for field in _TASK_KEYS[self.task]:
            value = getattr(self, field)
            if not value:
                raise ConfigError(f"{where}: task {self.task!r} needs the key {field!r}")
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{field} must be a string, got {value!r}")
        for field in _ALL_TASK_KEYS:
            if field not in _TASK_KEYS[self.task] and getattr(self, field) is not None:
                raise ConfigError(f"{where}.{field} is not used by task {self.task!r}; remove it")
        for field in PROPOSAL_KEYS:
            value = getattr(self, field)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"{where}.{field} must be a non-empty string or null, got {value!r}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ConfigError(f"{where}.max_pixels must be a positive integer, got {self.max_pixels!r}")

    def ground_truth_files(self) -> tuple[str, ...]:
        """The task's ground-truth files and folders as configured (``res``: refs, instances;
        ``png``: narratives, panoptic, panoptic_masks; ``images``: none)."""
        return tuple(getattr(self, key) for key in _TASK_KEYS[self.task] if key not in _NOT_FILES)


def dataset_config(name: str, entry: Mapping[str, Any]) -> DatasetConfig:
    """Build the :class:`DatasetConfig` of the config entry ``datasets.<name>`` (a mapping without
    ``name``). The entry's stage-section overrides (``generate``, ``phrases``, ``segment``,
    ``evaluate``) are not part of it: :func:`stages.config.stage_sections` reads them."""
    if "name" in entry:
        raise ConfigError(f"datasets.{name}: the key 'name' is not allowed (the entry's key is its name)")
    data = {key: value for key, value in entry.items() if key not in DATASET_SECTIONS}
    return from_mapping(DatasetConfig, {**data, "name": name}, where=f"datasets.{name}")


def dataset_configs(section: Mapping[str, Mapping[str, Any]]) -> dict[str, DatasetConfig]:
    """Every data set of the config's ``datasets`` section, by name."""
    return {name: dataset_config(name, entry or {}) for name, entry in section.items()}


@dataclass(frozen=True)
class SampleEntry:
    """One sample of a data set: its id (unique in the data set; the image id where a data set has
    one sample per image, ``<ref_id>-<sent_id>`` for res, ``<image_id>-<k>`` for png), its image's
    string id and file, the size its ground truth declares (pixels; ``None`` for a plain folder, which
    declares none, and where the image is not in the ground truth), why its ground truth cannot be
    used (``None`` when it can), the referring expression asked about (res, else ``None``) and the
    answer's pieces, forced instead of generated (png: the narrative's utterances in order, else
    ``None``).

    An error sample whose image is not in the ground truth has the image folder as ``file``."""

    sample_id: str
    image_id: str
    file: Path
    width: int | None
    height: int | None
    error: str | None = None
    expression: str | None = None
    forced_answer: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CocoInstances:
    """A validated COCO instances file; lists keep the file's dicts unchanged."""

    path: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]


@dataclass(frozen=True)
class GcgGroundTruth:
    """A validated GranD-f pair: the mask file (COCO format) and the caption file."""

    mask_path: Path
    caption_path: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    captions: list[dict[str, Any]]


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, raising :class:`DatasetError` for a missing, unreadable or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"ground-truth file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:  # json.JSONDecodeError or UnicodeDecodeError
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class FieldRule:
    """A rule on field ``field`` of every entry of the list ``entries`` (``"images"``,
    ``"annotations"`` or ``"categories"``): ``problem(value)`` is None for a good value, else the end
    of the error message, which reads ``<entries>[<i>].<field> <problem>``. An ``optional`` field
    may be absent or null (the rule then does not apply)."""

    entries: str
    field: str
    problem: Callable[[Any], str | None]
    optional: bool = False


def must_be(expected: str, ok: Callable[[Any], bool]) -> Callable[[Any], str | None]:
    """A :attr:`FieldRule.problem`: ``"must be <expected>, got <value>"`` unless ``ok(value)``."""
    return lambda value: None if ok(value) else f"must be {expected}, got {value!r}"


def _segmentation_problem(seg: Any) -> str | None:
    """A segmentation is a polygon list or an RLE object with ``counts`` and ``size``."""
    if isinstance(seg, dict):
        missing = [field for field in ("counts", "size") if field not in seg]
        return f"(RLE) has no field {missing[0]!r}" if missing else None
    if not isinstance(seg, list):
        return f"must be a polygon list or an RLE object, found {type(seg).__name__}"
    return None


IMAGE_SIZE_RULES = tuple(
    FieldRule("images", field, must_be("a positive integer",
                                        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1))
    for field in ("width", "height"))
SEGMENTATION_RULE = FieldRule("annotations", "segmentation", _segmentation_problem)
# COCO instances: an annotation without segmentation makes its image unusable (unusable_images).
OPTIONAL_SEGMENTATION_RULE = FieldRule("annotations", "segmentation", _segmentation_problem, optional=True)
CAPTION_RULES = (
    FieldRule("annotations", "caption", must_be("a string", lambda v: isinstance(v, str))),
    FieldRule("annotations", "labels", must_be(
        "a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v))))


@dataclass(frozen=True)
class GroundTruthSpec:
    """What a kind of COCO-format ground-truth file must hold (see :func:`validate_ground_truth`).

    ``images`` / ``annotations`` / ``categories``: the fields every entry of that top-level list
    must have, None where the file needs no such list (``images`` and ``categories`` include
    ``"id"``, ``annotations`` includes ``"image_id"``, and ``"category_id"`` where annotations name
    a category); ``rules``: further checks of field values.
    ``kind`` names the file in messages (``"<kind> file <path>: ..."``); ``repeated_image_ids``:
    images may repeat an id (the reader makes such an image an error row, :func:`unusable_images`).
    """

    kind: str
    images: tuple[str, ...] | None
    annotations: tuple[str, ...]
    categories: tuple[str, ...] | None = None
    rules: tuple[FieldRule, ...] = ()
    repeated_image_ids: bool = False

    def where(self, path: str | os.PathLike) -> str:
        """The prefix of this kind's error messages about the file ``path``."""
        return f"{self.kind} file {path}"


COCO_INSTANCES = GroundTruthSpec(
    kind="COCO instances", images=("id", "file_name", "width", "height"),
    annotations=("image_id", "category_id"), categories=("id", "name"),
    rules=(*IMAGE_SIZE_RULES, OPTIONAL_SEGMENTATION_RULE), repeated_image_ids=True)
GCG_MASK = GroundTruthSpec(
    kind="GCG mask ground truth", images=("id", "width", "height"),
    annotations=("image_id", "category_id", "segmentation"),
    rules=(FieldRule("images", "id", must_be(f"a string (the image file is <id>{GCG_IMAGE_EXTENSION})",
                                               lambda v: isinstance(v, str))),
           *IMAGE_SIZE_RULES,
           FieldRule("annotations", "category_id", must_be(f"{GCG_CATEGORY_ID} (class-agnostic)",
                                                            lambda v: v == GCG_CATEGORY_ID)),
           SEGMENTATION_RULE))
# Its image ids refer to the mask file's images (checked by load_gcg).
GCG_CAPTION = GroundTruthSpec(kind="GCG caption ground truth", images=None,
                              annotations=("image_id", "caption", "labels"), rules=CAPTION_RULES)


def validate_ground_truth(data: Any, path: str | os.PathLike,
                          spec: GroundTruthSpec) -> dict[str, list[dict[str, Any]]]:
    """Check that ``data`` (a parsed JSON file) is a ``spec``-conforming COCO-format object and
    return its lists (``"images"``, ``"annotations"``, ``"categories"``: those ``spec`` requires,
    the file's dicts unchanged).

    Checks, in order: each required list is a list of objects holding ``spec``'s fields; ``spec``'s
    rules; ids unique within each list whose entries need an ``id`` (images excepted when
    ``spec.repeated_image_ids``); every annotation's
    ``image_id`` among the images and ``category_id`` among the categories (where the file has
    those lists and ``spec``'s annotations that field). Raises :class:`DatasetError` naming the file,
    the entry and the field. Linear in the number of entries.
    """
    where = spec.where(path)
    required = {"images": spec.images, "annotations": spec.annotations, "categories": spec.categories}
    lists = {key: _entries(data, key, where, fields)
             for key, fields in required.items() if fields is not None}
    for rule in spec.rules:
        for i, entry in enumerate(lists[rule.entries]):
            if rule.optional and entry.get(rule.field) is None:
                continue
            problem = rule.problem(entry[rule.field])
            if problem is not None:
                raise DatasetError(f"{where}: {rule.entries}[{i}].{rule.field} {problem}")
    ids = {key: _unique_ids(lists[key], key, where, repeats=key == "images" and spec.repeated_image_ids)
           for key, fields in required.items() if fields is not None and "id" in fields}
    for key, field in (("images", "image_id"), ("categories", "category_id")):
        if key in lists and field in spec.annotations:
            _check_refs(lists["annotations"], field, ids[key], where, key)
    return lists


def _entries(data: Any, key: str, where: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """``data[key]``, checked to be a list of objects that each have ``fields``."""
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object at the top level, found {type(data).__name__}")
    if key not in data:
        raise DatasetError(f"{where}: missing top-level field {key!r}")
    entries = data[key]
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: field {key!r} must be a list, found {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: {key}[{i}] must be an object, found {type(entry).__name__}")
        for field in fields:
            if field not in entry:
                raise DatasetError(f"{where}: {key}[{i}] has no field {field!r}")
    return entries


def _unique_ids(entries: list[dict[str, Any]], key: str, where: str, repeats: bool = False) -> set[Any]:
    """The ``id`` of every entry, checked to be hashable (not a JSON list or object) and, unless
    ``repeats``, unique."""
    seen: set[Any] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry["id"], Hashable):
            raise DatasetError(f"{where}: {key}[{i}].id must be a number or a string, got {entry['id']!r}")
        if entry["id"] in seen and not repeats:
            raise DatasetError(f"{where}: {key}[{i}] repeats id {entry['id']!r}")
        seen.add(entry["id"])
    return seen


def _check_refs(annotations: list[dict[str, Any]], field: str, ids: set[Any], where: str,
                target: str) -> None:
    """Raise :class:`DatasetError` (``<where>: annotations[<i>].<field> <value> is not in <target>``)
    unless every annotation's ``field`` is one of ``ids``."""
    for i, annotation in enumerate(annotations):
        value = annotation[field]
        if not (isinstance(value, Hashable) and value in ids):
            raise DatasetError(f"{where}: annotations[{i}].{field} {value!r} is not in {target}")


def unusable_images(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, str]:
    """The images of a (validated) COCO instances file whose ground truth cannot be used: image id
    as text -> the reason, for

    - an id listed more than once in ``images`` (ids compared as text, as the artifacts store
      them): annotations name their image by id, so the annotations of that id cannot be told
      apart between its entries;
    - an image with an annotation whose ``segmentation`` is missing or null: there is no
      ground-truth mask to evaluate its predictions against (pycocotools would fail on it).

    The manifest makes each of these images an error row (one row per id), and the instance
    segmentation evaluator leaves them out. Linear in the number of entries.
    """
    positions: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        positions.setdefault(str(image["id"]), []).append(i)
    reasons: dict[str, str] = {}
    for image_id, where in positions.items():
        if len(where) > 1:
            entries = ", ".join(f"images[{i}] {images[i].get('file_name', '')!r}" for i in where)
            reasons[image_id] = (f"image id {images[where[0]]['id']!r} is listed {len(where)} times in the "
                                 f"ground truth ({entries}): its annotations cannot be told apart")
    for i, annotation in enumerate(annotations):
        if annotation.get("segmentation") is None:
            reasons.setdefault(str(annotation["image_id"]), (
                f"annotations[{i}] (id {annotation.get('id')!r}) of this image has no segmentation: no "
                "ground-truth mask to evaluate against"))
    return reasons


def load_coco_instances(path: str | os.PathLike) -> CocoInstances:
    """Load and validate a COCO instances file (:data:`COCO_INSTANCES`; repeated image ids and
    annotations without segmentation are allowed: see :func:`unusable_images`)."""
    path = Path(path)
    lists = validate_ground_truth(load_json(path), path, COCO_INSTANCES)
    return CocoInstances(path, lists["images"], lists["annotations"], lists["categories"])


def load_gcg(mask_gt: str | os.PathLike, caption_gt: str | os.PathLike) -> GcgGroundTruth:
    """Load and validate a GranD-f pair (:data:`GCG_MASK`, :data:`GCG_CAPTION`; every caption's
    image is an image of the mask file)."""
    mask_path, caption_path = Path(mask_gt), Path(caption_gt)
    mask = validate_ground_truth(load_json(mask_path), mask_path, GCG_MASK)
    captions = validate_ground_truth(load_json(caption_path), caption_path, GCG_CAPTION)["annotations"]
    _check_refs(captions, "image_id", {image["id"] for image in mask["images"]},
                GCG_CAPTION.where(caption_path), f"the images of {mask_path}")
    return GcgGroundTruth(mask_path, caption_path, mask["images"], mask["annotations"], captions)


def _require_task(cfg: DatasetConfig, task: str, what: str) -> None:
    """Raise :class:`DatasetError` unless ``cfg`` is a ``task`` data set (``what`` exist only there)."""
    if cfg.task != task:
        raise DatasetError(f"data set {cfg.name!r} has task {cfg.task!r}; {what} exist only for {task}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INTEGER = must_be("an integer", _is_int)
STRING = must_be("a string", lambda v: isinstance(v, str))
LIST = must_be("a list", lambda v: isinstance(v, list))


def _check_entry(entry: Any, name: str, where: str, rules: Mapping[str, Callable[[Any], str | None]],
                 container: str = "an object") -> None:
    """Raise :class:`DatasetError` (``<where>: <name> ...``) unless ``entry`` is a dict holding every
    field of ``rules`` with a value its rule accepts (see :func:`must_be`)."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: {name} must be {container}, found {type(entry).__name__}")
    for field, rule in rules.items():
        if field not in entry:
            raise DatasetError(f"{where}: {name} has no field {field!r}")
        problem = rule(entry[field])
        if problem is not None:
            raise DatasetError(f"{where}: {name}.{field} {problem}")


# ------------------------------------------------------------------------------------------------
# Referring expression segmentation (task res).

REF_RULES = {"ref_id": INTEGER, "ann_id": INTEGER, "image_id": INTEGER, "split": STRING, "sentences": LIST}
SENTENCE_RULES = {"sent_id": INTEGER, "sent": STRING}
REFER_INSTANCES = GroundTruthSpec(
    kind="RefCOCO instances", images=("id", "file_name", "width", "height"),
    annotations=("id", "image_id", "category_id"), categories=("id", "name"),
    rules=(*IMAGE_SIZE_RULES, OPTIONAL_SEGMENTATION_RULE))
# A polygon needs 3 points (6 numbers) to enclose pixels; pycocotools' frPyObjects takes a list whose
# first polygon has 4 numbers for boxes [x, y, w, h], so shorter polygons are left out of a mask
# (ReferTarget.rle; a segmentation without a longer one is an empty mask).
MIN_POLYGON_NUMBERS = 6


def load_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load and check a RefCOCO refs pickle (``refs(unc).p``, ``refs(umd).p``: a list of refs, each a
    dict with at least ``ref_id``, ``ann_id``, ``image_id`` (integers), ``split`` (string) and
    ``sentences``, a list of dicts with at least ``sent_id`` (integer) and ``sent`` (string); other
    fields such as ``file_name``, ``category_id``, ``tokens``, ``raw`` are kept, unread). Read with
    :func:`stages.io.safe_pickle.load_pickle` (the files were written by Python 2; nothing in them is
    called). Returns the file's list unchanged."""
    path = Path(path)
    try:
        refs = load_pickle(path, "RefCOCO refs")
    except PickleFileError as exc:
        raise DatasetError(str(exc)) from None
    where = f"RefCOCO refs file {path}"
    if not isinstance(refs, list):
        raise DatasetError(f"{where}: expected a list of refs at the top level, found {type(refs).__name__}")
    for i, ref in enumerate(refs):
        _check_entry(ref, f"refs[{i}]", where, REF_RULES, container="a dict")
        for j, sentence in enumerate(ref["sentences"]):
            _check_entry(sentence, f"refs[{i}].sentences[{j}]", where, SENTENCE_RULES, container="a dict")
    return refs


def _region_polygons(polygons: list[list[float]]) -> list[list[float]]:
    """The polygons of a polygon-list segmentation that can enclose pixels (3 points or more)."""
    return [polygon for polygon in polygons if len(polygon) >= MIN_POLYGON_NUMBERS]


@dataclass(frozen=True)
class ReferTarget:
    """The ground truth of one res sample: its image (string id, ``height`` x ``width`` pixels as
    instances.json declares them), the id of the ref's annotation and that annotation's
    ``segmentation`` as the file holds it: a polygon list ``[[x0, y0, x1, y1, ...], ...]`` (pixel
    coordinates, x to the right, y down, as COCO) or an RLE object of size [height, width]."""

    image_id: str
    ann_id: int
    height: int
    width: int
    segmentation: list[list[float]] | dict[str, Any]

    def rle(self) -> dict[str, Any]:
        """The ground-truth mask as COCO compressed RLE ``{"size": [height, width], "counts": str}``
        (counts as text, the JSON form of :func:`stages.evaluation.rle_of`; pycocotools' ``decode``,
        ``area`` and ``iou`` take it as is). Polygons: all of them (those of 3 points or more)
        rasterised at the image's size and merged into one mask (pycocotools ``frPyObjects`` +
        ``merge``, the release's ``decode_segm``), an empty mask when there is none (an empty list, or
        only degenerate polygons); an uncompressed RLE is compressed, a compressed one kept."""
        segmentation = self.segmentation
        if isinstance(segmentation, list):
            polygons = _region_polygons(segmentation)
            rle = (mask_utils.merge(mask_utils.frPyObjects(polygons, self.height, self.width)) if polygons
                   else mask_utils.encode(np.zeros((self.height, self.width), dtype=np.uint8, order="F")))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, self.height, self.width)
        else:
            rle = segmentation
        counts = rle["counts"]
        return {"size": [self.height, self.width],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _refer_target(ref: dict[str, Any], image: dict[str, Any] | None, ann: dict[str, Any] | None,
                  where: str) -> ReferTarget | str:
    """The ground truth of ``ref`` (a checked ref), or why its samples are error samples: its image
    or annotation is missing (None), the annotation is of another image, or it has no segmentation
    (missing or null, as in :func:`unusable_images`; a polygon list without a polygon of 3 points is an
    empty mask, evaluated). A malformed segmentation raises :class:`DatasetError` naming the
    annotation (``where``: the instances file and the annotation's position)."""
    name = f"ref {ref['ref_id']}"
    if image is None:
        return f"{name}: its image_id {ref['image_id']} is not among the images of instances.json"
    if ann is None:
        return f"{name}: its ann_id {ref['ann_id']} is not among the annotations of instances.json"
    if ann["image_id"] != ref["image_id"]:
        return (f"{name}: its annotation {ref['ann_id']} belongs to image {ann['image_id']!r}, not to its "
                f"image {ref['image_id']}")
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            if not (isinstance(polygon, list) and len(polygon) % 2 == 0
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)):
                raise DatasetError(f"{where}.segmentation[{k}] must be a list of numbers x0, y0, x1, y1, ... "
                                   f"(an even count), got {polygon!r}")
    elif isinstance(segmentation, dict) and list(segmentation["size"]) != [image["height"], image["width"]]:
        raise DatasetError(f"{where}.segmentation has size {segmentation['size']!r}; its image is "
                           f"{[image['height'], image['width']]} (height, width)")
    if segmentation is None:
        return (f"{name}: its annotation {ref['ann_id']} has no segmentation: no ground-truth mask to "
                "evaluate against")
    return ReferTarget(str(ref["image_id"]), ref["ann_id"], image["height"], image["width"], segmentation)


def _refer_dataset(cfg: DatasetConfig) -> tuple[list[SampleEntry], dict[str, ReferTarget]]:
    """The samples of a res data set and, by sample id, the ground truth of those without error.

    A sample per sentence of each ref whose ``split`` is ``cfg.split`` (exactly, as the release's
    ``infer_attn_res.py``: ``test`` is RefCOCOg's test split, not RefCOCO's testA and testB), refs in
    file order, then sentences in order: ``sample_id`` ``<ref_id>-<sent_id>``, ``expression`` the
    sentence's ``sent`` (the tokenised, lower-case text the release asks about), image from
    instances.json. The samples of a ref without usable ground truth (:func:`_refer_target`) are
    error samples. Raises :class:`DatasetError` for a malformed file, a split no ref has (naming
    the file's splits) and two samples with one id.
    """
    refs_path, instances = Path(cfg.refs), Path(cfg.instances)
    refs = load_refs(refs_path)
    splits = {ref["split"] for ref in refs}
    if cfg.split not in splits:
        raise DatasetError(f"RefCOCO refs file {refs_path}: no ref has split {cfg.split!r} (datasets."
                           f"{cfg.name}.split); its splits: {sorted(splits)}")
    lists = validate_ground_truth(load_json(instances), instances, REFER_INSTANCES)
    images = {image["id"]: image for image in lists["images"]}
    annotations = {ann["id"]: i for i, ann in enumerate(lists["annotations"])}
    images_dir = Path(cfg.images)
    samples: list[SampleEntry] = []
    targets: dict[str, ReferTarget] = {}
    first_seen: dict[str, str] = {}
    for i, ref in enumerate(refs):
        if ref["split"] != cfg.split:
            continue
        image = images.get(ref["image_id"])
        index = annotations.get(ref["ann_id"])
        target = _refer_target(ref, image, None if index is None else lists["annotations"][index],
                               f"{REFER_INSTANCES.where(instances)}: annotations[{index}]")
        for j, sentence in enumerate(ref["sentences"]):
            sample_id = f"{ref['ref_id']}-{sentence['sent_id']}"
            if sample_id in first_seen:
                raise DatasetError(f"RefCOCO refs file {refs_path}: refs[{i}].sentences[{j}] has the sample "
                                   f"id {sample_id!r} (ref_id-sent_id) of {first_seen[sample_id]}")
            first_seen[sample_id] = f"refs[{i}].sentences[{j}]"
            samples.append(SampleEntry(
                sample_id, str(ref["image_id"]), images_dir / image["file_name"] if image else images_dir,
                image["width"] if image else None, image["height"] if image else None,
                error=target if isinstance(target, str) else None, expression=sentence["sent"]))
            if isinstance(target, ReferTarget):
                targets[sample_id] = target
    return samples, targets


def load_refer_ground_truth(cfg: DatasetConfig) -> dict[str, ReferTarget]:
    """Ground truth of a res data set: sample id -> :class:`ReferTarget`, for every sample of
    :func:`list_samples` that is not an error sample (same checks, same ids)."""
    _require_task(cfg, "res", "referring expression targets")
    return _refer_dataset(cfg)[1]


# ------------------------------------------------------------------------------------------------
# Panoptic narrative grounding (task png).

NARRATIVE_RULES = {"image_id": must_be("a string or an integer", lambda v: isinstance(v, str) or _is_int(v)),
                   "segments": LIST}
NARRATIVE_SEGMENT_RULES = {"utterance": STRING, "segment_ids": LIST}
PLURAL_RULE = {"plural": must_be("true or false", lambda v: isinstance(v, bool))}
PANOPTIC = GroundTruthSpec(
    kind="COCO panoptic", images=("id", "file_name", "width", "height"),
    annotations=("image_id", "file_name", "segments_info"), categories=("id", "name", "isthing"),
    rules=(*IMAGE_SIZE_RULES,
           FieldRule("annotations", "file_name", STRING),
           FieldRule("annotations", "segments_info", LIST),
           FieldRule("categories", "isthing", must_be("0 or 1", lambda v: v in (0, 1)))))
PANOPTIC_SEGMENT_RULES = {"id": INTEGER, "category_id": must_be("a number or a string",
                                                                 lambda v: isinstance(v, Hashable))}


def load_narratives(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load and check a PNG narratives file (``png_coco_val2017.json``: a list of narratives, each an
    object with at least ``image_id`` (string, or integer) and ``segments``, a list of objects with
    at least ``utterance`` (string) and ``segment_ids`` (a list of panoptic segment ids, integers or
    their decimal text, possibly empty), and ``plural`` (boolean) where ``segment_ids`` is not
    empty; other fields such as ``caption`` and ``noun`` are kept, unread). Returns the file's list
    unchanged; the segment ids' form is checked (:func:`_segment_ids`)."""
    path = Path(path)
    narratives = load_json(path)
    where = f"PNG narratives file {path}"
    if not isinstance(narratives, list):
        raise DatasetError(f"{where}: expected a JSON list at the top level, found "
                           f"{type(narratives).__name__}")
    for i, narrative in enumerate(narratives):
        _check_entry(narrative, f"[{i}]", where, NARRATIVE_RULES)
        for j, segment in enumerate(narrative["segments"]):
            name = f"[{i}].segments[{j}]"
            _check_entry(segment, name, where, NARRATIVE_SEGMENT_RULES)
            if _segment_ids(segment["segment_ids"], f"{where}: {name}"):
                _check_entry(segment, name, where, PLURAL_RULE)
    return narratives


def _segment_ids(values: list[Any], where: str) -> tuple[int, ...]:
    """A narrative segment's ``segment_ids`` as integers (an integer or its decimal text each)."""
    ids = []
    for k, value in enumerate(values):
        if _is_int(value):
            ids.append(value)
        elif isinstance(value, str) and value.isdecimal():
            ids.append(int(value))
        else:
            raise DatasetError(f"{where}.segment_ids[{k}] must be a segment id (an integer or its decimal "
                               f"text), got {value!r}")
    return tuple(ids)


def _panoptic_segments(lists: dict[str, list[dict[str, Any]]],
                       where: str) -> dict[str, tuple[dict[str, Any], dict[int, dict[str, Any]]]]:
    """Image id as text -> (its annotation, its ``segments_info`` by segment id) of a validated
    panoptic file; checks that each image has one annotation, each segment an integer ``id``
    unique in its image and a ``category_id`` among the categories."""
    categories = {category["id"] for category in lists["categories"]}
    by_image: dict[str, tuple[dict[str, Any], dict[int, dict[str, Any]]]] = {}
    for i, annotation in enumerate(lists["annotations"]):
        image_id = str(annotation["image_id"])
        if image_id in by_image:
            raise DatasetError(f"{where}: annotations[{i}] repeats image_id {annotation['image_id']!r} (one "
                               "annotation per image)")
        segments: dict[int, dict[str, Any]] = {}
        for j, segment in enumerate(annotation["segments_info"]):
            name = f"annotations[{i}].segments_info[{j}]"
            _check_entry(segment, name, where, PANOPTIC_SEGMENT_RULES)
            if segment["category_id"] not in categories:
                raise DatasetError(f"{where}: {name}.category_id {segment['category_id']!r} is not in "
                                   "categories")
            if segment["id"] in segments:
                raise DatasetError(f"{where}: {name} repeats segment id {segment['id']} of its image")
            segments[segment["id"]] = segment
        by_image[image_id] = (annotation, segments)
    return by_image


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG's pixels, ``R + 256 G + 256^2 B`` (panopticapi's
    ``rgb2id``): ``rgb`` (H, W, 3) uint8 -> (H, W) int64 (0: no segment)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_panoptic_ids(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """The (height, width) int64 segment-id map of the COCO panoptic PNG ``path`` (RGB, :func:`rgb2id`),
    checked to be ``height`` x ``width`` pixels as the panoptic file declares. Raises
    :class:`DatasetError` naming the file when it is missing, unreadable, not RGB or of another size."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"panoptic PNG not found: {path}")
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise DatasetError(f"panoptic PNG {path} has mode {image.mode}; expected RGB (segment id "
                                   "R + 256 G + 256^2 B)")
            rgb = np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"unreadable panoptic PNG {path}: {exc}") from None
    if rgb.shape[:2] != (height, width):
        raise DatasetError(f"panoptic PNG {path} is {rgb.shape[1]} x {rgb.shape[0]} pixels; the panoptic "
                           f"file declares {width} x {height}")
    return rgb2id(rgb)


@dataclass(frozen=True)
class PngTargetPhrase:
    """One evaluated phrase of a png sample: the narrative segment at ``phrase_index`` of its
    ``segments`` (the piece of the forced answer with that index), its ``utterance``, its panoptic
    segment ids, the file's ``plural`` and whether it counts as a thing (several segments: a plural
    phrase, counted as a thing as in the release; one segment: its category's ``isthing``)."""

    phrase_index: int
    utterance: str
    segment_ids: tuple[int, ...]
    plural: bool
    is_thing: bool

    def mask(self, id_map: np.ndarray) -> np.ndarray:
        """The phrase's ground-truth mask: (H, W) bool, the pixels of ``id_map`` ((H, W) segment ids,
        :func:`read_panoptic_ids`) that hold one of its segment ids."""
        return np.isin(id_map, self.segment_ids)


@dataclass(frozen=True)
class PngTarget:
    """The ground truth of one png sample: its image (string id, ``height`` x ``width`` pixels as the
    panoptic file declares), its panoptic PNG and its evaluated phrases (the narrative segments with
    segment ids, in order; none when it has none: the release skips such a narrative)."""

    image_id: str
    height: int
    width: int
    panoptic_png: Path
    phrases: tuple[PngTargetPhrase, ...]

    def masks(self) -> dict[int, np.ndarray]:
        """phrase_index -> the phrase's ground-truth mask, (height, width) bool, from one read of the
        panoptic PNG. A phrase whose segments have no pixel in it raises :class:`DatasetError` (the
        release asserts this never happens)."""
        id_map = read_panoptic_ids(self.panoptic_png, self.height, self.width)
        masks = {}
        for phrase in self.phrases:
            masks[phrase.phrase_index] = phrase.mask(id_map)
            if not masks[phrase.phrase_index].any():
                raise DatasetError(f"panoptic PNG {self.panoptic_png}: no pixel holds the segment ids "
                                   f"{list(phrase.segment_ids)} of phrase {phrase.phrase_index} "
                                   f"({phrase.utterance!r}) of image {self.image_id}")
        return masks


def _png_dataset(cfg: DatasetConfig) -> tuple[list[SampleEntry], dict[str, PngTarget]]:
    """The samples of a png data set and, by sample id, the ground truth of those without error.

    A sample per narrative, in file order: ``sample_id`` ``<image_id>-<k>`` (``k``: how many earlier
    narratives have that image), ``forced_answer`` the utterances of its segments in order, image
    from the panoptic file's images (ids compared as text), its PNG ``<panoptic_masks>/<file_name of
    its panoptic annotation>``. A narrative whose image or panoptic annotation is missing is an
    error sample. Raises :class:`DatasetError` for a malformed file and for a segment id that is not
    among its image's ``segments_info``.
    """
    narratives_path, panoptic_path = Path(cfg.narratives), Path(cfg.panoptic)
    narratives = load_narratives(narratives_path)
    lists = validate_ground_truth(load_json(panoptic_path), panoptic_path, PANOPTIC)
    segments_of = _panoptic_segments(lists, PANOPTIC.where(panoptic_path))
    images = {str(image["id"]): image for image in lists["images"]}
    is_thing = {category["id"]: bool(category["isthing"]) for category in lists["categories"]}
    images_dir, masks_dir = Path(cfg.images), Path(cfg.panoptic_masks)
    samples: list[SampleEntry] = []
    targets: dict[str, PngTarget] = {}
    seen: dict[str, int] = {}
    for i, narrative in enumerate(narratives):
        image_id = str(narrative["image_id"])
        sample_id = f"{image_id}-{seen.get(image_id, 0)}"
        seen[image_id] = seen.get(image_id, 0) + 1
        image = images.get(image_id)
        error = None
        if image is None:
            error = f"narrative [{i}]: image {image_id} is not among the images of the panoptic file"
        elif image_id not in segments_of:
            error = f"narrative [{i}]: image {image_id} has no annotation in the panoptic file"
        samples.append(SampleEntry(
            sample_id, image_id, images_dir / image["file_name"] if image else images_dir,
            image["width"] if image else None, image["height"] if image else None, error=error,
            forced_answer=tuple(segment["utterance"] for segment in narrative["segments"])))
        if error is not None:
            continue
        annotation, segments = segments_of[image_id]
        phrases = []
        for j, segment in enumerate(narrative["segments"]):
            where = f"PNG narratives file {narratives_path}: [{i}].segments[{j}]"
            ids = _segment_ids(segment["segment_ids"], where)
            if not ids:
                continue
            unknown = [segment_id for segment_id in ids if segment_id not in segments]
            if unknown:
                raise DatasetError(f"{where}.segment_ids: segment id {unknown[0]} is not among the "
                                   f"segments_info of image {image_id} in {panoptic_path}")
            thing = True if len(ids) > 1 else is_thing[segments[ids[0]]["category_id"]]
            phrases.append(PngTargetPhrase(j, segment["utterance"], ids, segment["plural"], thing))
        targets[sample_id] = PngTarget(image_id, image["height"], image["width"],
                                       masks_dir / annotation["file_name"], tuple(phrases))
    return samples, targets


def load_png_ground_truth(cfg: DatasetConfig) -> dict[str, PngTarget]:
    """Ground truth of a png data set: sample id -> :class:`PngTarget`, for every sample of
    :func:`list_samples` that is not an error sample (same checks, same ids). The PNGs are read by
    :meth:`PngTarget.masks`, not here."""
    _require_task(cfg, "png", "panoptic narrative targets")
    return _png_dataset(cfg)[1]


def list_image_folder(folder: str | os.PathLike) -> list[SampleEntry]:
    """Every image file directly in ``folder`` (extension in :data:`IMAGE_EXTENSIONS`, any case),
    sorted by file name, one sample each; ``image_id`` and ``sample_id`` are the file stem. Files
    sharing a stem (``x.jpg`` and ``x.png``) would share an id: they are one entry (the first file)
    with an ``error`` naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem: dict[str, list[Path]] = {}
    for file in files:
        by_stem.setdefault(file.stem, []).append(file)
    return [SampleEntry(stem, stem, group[0], None, None, None if len(group) == 1 else (
                f"{len(group)} files of {folder} would have image id {stem!r} "
                f"({', '.join(file.name for file in group)}): rename all but one"))
            for stem, group in by_stem.items()]


def list_samples(cfg: DatasetConfig) -> list[SampleEntry]:
    """The data set's samples in a fixed order (the order the manifest shards by).

    instance_seg: the instances file's images sorted by id, an id listed more than once given once
    (its first entry's file), each image of :func:`unusable_images` with its reason as ``error``;
    gcg: the mask file's images sorted by id, file ``<id>.jpg``; images: the folder's files sorted
    by name; in these three ``sample_id`` is the image id. res: a sample per sentence of each ref of
    ``cfg.split``, refs in file order, then sentences in order (:func:`_refer_dataset`); png: a
    sample per narrative, in file order (:func:`_png_dataset`). Files are ``<cfg.images>/...`` as
    configured (a relative folder stays relative); whether they exist is not checked here.
    """
    images_dir = Path(cfg.images)
    if cfg.task == "instance_seg":
        coco = load_coco_instances(cfg.instances)
        unusable = unusable_images(coco.images, coco.annotations)
        entries: dict[str, SampleEntry] = {}
        for im in sorted(coco.images, key=lambda im: im["id"]):
            image_id = str(im["id"])
            if image_id not in entries:
                entries[image_id] = SampleEntry(image_id, image_id, images_dir / im["file_name"], im["width"],
                                                im["height"], unusable.get(image_id))
        return list(entries.values())
    if cfg.task == "gcg":
        gcg = load_gcg(cfg.mask_gt, cfg.caption_gt)
        return [SampleEntry(im["id"], im["id"], images_dir / f"{im['id']}{GCG_IMAGE_EXTENSION}",
                            im["width"], im["height"])
                for im in sorted(gcg.images, key=lambda im: im["id"])]
    if cfg.task == "res":
        return _refer_dataset(cfg)[0]
    if cfg.task == "png":
        return _png_dataset(cfg)[0]
    return list_image_folder(images_dir)


def image_categories(coco: CocoInstances) -> dict[str, list[tuple[int, str]]]:
    """Ground-truth categories per image: image_id (str) -> [(category_id, name)] of the categories
    annotated in that image, without repeats, sorted by category id; every image of the file is a
    key (an image without annotations maps to [])."""
    names = {c["id"]: c["name"] for c in coco.categories}
    present: dict[str, set[int]] = {str(im["id"]): set() for im in coco.images}
    for ann in coco.annotations:
        present[str(ann["image_id"])].add(ann["category_id"])
    return {image_id: [(cid, names[cid]) for cid in sorted(ids)] for image_id, ids in present.items()}


def gt_categories(cfg: DatasetConfig) -> dict[str, list[tuple[int, str]]]:
    """:func:`image_categories` of an instance_seg data set's instances file."""
    _require_task(cfg, "instance_seg", "ground-truth categories")
    return image_categories(load_coco_instances(cfg.instances))
