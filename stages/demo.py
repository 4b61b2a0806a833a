"""Single-image attend-and-segment, as the release's demo: an image (or a folder) and a question in;
the answer with its phrases, an overlay PNG and a table of masks out.

It runs the pipeline's own stages (manifest rows, generate, phrases, segment) on one shard in
``out_dir`` with the model sections of a workflow config, then applies the release's demo filters
(docs/method.md, section 3):
- a phrase is kept when its best cosine similarity to a list of category names is >=
  ``category_thresh`` (0.70; the release compares the whole phrase, lower-cased and without a
  leading article, with the 80 COCO category names) and SAM's score is >= ``sam_score_thresh`` (0.85);
- kept masks are visited in the order of the answer (phrase, then mask index) and a mask whose IoU
  with an already kept one is above ``merge_iou`` (0.75) is merged into it (dropped): the earlier
  phrase's mask stands for both, as the release's ``merge_preds`` does, whatever the scores.

Outputs in ``out_dir``: ``manifest.parquet``, ``generations.parquet``, ``attention.zarr``,
``phrases.parquet``, ``masks.parquet`` (every mask), ``masks_kept.parquet`` (after the filters) and
``<image_id>_overlay.png`` per image. Every table carries its provenance record (:mod:`stages.provenance`);
``masks_kept.parquet``'s holds the filter settings and names the filter's text encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from stages import generate, phrases, provenance, segment
from stages.config import DATASET_HELP, from_mapping, read_sections
from stages.datasets import DatasetConfig, SampleEntry, list_image_folder
from stages.io.images import ImageError, load_rgb_array
from stages.io.tables import read_provenance, read_table, write_table
from stages.manifest import manifest_row
from stages.text_encoders import TransformerMeanEncoder, load_text_encoder
from stages.visualize import render_error, render_overlay

log = logging.getLogger(__name__)

COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class DemoFilter:
    """The demo's phrase and mask filters; ``enabled=False`` keeps every mask."""

    enabled: bool = True
    categories: tuple[str, ...] = COCO_CATEGORIES
    category_thresh: float = 0.70
    sam_score_thresh: float = 0.85
    merge_iou: float = 0.75


def demo_entries(image: str | Path) -> list[SampleEntry]:
    """One sample for an image file, or one for every image of a folder (sorted by name)."""
    image = Path(image)
    if image.is_dir():
        return list_image_folder(image)
    return [SampleEntry(sample_id=image.stem, image_id=image.stem, file=image, width=None, height=None)]


def keep_masks(masks: pd.DataFrame, text_encoder, demo_filter: DemoFilter) -> pd.Series:
    """Boolean Series (index of ``masks``): which mask rows pass the demo filters (see module doc)."""
    good = masks["error"].isna() & masks["rle_counts"].notna()
    keep = pd.Series(False, index=masks.index)
    if not demo_filter.enabled:
        return good
    if not good.any():
        return keep
    candidates = masks[good & (masks["score"] >= demo_filter.sam_score_thresh)]
    if candidates.empty:
        return keep
    texts = [phrases.normalise_category_text(t) for t in candidates["text"]]
    similarity = text_encoder.embed(texts) @ text_encoder.embed(list(demo_filter.categories)).T
    candidates = candidates[similarity.max(axis=1) >= demo_filter.category_thresh]
    for _, group in candidates.groupby("sample_id", sort=False):
        group = group.sort_values(["phrase_index", "mask_index"], kind="stable")
        rles = [{"size": [int(r.height), int(r.width)], "counts": r.rle_counts.encode()} for r in group.itertuples()]
        kept: list[int] = []
        for position, index in enumerate(group.index):
            if kept:
                iou = mask_utils.iou([rles[position]], [rles[k] for k in kept], [0] * len(kept))
                if np.max(iou) > demo_filter.merge_iou:
                    continue
            kept.append(position)
            keep[index] = True
    return keep


def run(config: Mapping[str, Any], image: str | Path, out_dir: str | Path, *, question: str | None = None,
        demo_filter: DemoFilter = DemoFilter(), device: str | None = None) -> pd.DataFrame:
    """Run attend-and-segment on ``image`` (file or folder) with ``config``'s lmm, generate, phrases,
    sam and segment sections; return the kept masks (MASKS rows) and write the outputs listed in the
    module docstring into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = demo_entries(image)
    folder = Path(image) if Path(image).is_dir() else Path(image).parent
    dataset = DatasetConfig(name="demo", task="images", images=str(folder))
    write_table([manifest_row(entry, 0, dataset) for entry in entries], out / "manifest.parquet", "manifest",
                provenance.record("manifest", "manifest", {"dataset": dataset, "shards": 1}))

    generate_section = dict(config.get("generate", {}))
    if question:
        generate_section["question"] = question
    generate.run(from_mapping(generate.GenerateConfig, generate_section, where="generate"),
                 from_mapping(generate.LMMConfig, config.get("lmm", {}), where="lmm"),
                 out / "manifest.parquet", 0, out / "generations.parquet", out / "attention.zarr", device=device)
    phrases_cfg = from_mapping(phrases.PhrasesConfig, config.get("phrases", {}), where="phrases")
    phrases.run(phrases_cfg, out / "generations.parquet", out / "phrases.parquet")
    segment.run(from_mapping(segment.SegmentConfig, config.get("segment", {}), where="segment"),
                from_mapping(segment.SamConfig, config.get("sam", {}), where="sam"),
                out / "manifest.parquet", out / "generations.parquet", out / "attention.zarr",
                out / "phrases.parquet", out / "masks.parquet", device=device)

    masks = read_table(out / "masks.parquet", "masks")
    encoder = None
    if demo_filter.enabled:
        encoder = load_text_encoder(phrases_cfg.text_encoder.kind, phrases_cfg.text_encoder.path,
                                    spacy_nlp=phrases.load_spacy(phrases_cfg.spacy_model))
    kept = masks[keep_masks(masks, encoder, demo_filter)]
    models = [provenance.model("text_encoder", encoder.name)] if isinstance(encoder, TransformerMeanEncoder) else []
    write_table(kept, out / "masks_kept.parquet", "masks",
                provenance.record("demo", "masks", {"demo_filter": demo_filter}, models=models,
                                  inputs=[read_provenance(out / "masks.parquet")]))

    generations = read_table(out / "generations.parquet", "generations").set_index("image_id")
    for entry in entries:
        try:
            picture = render_overlay(load_rgb_array(entry.file),
                                     kept[kept["image_id"] == entry.image_id].to_dict("records"))
        except ImageError as exc:
            picture = render_error(entry.image_id, str(exc))
        picture.save(out / f"{entry.image_id}_overlay.png")
        generation = generations.loc[entry.image_id]
        failed = isinstance(generation["error"], str)
        print(f"== {entry.image_id}: {'error: ' + generation['error'] if failed else generation['answer']}")
        for row in kept[kept["image_id"] == entry.image_id].itertuples():
            print(f"   {row.text!r}: score {row.score:.2f}, point ({row.point_x:.0f}, {row.point_y:.0f}), "
                  f"area {row.area}")
    return kept


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="an image file or a folder of images")
    parser.add_argument("--question", default=None, help="question (default: the config's generate.question)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default="config.yaml", help="workflow config giving the model sections")
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--device", default=None, help="cpu, cuda:N (default: cuda:0 when available)")
    parser.add_argument("--no-filter", action="store_true", help="keep every mask (no category/score/merge filter)")
    parser.add_argument("--categories", nargs="+", default=None, help="category names for the filter (default: COCO's 80)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = read_sections(args.config, args.dataset)
    demo_filter = DemoFilter(enabled=not args.no_filter)
    if args.categories:
        demo_filter = dataclasses.replace(demo_filter, categories=tuple(args.categories))
    run(config, args.image, args.out, question=args.question, demo_filter=demo_filter, device=args.device)


if __name__ == "__main__":
    main()
