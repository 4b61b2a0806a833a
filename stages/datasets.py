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
as a ``KeyError`` deep inside a later stage. Image ids are strings everywhere in the pipeline (COCO's
integer ids are written as decimal text, see :mod:`schemas.artifacts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import ConfigError, from_mapping

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
    question: str | None = None
    max_pixels: int = 50_000_000

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
    ``name``)."""
    if "name" in entry:
        raise ConfigError(f"datasets.{name}: the key 'name' is not allowed (the entry's key is its name)")
    return from_mapping(DatasetConfig, {**entry, "name": name}, where=f"datasets.{name}")


def dataset_configs(section: Mapping[str, Mapping[str, Any]]) -> dict[str, DatasetConfig]:
    """Every data set of the config's ``datasets`` section, by name."""
    return {name: dataset_config(name, entry or {}) for name, entry in section.items()}


@dataclass(frozen=True)
class ImageEntry:
    """One image of a data set: its string id, its file, and the size its ground truth declares
    (pixels; ``None`` for a plain folder, which declares none)."""

    image_id: str
    file: Path
    width: int | None
    height: int | None


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
    """Parse a JSON file, raising :class:`DatasetError` for a missing or invalid file."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"ground-truth file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None


def _entries(data: Any, key: str, path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """``data[key]``, checked to be a list of objects that each have ``fields``."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}")
    if key not in data:
        raise DatasetError(f"{path}: missing top-level field {key!r}")
    entries = data[key]
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: field {key!r} must be a list, found {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {key}[{i}] must be an object, found {type(entry).__name__}")
        for field in fields:
            if field not in entry:
                raise DatasetError(f"{path}: {key}[{i}] has no field {field!r}")
    return entries


def _check_sizes(images: list[dict[str, Any]], path: Path) -> None:
    for i, image in enumerate(images):
        for field in ("width", "height"):
            value = image[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DatasetError(f"{path}: images[{i}].{field} must be a positive integer, got {value!r}")


def _check_unique_ids(entries: list[dict[str, Any]], key: str, path: Path) -> set[Any]:
    seen: set[Any] = set()
    for i, entry in enumerate(entries):
        if entry["id"] in seen:
            raise DatasetError(f"{path}: {key}[{i}] repeats id {entry['id']!r}")
        seen.add(entry["id"])
    return seen


def _check_segmentation(annotations: list[dict[str, Any]], path: Path) -> None:
    """A segmentation is a polygon list or an RLE object with ``counts`` and ``size``."""
    for i, ann in enumerate(annotations):
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            for field in ("counts", "size"):
                if field not in seg:
                    raise DatasetError(f"{path}: annotations[{i}].segmentation (RLE) has no field {field!r}")
        elif not isinstance(seg, list):
            raise DatasetError(f"{path}: annotations[{i}].segmentation must be a polygon list or an RLE "
                               f"object, found {type(seg).__name__}")


def _check_image_refs(annotations: list[dict[str, Any]], image_ids: set[Any], path: Path) -> None:
    for i, ann in enumerate(annotations):
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{path}: annotations[{i}].image_id {ann['image_id']!r} is not in images")


def load_coco_instances(path: str | os.PathLike) -> CocoInstances:
    """Load and validate a COCO instances file (ids unique, references resolved)."""
    path = Path(path)
    data = load_json(path)
    images = _entries(data, "images", path, ("id", "file_name", "width", "height"))
    annotations = _entries(data, "annotations", path, ("image_id", "category_id", "segmentation"))
    categories = _entries(data, "categories", path, ("id", "name"))
    _check_sizes(images, path)
    image_ids = _check_unique_ids(images, "images", path)
    category_ids = _check_unique_ids(categories, "categories", path)
    _check_image_refs(annotations, image_ids, path)
    for i, ann in enumerate(annotations):
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{path}: annotations[{i}].category_id {ann['category_id']!r} "
                               "is not in categories")
    _check_segmentation(annotations, path)
    return CocoInstances(path, images, annotations, categories)


def load_gcg(mask_gt: str | os.PathLike, caption_gt: str | os.PathLike) -> GcgGroundTruth:
    """Load and validate a GranD-f pair (mask file with category_id 1, caption file with labels)."""
    mask_path, caption_path = Path(mask_gt), Path(caption_gt)
    data = load_json(mask_path)
    images = _entries(data, "images", mask_path, ("id", "width", "height"))
    annotations = _entries(data, "annotations", mask_path, ("image_id", "category_id", "segmentation"))
    _check_sizes(images, mask_path)
    for i, image in enumerate(images):
        if not isinstance(image["id"], str):
            raise DatasetError(f"{mask_path}: images[{i}].id must be a string (the image file is "
                               f"<id>{GCG_IMAGE_EXTENSION}), got {image['id']!r}")
    image_ids = _check_unique_ids(images, "images", mask_path)
    _check_image_refs(annotations, image_ids, mask_path)
    for i, ann in enumerate(annotations):
        if ann["category_id"] != GCG_CATEGORY_ID:
            raise DatasetError(f"{mask_path}: annotations[{i}].category_id must be {GCG_CATEGORY_ID} "
                               f"(class-agnostic), got {ann['category_id']!r}")
    _check_segmentation(annotations, mask_path)

    captions = _entries(load_json(caption_path), "annotations", caption_path,
                        ("image_id", "caption", "labels"))
    for i, cap in enumerate(captions):
        if not isinstance(cap["caption"], str):
            raise DatasetError(f"{caption_path}: annotations[{i}].caption must be a string")
        if not isinstance(cap["labels"], list) or not all(isinstance(t, str) for t in cap["labels"]):
            raise DatasetError(f"{caption_path}: annotations[{i}].labels must be a list of strings")
        if cap["image_id"] not in image_ids:
            raise DatasetError(f"{caption_path}: annotations[{i}].image_id {cap['image_id']!r} is not an "
                               f"image of {mask_path}")
    return GcgGroundTruth(mask_path, caption_path, images, annotations, captions)


def list_image_folder(folder: str | os.PathLike) -> list[ImageEntry]:
    """Every image file directly in ``folder`` (extension in :data:`IMAGE_EXTENSIONS`, any case),
    sorted by file name; ``image_id`` is the file stem, which must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem: dict[str, Path] = {}
    for file in files:
        if file.stem in by_stem:
            raise DatasetError(f"{folder}: {by_stem[file.stem].name} and {file.name} would both have "
                               f"image id {file.stem!r}")
        by_stem[file.stem] = file
    return [ImageEntry(stem, file, None, None) for stem, file in by_stem.items()]


def list_images(cfg: DatasetConfig) -> list[ImageEntry]:
    """The data set's images in a fixed order (the order the manifest shards by).

    instance_seg: the instances file's images sorted by id; gcg: the mask file's images sorted by
    id, file ``<id>.jpg``; images: the folder's files sorted by name. Files are ``<cfg.images>/...``
    as configured (a relative folder stays relative); whether they exist is not checked here.
    """
    images_dir = Path(cfg.images)
    if cfg.task == "instance_seg":
        coco = load_coco_instances(cfg.instances)
        return [ImageEntry(str(im["id"]), images_dir / im["file_name"], im["width"], im["height"])
                for im in sorted(coco.images, key=lambda im: im["id"])]
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
