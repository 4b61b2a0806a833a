"""Precomputed mask proposals as a mask source (``segment.mask_source: proposals``).

Instead of prompting SAM with a phrase's attention peak, the peak picks one of a detector's or a
panoptic segmenter's precomputed masks for the image, as the release's later snapshots do for
referring expressions (Co-DETR instance masks) and narratives (OpenSeeD panoptic segments):

- :class:`InstanceProposals`: a COCO results file (a JSON list of ``{"image_id", "segmentation":
  {"size": [height, width], "counts"}, "score"}``, compressed RLE, e.g. written by
  ``python -m stages.convert_proposals`` from the release's Co-DETR pickle). The prediction for a
  point is the highest-scoring mask of the image that contains it (ties: the earlier entry of the
  file); none when no mask does.
- :class:`PanopticProposals`: a panoptic prediction: a folder of PNGs whose pixels encode segment ids
  as ``R + 256 G + 256^2 B`` (panopticapi's ``rgb2id``), with or without its COCO panoptic JSON
  (``annotations``, one per image: ``image_id``, ``file_name`` of its PNG, ``segments_info`` with each
  segment's ``id`` and, optionally, ``score``). Without the JSON (the release's OpenSeeD results), an
  image's PNG is named after its image file (``<stem>.png``) and every nonzero id is a segment of
  score 1. The prediction for a point is the segment under it; a pixel of id 0, or of an id the JSON
  does not list, is void: no mask (the release takes the region of whatever id is under the point,
  void included).

Points are ``(x, y)`` = (column, row) pixel indices of the original image (:mod:`schemas.artifacts`);
a point lies in a mask when ``mask[y, x]`` is set. Image ids are compared as text. Masks come back
as bool ``(height, width)`` arrays at the image's size; a proposal of another size is an error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.datasets import DatasetError, load_json


class ProposalError(ValueError):
    """A proposal cannot be used for this image (its size differs from the image's); the message says why."""


@dataclass(frozen=True)
class Proposal:
    """The proposal picked for a point: its bool ``(height, width)`` mask and its score."""

    mask: np.ndarray
    score: float


def _is_size(size: Any) -> bool:
    """Whether ``size`` is an RLE's ``[height, width]``: two non-negative integers."""
    return (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in size))


def _check_size(found: tuple[int, int], height: int, width: int, what: str) -> None:
    if tuple(found) != (height, width):
        raise ProposalError(f"{what} is {found[0]} x {found[1]} pixels (height x width), the image "
                            f"{height} x {width}")


class InstanceProposals:
    """Instance masks with scores in COCO results format, by image (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        results = load_json(self.path)
        if not isinstance(results, list):
            raise DatasetError(f"proposals file {self.path}: expected a JSON list of COCO results, found "
                               f"{type(results).__name__}")
        by_image: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
        for i, result in enumerate(results):
            segmentation = result.get("segmentation") if isinstance(result, dict) else None
            score = result.get("score") if isinstance(result, dict) else None
            if not (isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys()
                    and _is_size(segmentation["size"])
                    and isinstance(segmentation["counts"], (str, bytes)) and "image_id" in result
                    and isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)):
                raise DatasetError(f"proposals file {self.path}: entry [{i}] needs image_id, a finite numeric score "
                                   "and a compressed RLE segmentation {size: [height, width], counts: "
                                   "string} (uncompressed RLE, a list of counts, and polygons are not read)")
            by_image.setdefault(str(result["image_id"]), []).append((-float(result["score"]), i, segmentation))
        self._by_image = {image_id: sorted(entries, key=lambda e: e[:2]) for image_id, entries in by_image.items()}

    def mask_at(self, image_id: str, image_file: str, x: int, y: int, height: int, width: int) -> Proposal | None:
        """The highest-scoring mask of ``image_id`` containing pixel ``(x, y)``; None when none does
        (``image_file`` is not needed: masks are found by image id)."""
        from pycocotools import mask as mask_utils

        for negative_score, i, segmentation in self._by_image.get(str(image_id), []):
            _check_size(segmentation["size"], height, width, f"proposal [{i}] of {self.path}")
            counts = segmentation["counts"]
            rle = {"size": list(segmentation["size"]),
                   "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            mask = mask_utils.decode(rle).astype(bool)
            if mask[y, x]:
                return Proposal(mask, -negative_score)
        return None


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG's ``(H, W, 3)`` uint8 pixels: ``R + 256 G + 256^2 B`` as int64
    ``(H, W)`` (panopticapi's ``rgb2id``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_panoptic_ids(path: str | os.PathLike) -> np.ndarray:
    """The int64 ``(H, W)`` segment ids of a panoptic PNG (:func:`rgb2id` of its RGB pixels)."""
    from PIL import Image

    with Image.open(path) as image:
        return rgb2id(np.asarray(image.convert("RGB")))


class PanopticProposals:
    """A panoptic prediction (a PNG folder, optionally with its COCO panoptic JSON), by image (see the
    module docstring). One image's segment ids are decoded at a time and kept until another image is
    asked for."""

    def __init__(self, folder: str | os.PathLike, json_path: str | os.PathLike | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetError(f"panoptic proposals folder not found: {self.folder}")
        self.json_path = None if json_path is None else Path(json_path)
        # image id -> (PNG file name, segment id -> score); None without a JSON (every nonzero id, score 1)
        self._by_image: dict[str, tuple[str, dict[int, float]]] | None = None
        if self.json_path is not None:
            self._by_image = self._read_json(self.json_path)
        self._cached: tuple[Path, np.ndarray] | None = None

    @staticmethod
    def _read_json(path: Path) -> dict[str, tuple[str, dict[int, float]]]:
        data = load_json(path)
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            raise DatasetError(f"panoptic proposals file {path}: expected an object with a list 'annotations'")
        by_image = {}
        for i, annotation in enumerate(annotations):
            if not (isinstance(annotation, dict) and {"image_id", "file_name", "segments_info"} <= annotation.keys()
                    and isinstance(annotation["segments_info"], list)
                    and all(isinstance(s, dict) and "id" in s for s in annotation["segments_info"])):
                raise DatasetError(f"panoptic proposals file {path}: annotations[{i}] needs image_id, file_name "
                                   "and segments_info (each with an id)")
            try:
                scores = {int(s["id"]): float(s.get("score", 1.0)) for s in annotation["segments_info"]}
            except (TypeError, ValueError):
                raise DatasetError(f"panoptic proposals file {path}: annotations[{i}].segments_info holds a "
                                   "segment whose id is not an integer or whose score is not a number") from None
            by_image[str(annotation["image_id"])] = (annotation["file_name"], scores)
        return by_image

    def _ids(self, png: Path) -> np.ndarray:
        if self._cached is None or self._cached[0] != png:
            if not png.is_file():
                raise ProposalError(f"panoptic prediction {png} not found")
            self._cached = (png, read_panoptic_ids(png))
        return self._cached[1]

    def mask_at(self, image_id: str, image_file: str, x: int, y: int, height: int, width: int) -> Proposal | None:
        """The segment of ``image_id`` (whose image file is ``image_file``) under pixel ``(x, y)``; None on
        void and, with a JSON, for an image it does not list."""
        if self._by_image is None:
            png, scores = self.folder / f"{Path(image_file).stem}.png", None
        elif str(image_id) in self._by_image:
            file_name, scores = self._by_image[str(image_id)]
            png = self.folder / file_name
        else:
            return None
        ids = self._ids(png)
        _check_size(ids.shape, height, width, f"panoptic prediction {png}")
        segment = int(ids[y, x])
        if segment == 0 or (scores is not None and segment not in scores):
            return None
        return Proposal(ids == segment, 1.0 if scores is None else scores[segment])


def load_proposals(path: str | os.PathLike | None,
                   folder: str | os.PathLike | None) -> InstanceProposals | PanopticProposals:
    """A data set's proposals (its keys ``proposals`` and ``proposals_folder``): panoptic when ``folder``
    (the PNGs) is given, ``path`` then being its JSON if any; else instance masks in COCO results
    format at ``path``."""
    if folder is not None:
        return PanopticProposals(folder, path)
    if path is None:
        raise DatasetError("segment.mask_source proposals: the data set names neither proposals nor "
                           "proposals_folder")
    return InstanceProposals(path)
