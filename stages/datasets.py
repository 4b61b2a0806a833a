"""Data sets: their config, their ground-truth files and the list of their images.

Three kinds of data set (``task``):

- ``instance_seg``: a COCO instances file (``images[id, file_name, width, height]``,
  ``annotations[image_id, category_id, segmentation]``, ``categories[id, name]``); the image of
  ``images[i]`` is ``<images>/<file_name>``.
- ``gcg``: a GranD-f pair as in GLaMM's protocol: ``*_gcg_coco_mask_gt.json`` (COCO format,
  ``category_id`` 1, string image ids) and ``*_gcg_coco_caption_gt.json`` (``annotations`` with
  ``image_id``, ``caption``, ``labels``); the image of id ``I`` is ``<images>/I.jpg``.
- ``images``: a plain folder; every file with an image extension is an image whose id is the file's
  stem.

Every loader checks the fields the pipeline reads and raises :class:`DatasetError` with a message
naming the file, the entry and the missing or wrong field, so that a bad file fails at once instead of
as a ``KeyError`` deep inside a later stage. The checks are one validator,
:func:`validate_ground_truth`, driven by a :class:`GroundTruthSpec` per kind of file; the evaluators
(:mod:`stages.evaluation`) use it too, with specs that also require the fields COCOeval reads.

Two faults of a COCO instances file concern one image only and become that image's error row
instead of stopping the run (:func:`unusable_images`): an image id listed more than once (the
annotations of that id cannot be told apart) and an annotation without ``segmentation`` (missing or
null: there is no ground-truth mask to evaluate against). The manifest gives such an image an error
row, and the evaluator leaves it out (its annotations and predictions are not counted, see
:mod:`stages.evaluate_coco`). Every other fault of a ground-truth file stops the job.

Image ids are strings everywhere in the pipeline (COCO's integer ids are written as decimal text, see
:mod:`schemas.artifacts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import DATASET_SECTIONS, ConfigError, from_mapping, schema_default

TASKS = ("instance_seg", "gcg", "images")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GCG_IMAGE_EXTENSION = ".jpg"
GCG_CATEGORY_ID = 1

# Ground-truth files each task needs (DatasetConfig field names).
_TASK_FILES = {"instance_seg": ("instances",), "gcg": ("mask_gt", "caption_gt"), "images": ()}


class DatasetError(ValueError):
    """A ground-truth file or image folder is missing or malformed; the message names it."""


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of the config's ``datasets`` section.

    ``images`` is the image folder; ``instances`` (instance_seg) or ``mask_gt`` + ``caption_gt``
    (gcg) are the ground-truth files; ``question`` overrides the generate stage's default question;
    images with more than ``max_pixels`` pixels become error rows of the manifest.
    """

    name: str
    task: str
    images: str
    instances: str | None = None
    mask_gt: str | None = None
    caption_gt: str | None = None
    question: str | None = schema_default("datasets", "*", "question")
    max_pixels: int = schema_default("datasets", "*", "max_pixels")

    def __post_init__(self) -> None:
        where = f"datasets.{self.name}"
        if self.task not in TASKS:
            raise ConfigError(f"{where}.task is {self.task!r}; expected one of {list(TASKS)}")
        for field in _TASK_FILES[self.task]:
            if not getattr(self, field):
                raise ConfigError(f"{where}: task {self.task!r} needs the key {field!r}")
        for field in {"instances", "mask_gt", "caption_gt"} - set(_TASK_FILES[self.task]):
            if getattr(self, field) is not None:
                raise ConfigError(f"{where}.{field} is not used by task {self.task!r}; remove it")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ConfigError(f"{where}.max_pixels must be a positive integer, got {self.max_pixels!r}")


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
class ImageEntry:
    """One image of a data set: its string id, its file, the size its ground truth declares
    (pixels; ``None`` for a plain folder, which declares none), and why its ground truth cannot be
    used (``None`` when it can; see :func:`unusable_images`)."""

    image_id: str
    file: Path
    width: int | None
    height: int | None
    error: str | None = None


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
    ``"id"``, ``annotations`` includes ``"image_id"``); ``rules``: further checks of field values.
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
    those lists). Raises :class:`DatasetError` naming the file, the entry and the field. Linear in
    the number of entries.
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
        if key in lists:
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


def list_image_folder(folder: str | os.PathLike) -> list[ImageEntry]:
    """Every image file directly in ``folder`` (extension in :data:`IMAGE_EXTENSIONS`, any case),
    sorted by file name; ``image_id`` is the file stem. Files sharing a stem (``x.jpg`` and
    ``x.png``) would share an id: they are one entry (the first file) with an ``error`` naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem: dict[str, list[Path]] = {}
    for file in files:
        by_stem.setdefault(file.stem, []).append(file)
    return [ImageEntry(stem, group[0], None, None, None if len(group) == 1 else (
                f"{len(group)} files of {folder} would have image id {stem!r} "
                f"({', '.join(file.name for file in group)}): rename all but one"))
            for stem, group in by_stem.items()]


def list_images(cfg: DatasetConfig) -> list[ImageEntry]:
    """The data set's images in a fixed order (the order the manifest shards by).

    instance_seg: the instances file's images sorted by id, an id listed more than once given once
    (its first entry's file), each image of :func:`unusable_images` with its reason as ``error``;
    gcg: the mask file's images sorted by id, file ``<id>.jpg``; images: the folder's files sorted
    by name. Files are ``<cfg.images>/...`` as configured (a relative folder stays relative);
    whether they exist is not checked here.
    """
    images_dir = Path(cfg.images)
    if cfg.task == "instance_seg":
        coco = load_coco_instances(cfg.instances)
        unusable = unusable_images(coco.images, coco.annotations)
        entries: dict[str, ImageEntry] = {}
        for im in sorted(coco.images, key=lambda im: im["id"]):
            image_id = str(im["id"])
            if image_id not in entries:
                entries[image_id] = ImageEntry(image_id, images_dir / im["file_name"], im["width"],
                                               im["height"], unusable.get(image_id))
        return list(entries.values())
    if cfg.task == "gcg":
        gcg = load_gcg(cfg.mask_gt, cfg.caption_gt)
        return [ImageEntry(im["id"], images_dir / f"{im['id']}{GCG_IMAGE_EXTENSION}",
                           im["width"], im["height"])
                for im in sorted(gcg.images, key=lambda im: im["id"])]
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
    if cfg.task != "instance_seg":
        raise DatasetError(f"data set {cfg.name!r} has task {cfg.task!r}; ground-truth categories exist "
                           "only for instance_seg")
    return image_categories(load_coco_instances(cfg.instances))
