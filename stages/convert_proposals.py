"""Convert the release's Co-DETR mask proposals for referring expression segmentation into a COCO
results JSON file.

Where the files come from: the release (github.com/Shengcao-Cao/groundLMM, README, section "Referring
Expression Segmentation and Panoptic Narrative Grounding") lists preprocessed files for download (one
archive on Google Drive), among them

- ``data/res/instances_refcoco_valtest.json``: images and annotations of the RES validation and test
  sets (COCO format; its ``images`` give each image's ``id``, ``height`` and ``width``);
- ``data/res/co_detr_retrain_inference_results.pkl``: the masks Co-DETR predicts on those images. The
  authors retrained Co-DETR without the RES validation and test images, so that its proposals are not
  contaminated with RefCOCO's evaluation images; only the masks are used, not the class predictions.

The release's ``aas/res.py`` reads the pickle as a list aligned with the JSON file's ``images``
(entry ``i`` holds the proposals of ``images[i]``), each entry a sequence whose ``entry[1]`` is the
list of masks, COCO compressed RLE dicts ``{"size": [height, width], "counts": bytes or str}``, and
``entry[2]`` their scores (a numpy array or a list), and ranks an image's masks by score, highest
first. The pickle is read with :func:`stages.io.safe_pickle.load_pickle` (plain values and numpy
arrays only: nothing in it is called).

Output: a JSON list in COCO results format, one element per proposal, images in the pickle's order and
an image's proposals in its entry's order: ``{"image_id": <that images entry's id>, "segmentation":
{"size": [height, width], "counts": str}, "score": float, "category_id": 1}`` (class-agnostic:
category 1 for every mask). Written atomically. A length mismatch or a malformed entry stops the
conversion with a message naming the entry's index (and the mask's).

CLI::

    python -m stages.convert_proposals --pickle co_detr_retrain_inference_results.pkl \\
        --images instances_refcoco_valtest.json --out proposals.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.datasets import DatasetError, load_json
from stages.io.atomic import atomic_path
from stages.io.safe_pickle import PickleFileError, load_pickle

PROPOSAL_CATEGORY_ID = 1
# Positions in a pickle entry (aas/res.py: pred[1], pred[2]).
MASKS_ITEM, SCORES_ITEM = 1, 2


class ProposalsError(ValueError):
    """The proposals pickle or its images file is malformed; the message names the file and entry."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``images`` list of a COCO-format file, each checked to have an ``id`` and a positive
    integer ``height`` and ``width``."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ProposalsError(f"images file {path}: expected a JSON object with an 'images' list")
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise ProposalsError(f"images file {path}: images[{i}] must be an object with an 'id'")
        for field in ("height", "width"):
            if not _positive_int(image.get(field)):
                raise ProposalsError(f"images file {path}: images[{i}].{field} must be a positive integer, "
                                     f"got {image.get(field)!r}")
    return data["images"]


def _counts_text(counts: Any, where: str) -> str:
    """An RLE's compressed ``counts`` (bytes or str) as text."""
    if isinstance(counts, bytes):
        try:
            return counts.decode("ascii")
        except UnicodeDecodeError:
            raise ProposalsError(f"{where}.counts is not compressed RLE text") from None
    if isinstance(counts, str):
        return counts
    raise ProposalsError(f"{where}.counts must be compressed RLE (bytes or str), found "
                         f"{type(counts).__name__}")


def _scores(scores: Any, count: int, where: str) -> list[float]:
    """An entry's scores (1-D numpy array or list of numbers) as finite floats, ``count`` of them."""
    if isinstance(scores, np.ndarray):
        if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
            raise ProposalsError(f"{where}: the scores must be a 1-D numeric array, found shape "
                                 f"{scores.shape} dtype {scores.dtype}")
        values = [float(score) for score in scores]
    elif isinstance(scores, (list, tuple)) and all(
            isinstance(score, (int, float, np.number)) and not isinstance(score, bool) for score in scores):
        values = [float(score) for score in scores]
    else:
        raise ProposalsError(f"{where}: the scores must be a numpy array or a list of numbers, found "
                             f"{type(scores).__name__}")
    if len(values) != count:
        raise ProposalsError(f"{where}: {count} masks but {len(values)} scores")
    if not all(math.isfinite(value) for value in values):
        raise ProposalsError(f"{where}: the scores must be finite, got {values}")
    return values


def convert(pickle_path: str | os.PathLike, images_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The proposals of the pickle ``pickle_path`` in COCO results format (see the module docstring),
    image ids and sizes from ``images_path``. Raises :class:`ProposalsError` (or the loaders'
    ``PickleFileError`` / ``DatasetError``) naming the file and the entry's index."""
    images = read_images(images_path)
    entries = load_pickle(pickle_path, "proposals pickle", allow_numpy=True)
    where = f"proposals pickle {pickle_path}"
    if not isinstance(entries, (list, tuple)):
        raise ProposalsError(f"{where}: expected a list of per-image entries, found {type(entries).__name__}")
    if len(entries) != len(images):
        raise ProposalsError(f"{where} has {len(entries)} entries but {images_path} has {len(images)} "
                             "images; entry i must hold the proposals of images[i]")
    results = []
    for i, (entry, image) in enumerate(zip(entries, images)):
        at = f"{where}: entry {i} (image {image['id']!r})"
        if not isinstance(entry, (list, tuple)) or len(entry) <= SCORES_ITEM:
            raise ProposalsError(f"{at} must be a sequence whose item {MASKS_ITEM} is the masks and item "
                                 f"{SCORES_ITEM} the scores, found {type(entry).__name__}")
        masks = entry[MASKS_ITEM]
        if not isinstance(masks, (list, tuple)):
            raise ProposalsError(f"{at}: item {MASKS_ITEM} (the masks) must be a list, found "
                                 f"{type(masks).__name__}")
        scores = _scores(entry[SCORES_ITEM], len(masks), at)
        size = [image["height"], image["width"]]
        for k, (mask, score) in enumerate(zip(masks, scores)):
            mask_at = f"{at} mask {k}"
            if not isinstance(mask, dict) or "size" not in mask or "counts" not in mask:
                raise ProposalsError(f"{mask_at} must be an RLE dict with 'size' and 'counts'")
            if not isinstance(mask["size"], (list, tuple)) or list(mask["size"]) != size:
                raise ProposalsError(f"{mask_at} has size {list(mask['size'])}; its image is {size} "
                                     "(height, width)")
            results.append({"image_id": image["id"],
                            "segmentation": {"size": size, "counts": _counts_text(mask["counts"], mask_at)},
                            "score": score, "category_id": PROPOSAL_CATEGORY_ID})
    return results


def write_results(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write ``results`` as JSON to ``path`` atomically (temporary sibling, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, allow_nan=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.convert_proposals",
                                     description=" ".join(__doc__.split("\n")[:2]))
    parser.add_argument("--pickle", required=True, type=Path,
                        help="the release's co_detr_retrain_inference_results.pkl")
    parser.add_argument("--images", required=True, type=Path,
                        help="the release's instances_refcoco_valtest.json (its images in the pickle's "
                             "order)")
    parser.add_argument("--out", required=True, type=Path, help="output: proposals in COCO results format")
    args = parser.parse_args(argv)
    try:
        results = convert(args.pickle, args.images)
    except (ProposalsError, PickleFileError, DatasetError) as exc:
        raise SystemExit(f"error: {exc}") from None
    write_results(results, args.out)
    print(f"{len(results)} proposals of {len({r['image_id'] for r in results})} images written to {args.out}")


if __name__ == "__main__":
    main()
