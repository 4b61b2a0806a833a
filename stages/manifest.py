"""Stage `manifest`: one row per sample of a data set (an image and what is asked about it), with the
image's size and the sample's shard.

The sample list and its order come from :func:`stages.datasets.list_samples` (one sample per image
for instance segmentation, GCG and folders; one per referring sentence or narrative for ``res`` and
``png``, with the expression or the forced answer); sample ``i`` of that order goes to shard ``i %
shards``, so the split is deterministic and the shards differ in size by at most one sample. Sizes
are read from the image headers (no pixel decoding), once per image file. An image that cannot be
used (listed in the ground truth but missing, unreadable, empty, more than ``max_pixels`` pixels,
or with ground truth that cannot be used: :func:`stages.datasets.unusable_images`) makes each of its
samples a row with an ``error``, which keeps its shard. So does an image whose header size differs from the size
its ground truth declares: its masks (the header's size) could not be compared with its
annotations; when the file's EXIF orientation turns it to the declared size, the message says so.
Sizes are those of the stored pixel grid; EXIF orientation is never applied
(:mod:`stages.io.images`), as in COCO, whose annotations are in stored-pixel coordinates.

CLI::

    python -m stages.manifest --config config.yaml --dataset toy_gcg --out manifest.parquet [--shards N]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages import provenance
from stages.config import ConfigError, read_sections, schema_default
from stages.datasets import DatasetConfig, SampleEntry, dataset_config, list_samples
from stages.io.images import ImageError, exif_orientation, image_size
from stages.io.tables import write_table

log = logging.getLogger(__name__)


def _ground_truth_files(cfg: DatasetConfig) -> str:
    return ", ".join(cfg.ground_truth_files())


def manifest_row(entry: SampleEntry, shard: int, cfg: DatasetConfig,
                 sizes: dict[Path, tuple[int, int] | str] | None = None) -> dict[str, Any]:
    """The manifest row of one sample (see :data:`schemas.artifacts.MANIFEST`). ``sizes`` caches each
    image file's header size (or the reason it cannot be read) across the samples of one image."""
    row: dict[str, Any] = {"sample_id": entry.sample_id, "image_id": entry.image_id, "file": str(entry.file),
                           "width": None, "height": None, "expression": entry.expression,
                           "forced_answer": None if entry.forced_answer is None else list(entry.forced_answer),
                           "shard": shard, "error": None}
    if entry.error is not None:   # the data set's listing says why (a repeated id, unusable ground truth)
        files = _ground_truth_files(cfg)
        row["error"] = f"ground truth {files}: {entry.error}" if files else entry.error
        return row
    if cfg.task != "images" and not entry.file.exists():
        row["error"] = f"image listed in {_ground_truth_files(cfg)} not found on disk: {entry.file}"
        return row
    sizes = {} if sizes is None else sizes
    if entry.file not in sizes:
        try:
            sizes[entry.file] = image_size(entry.file)
        except ImageError as exc:
            sizes[entry.file] = str(exc)
    if isinstance(sizes[entry.file], str):
        row["error"] = sizes[entry.file]
        return row
    width, height = sizes[entry.file]
    row["width"], row["height"] = width, height
    if width < 1 or height < 1:
        row["error"] = f"image has zero size {width} x {height}"
    elif width * height > cfg.max_pixels:
        row["error"] = (f"image has {width} x {height} = {width * height} pixels, "
                        f"above max_pixels={cfg.max_pixels}")
    elif entry.width is not None and (entry.width, entry.height) != (width, height):
        row["error"] = (f"image is {width} x {height} pixels in its file but {entry.width} x {entry.height} "
                        f"in {_ground_truth_files(cfg)}: its masks would not fit its annotations")
        orientation = exif_orientation(entry.file)
        if orientation in (5, 6, 7, 8) and (entry.width, entry.height) == (height, width):
            row["error"] += (f"; its EXIF orientation {orientation} shows it turned to {height} x {width}, but "
                             "the pipeline uses the stored pixel grid (as COCO does), so the ground truth "
                             "must declare the stored size and be drawn on it")
    return row


def run(dataset_cfg: DatasetConfig, shards: int, manifest_path: str | os.PathLike) -> pa.Table:
    """Write the manifest of ``dataset_cfg`` to ``manifest_path`` and return the table written.

    ``shards`` (>= 1) is the number of shards; row order is the data set's sample order. Its provenance
    record holds the data set's entry and ``shards``.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive integer, got {shards!r}")
    sizes: dict[Path, tuple[int, int] | str] = {}
    rows = [manifest_row(entry, position % shards, dataset_cfg, sizes)
            for position, entry in enumerate(list_samples(dataset_cfg))]
    failed = sum(row["error"] is not None for row in rows)
    log.info("%s: %d samples of %d images in %d shards, %d error rows", dataset_cfg.name, len(rows), len(sizes),
             shards, failed)
    record = provenance.record("manifest", "manifest", {"dataset": dataset_cfg, "shards": shards})
    return write_table(rows, manifest_path, "manifest", record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.manifest", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the pipeline's config.yaml")
    parser.add_argument("--dataset", required=True, help="name of the data set in the config's `datasets`")
    parser.add_argument("--out", required=True, type=Path, help="manifest Parquet file to write")
    parser.add_argument("--shards", type=int, help="number of shards (default: the config's `shards`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = read_sections(args.config)
    datasets = config.get("datasets") or {}
    if args.dataset not in datasets:
        raise SystemExit(f"data set {args.dataset!r} is not in {args.config}; known: {sorted(datasets)}")
    shards = args.shards if args.shards is not None else config.get("shards", schema_default("shards"))
    run(dataset_config(args.dataset, datasets[args.dataset]), shards, args.out)


if __name__ == "__main__":
    main()
