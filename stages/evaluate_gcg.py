"""Grounded conversation generation (GCG) evaluation, GLaMM's protocol (docs/method.md, section 4).

Ground truth is GranD-f's pair of COCO-format files: ``*_gcg_coco_mask_gt.json`` (masks,
category_id 1, string image ids) and ``*_gcg_coco_caption_gt.json`` (annotations with
``image_id``, ``caption`` and ``labels``, the labels in the order of the image's mask
annotations). Metrics: METEOR and CIDEr of the caption, class-agnostic mask AP50, mIoU and
recall, as GLaMM's ``eval/gcg/evaluate.py`` computes them (mbzuai-oryx/groundingLMM).

    python -m stages.evaluate_gcg --mask-gt val_gcg_coco_mask_gt.json \\
        --caption-gt val_gcg_coco_caption_gt.json --manifest manifest.parquet \\
        --generations generations/shard-*.parquet --masks masks/shard-*.parquet \\
        --mask-predictions mask_predictions.json --caption-predictions caption_predictions.json \\
        --metrics metrics.json --text-encoder bert-base-uncased
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from schemas.artifacts import METRICS_PROVENANCE_FIELD
from stages import provenance
from stages.config import ConfigError, schema_default
from stages.evaluation import (
    GCG_CAPTION_GT,
    GCG_MASK_GT,
    check_mask_size,
    check_rows_belong,
    coco_segm_summary,
    concat_tables,
    good_rows,
    greedy_admissible_pairs,
    greedy_positive_pairs,
    gt_image_ids,
    iou_matrix,
    load_ground_truth,
    read_manifest_image_ids,
    results_coco,
    rle_of,
    write_json,
)
from stages.io.tables import read_provenance, read_tables
from stages.text_encoders import TextEncoder, TransformerMeanEncoder

log = logging.getLogger(__name__)

# GLaMM writes every mask prediction with category 1 and score 1.0 (the model gives no score).
GCG_CATEGORY_ID = 1
GCG_SCORE = 1.0
REQUIRED_MASK_COLUMNS = ("phrase_index", "text", "score", "rle_counts", "height", "width")


@dataclass(frozen=True)
class GcgEvalConfig:
    """Config section ``evaluate.gcg``.

    text_encoder: transformer (folder, hub id or ``python:<module>``) whose mean-pooled last hidden
        states give the text similarity of recall (GLaMM: bert-base-uncased).
    iou_thresh: recall's IoU threshold, in (0, 1].
    text_sim_thresh: recall's text-similarity (cosine) threshold, in [-1, 1].
    """

    text_encoder: str = schema_default("evaluate", "gcg", "text_encoder")
    iou_thresh: float = schema_default("evaluate", "gcg", "iou_thresh")
    text_sim_thresh: float = schema_default("evaluate", "gcg", "text_sim_thresh")

    def __post_init__(self):
        if not 0 < self.iou_thresh <= 1:
            raise ConfigError(f"evaluate.gcg.iou_thresh must be in (0, 1], got {self.iou_thresh}")
        if not -1 <= self.text_sim_thresh <= 1:
            raise ConfigError(f"evaluate.gcg.text_sim_thresh must be in [-1, 1], got {self.text_sim_thresh}")


@dataclass(frozen=True)
class _ImageMasks:
    """One image's predicted masks, one per phrase in phrase order, with the phrases' text."""

    labels: list[str]
    rles: list[dict[str, Any]]


class GcgEvaluator:
    """GLaMM's GCG metrics of one data set (GranD-f val or test).

    Use it as detectron2's evaluators: ``reset()``, then ``process(generations, masks)`` for each
    shard (or once with all shards), then ``evaluate()`` -> ``{"gcg": {metric: value}}``.
    :meth:`caption_metrics` (Java, slow to start), :meth:`mask_metrics` and :meth:`counts` can be
    called alone.

    Definitions:

    - Evaluated images: all of ``image_ids`` (the manifest's images), each of which must be in both
      ground-truth files and have at least one caption annotation.
    - Predicted caption: the image's generation ``answer``, stripped; an image without a
      generation row or with only an error row gets the empty caption and still counts.
    - Predicted masks: one per phrase, from the mask rows without error. When a phrase has several
      masks (``segment.more_masks``) the one with the highest SAM score is kept (ties: lowest
      ``mask_index``); GLaMM's models emit one mask per phrase, so this keeps GLaMM's one mask per
      label. A mask's label is its phrase's text. As in GLaMM, every prediction has category 1 and
      score 1.0, so COCOeval ranks an image's masks in phrase order.
    - ``METEOR``, ``CIDEr``: pycocoevalcap scorers (as COCOEvalCap runs them) on PTB-tokenised
      captions over the evaluated images; the references of an image are all of its caption
      annotations. None when no image is evaluated.
    - ``AP50``: COCOeval segm, ``params.catIds = [1]`` and pycocotools' default ``useCats=1``
      (GLaMM changes nothing else), restricted to the evaluated images.
    - ``mIoU``: for each evaluated image, the IoU matrix predictions x ground-truth masks (all of
      the image's mask annotations) is paired greedily one to one (:func:`greedy_positive_pairs`:
      largest IoU first, ties to the earlier prediction then the earlier ground truth, stop at
      IoU 0); the image's value is the mean of the paired IoUs, 0 when nothing is paired (no
      prediction, no ground truth, or no overlap). ``mIoU`` is the mean over evaluated images.
    - ``recall``: ground-truth phrases are the ``labels`` of the image's first caption annotation,
      label i naming mask annotation i. Per image, GLaMM's greedy loop
      (:func:`greedy_admissible_pairs`) on the ground truth x predictions IoU matrix takes the
      largest remaining IoU (ties to the earlier ground truth, then the earlier prediction); the
      pair counts when IoU >= ``iou_thresh`` and text similarity >= ``text_sim_thresh``, and the
      loop stops at the first pair that does not (a lower-IoU pair is never tried). Text
      similarity is the cosine of the encoder's embeddings (each distinct label embedded once for
      the whole data set). ``recall`` = matched ground-truth phrases / all ground-truth phrases of
      the evaluated images; None when there is none (GLaMM prints 0).
    - Counts: ``num_images``, ``num_images_with_answer`` (non-empty caption),
      ``num_images_with_predictions`` (at least one mask), ``num_predictions`` (masks after the
      one-per-phrase choice), ``num_generation_error_rows`` and ``num_mask_error_rows`` (error
      rows of each table; an upstream error may appear in both), ``num_gt_phrases``,
      ``num_matched_phrases``.

    Linear in images, annotations and rows; only the per-image IoU matrices are pairwise.
    """

    def __init__(self, mask_gt: COCO, caption_gt: COCO, image_ids: Sequence[str], text_encoder: TextEncoder,
                 *, iou_thresh: float, text_sim_thresh: float,
                 mask_source: str = "the mask ground truth",
                 caption_source: str = "the caption ground truth"):
        self._mask_gt = mask_gt
        self._caption_gt = caption_gt
        self._image_ids = list(image_ids)
        self._mask_ids = gt_image_ids(self._image_ids, mask_gt, mask_source)
        self._caption_ids = gt_image_ids(self._image_ids, caption_gt, caption_source)
        self._text_encoder = text_encoder
        self._iou_thresh = iou_thresh
        self._text_sim_thresh = text_sim_thresh
        self._gt_labels: dict[str, list[str]] = {}
        for image_id in self._image_ids:
            captions = caption_gt.imgToAnns[self._caption_ids[image_id]]
            if not captions:
                raise ValueError(f"image {image_id!r} has no caption annotation in {caption_source}")
            labels = list(captions[0]["labels"])
            num_masks = len(mask_gt.imgToAnns[self._mask_ids[image_id]])
            if len(labels) != num_masks:
                raise ValueError(f"image {image_id!r}: {len(labels)} labels in {caption_source} but "
                                 f"{num_masks} mask annotations in {mask_source}; label i must name mask i")
            self._gt_labels[image_id] = labels
        self.reset()

    def reset(self) -> None:
        self._generations: list[pd.DataFrame] = []
        self._masks: list[pd.DataFrame] = []
        self._num_generation_error_rows = 0
        self._num_mask_error_rows = 0
        self._prepared: tuple[dict[str, str], dict[str, _ImageMasks]] | None = None

    def process(self, generations: pd.DataFrame, masks: pd.DataFrame) -> None:
        """Take the generations and masks tables of one or more shards (DataFrames as read by
        :func:`stages.io.tables.read_tables`)."""
        self._num_generation_error_rows += int(generations["error"].notna().sum())
        self._num_mask_error_rows += int(masks["error"].notna().sum())
        self._generations.append(generations)
        self._masks.append(masks)
        self._prepared = None

    # ---------------------------------------------------------------------------------- predictions

    def _predictions(self) -> tuple[dict[str, str], dict[str, _ImageMasks]]:
        """Predicted captions and masks of the evaluated images, built once per processed input."""
        if self._prepared is None:
            self._prepared = (self._captions(), self._predicted_masks())
        return self._prepared

    def _captions(self) -> dict[str, str]:
        """Predicted caption of every evaluated image (empty when it has no answer)."""
        good = good_rows(concat_tables(self._generations, "generations"), (), "generations")
        check_rows_belong(good, self._image_ids, ("image_id",), "generations")
        answers = dict(zip(good["image_id"], good["answer"].fillna("")))
        return {image_id: answers.get(image_id, "").strip() for image_id in self._image_ids}

    def _predicted_masks(self) -> dict[str, _ImageMasks]:
        """Each evaluated image's masks, one per phrase (highest SAM score), in phrase order."""
        good = good_rows(concat_tables(self._masks, "masks"), REQUIRED_MASK_COLUMNS, "masks")
        check_rows_belong(good, self._image_ids, ("image_id", "phrase_index", "mask_index"), "masks")
        chosen = (good.sort_values(["phrase_index", "score", "mask_index"], ascending=[True, False, True],
                                   kind="stable")
                  .drop_duplicates(["image_id", "phrase_index"]))
        per_image = {image_id: _ImageMasks([], []) for image_id in self._image_ids}
        for row in chosen.itertuples(index=False):
            rle = rle_of(row.rle_counts, row.height, row.width)
            check_mask_size(rle, self._mask_gt, self._mask_ids[row.image_id])
            per_image[row.image_id].labels.append(row.text)
            per_image[row.image_id].rles.append(rle)
        return per_image

    def mask_predictions(self) -> list[dict[str, Any]]:
        """Mask predictions in COCO results format as GLaMM writes them (image_id = the mask ground
        truth's id, category 1, score 1.0), images in manifest order, phrases in order."""
        return self._mask_results(self._predictions()[1])

    def _mask_results(self, per_image: Mapping[str, _ImageMasks]) -> list[dict[str, Any]]:
        return [{"image_id": self._mask_ids[image_id], "category_id": GCG_CATEGORY_ID, "segmentation": rle,
                 "score": GCG_SCORE}
                for image_id, masks in per_image.items() for rle in masks.rles]

    def caption_predictions(self) -> list[dict[str, Any]]:
        """Caption predictions as GLaMM writes them: image_id (the caption ground truth's id),
        caption and labels (the chosen masks' phrases), one entry per evaluated image."""
        captions, per_image = self._predictions()
        return [{"image_id": self._caption_ids[image_id], "caption": captions[image_id],
                 "labels": per_image[image_id].labels} for image_id in self._image_ids]

    # -------------------------------------------------------------------------------------- metrics

    def caption_metrics(self) -> dict[str, float | None]:
        """METEOR and CIDEr of the predicted captions (see the class docstring)."""
        captions = self._predictions()[0]
        references = {image_id: [ann["caption"] for ann in self._caption_gt.imgToAnns[caption_id]]
                      for image_id, caption_id in self._caption_ids.items()}
        return caption_scores(references, captions)

    def mask_metrics(self) -> dict[str, Any]:
        """AP50, mIoU, recall and the phrase counts (see the class docstring)."""
        per_image = self._predictions()[1]
        gt_ids = [self._mask_ids[image_id] for image_id in self._image_ids]
        results = self._mask_results(per_image)
        ap50 = coco_segm_summary(self._mask_gt, results_coco(self._mask_gt, results), gt_ids,
                                 category_ids=[GCG_CATEGORY_ID])["AP50"]
        gt_rles = {image_id: [self._mask_gt.annToRLE(ann) for ann in self._mask_gt.imgToAnns[mask_id]]
                   for image_id, mask_id in self._mask_ids.items()}
        embedding = self._embed_labels(per_image, gt_rles)
        image_mious = []
        num_gt_phrases = num_matched = 0
        for image_id in self._image_ids:
            predicted, gt_labels = per_image[image_id], self._gt_labels[image_id]
            pred_by_gt = iou_matrix(predicted.rles, gt_rles[image_id])
            paired = [pred_by_gt[i, j] for i, j in greedy_positive_pairs(pred_by_gt)]
            image_mious.append(float(np.mean(paired)) if paired else 0.0)
            num_gt_phrases += len(gt_labels)
            if predicted.rles and gt_labels:
                text_sim = (np.stack([embedding[label] for label in gt_labels])
                            @ np.stack([embedding[label] for label in predicted.labels]).T)
                num_matched += len(greedy_admissible_pairs(pred_by_gt.T, text_sim, self._iou_thresh,
                                                           self._text_sim_thresh))
        return {
            "AP50": ap50,
            "mIoU": float(np.mean(image_mious)) if image_mious else None,
            "recall": num_matched / num_gt_phrases if num_gt_phrases else None,
            "num_gt_phrases": num_gt_phrases,
            "num_matched_phrases": num_matched,
        }

    def _embed_labels(self, per_image: Mapping[str, _ImageMasks],
                      gt_rles: Mapping[str, list]) -> dict[str, np.ndarray]:
        """Embedding of every distinct label that recall compares (labels of images that have both
        predictions and ground-truth masks), computed in one encoder call."""
        needed: dict[str, None] = {}
        for image_id in self._image_ids:
            if per_image[image_id].rles and gt_rles[image_id]:
                needed.update(dict.fromkeys(self._gt_labels[image_id]))
                needed.update(dict.fromkeys(per_image[image_id].labels))
        if not needed:
            return {}
        labels = list(needed)
        return dict(zip(labels, self._text_encoder.embed(labels)))

    def counts(self) -> dict[str, int]:
        """Image, prediction and error-row counts (see the class docstring)."""
        captions, per_image = self._predictions()
        return {
            "num_images": len(self._image_ids),
            "num_images_with_answer": sum(1 for caption in captions.values() if caption),
            "num_images_with_predictions": sum(1 for masks in per_image.values() if masks.rles),
            "num_predictions": sum(len(masks.rles) for masks in per_image.values()),
            "num_generation_error_rows": self._num_generation_error_rows,
            "num_mask_error_rows": self._num_mask_error_rows,
        }

    def evaluate(self) -> dict[str, dict[str, Any]]:
        return {"gcg": {**self.caption_metrics(), **self.mask_metrics(), **self.counts()}}


def caption_scores(references: Mapping[str, list[str]],
                   hypotheses: Mapping[str, str]) -> dict[str, float | None]:
    """Corpus METEOR and CIDEr (pycocoevalcap, as COCOEvalCap computes them) of one hypothesis per
    image against that image's references, after PTB tokenisation (lower-cased, punctuation
    removed). Line breaks and other whitespace runs become single spaces first (the tokenizer reads
    one caption per line). Both are None when there is no image. Starts Java (seconds)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not references:
        return {"METEOR": None, "CIDEr": None}
    missing = [image_id for image_id, refs in references.items() if not refs]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no reference caption (e.g. {missing[0]!r})")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({image_id: [{"caption": " ".join(ref.split())} for ref in refs]
                              for image_id, refs in references.items()})
    res = tokenizer.tokenize({image_id: [{"caption": " ".join(hypotheses[image_id].split())}]
                              for image_id in references})
    if gts.keys() != res.keys() or len(gts) != len(references):
        raise RuntimeError("PTBTokenizer returned a different set of images than it was given")
    meteor, _ = Meteor().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(meteor), "CIDEr": float(cider)}


def run(cfg: GcgEvalConfig, mask_gt_path: str | os.PathLike, caption_gt_path: str | os.PathLike,
        manifest_path: str | os.PathLike, generations_paths: Sequence[str | os.PathLike],
        masks_paths: Sequence[str | os.PathLike], mask_predictions_path: str | os.PathLike,
        caption_predictions_path: str | os.PathLike,
        metrics_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Evaluate the answers and masks of all shards with GLaMM's GCG protocol (see
    :class:`GcgEvaluator`); write the mask predictions (COCO results JSON), the caption predictions
    and the metrics (``{"gcg": {...}, "provenance": {...}}`` JSON, None for undefined values; the record
    holds the ``evaluate.gcg`` section and names the text encoder and its inputs' models) atomically;
    return the metrics."""
    mask_gt = load_ground_truth(mask_gt_path, GCG_MASK_GT)
    caption_gt = load_ground_truth(caption_gt_path, GCG_CAPTION_GT)
    evaluator = GcgEvaluator(mask_gt, caption_gt, read_manifest_image_ids(manifest_path),
                             TransformerMeanEncoder(cfg.text_encoder),
                             iou_thresh=cfg.iou_thresh, text_sim_thresh=cfg.text_sim_thresh,
                             mask_source=f"GCG mask ground truth {mask_gt_path}",
                             caption_source=f"GCG caption ground truth {caption_gt_path}")
    evaluator.process(read_tables(generations_paths, "generations"), read_tables(masks_paths, "masks"))
    metrics = evaluator.evaluate()
    write_json(evaluator.mask_predictions(), mask_predictions_path)
    write_json(evaluator.caption_predictions(), caption_predictions_path)
    inputs = [read_provenance(path) for path in (manifest_path, *generations_paths, *masks_paths)]
    record = provenance.record("evaluate_gcg", "metrics", {"evaluate": {"gcg": cfg}},
                               models=[provenance.model("gcg_text_encoder", cfg.text_encoder)], inputs=inputs)
    write_json({**metrics, METRICS_PROVENANCE_FIELD: record}, metrics_path)
    log.info("GCG metrics: %s", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    defaults = GcgEvalConfig()
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate_gcg", description=__doc__.split("\n")[0])
    parser.add_argument("--mask-gt", required=True, help="*_gcg_coco_mask_gt.json")
    parser.add_argument("--caption-gt", required=True, help="*_gcg_coco_caption_gt.json")
    parser.add_argument("--manifest", required=True, help="manifest.parquet of the run")
    parser.add_argument("--generations", required=True, nargs="+", help="generations tables of all shards")
    parser.add_argument("--masks", required=True, nargs="+", help="masks tables of all shards")
    parser.add_argument("--mask-predictions", required=True, help="output: mask predictions (COCO results)")
    parser.add_argument("--caption-predictions", required=True, help="output: caption predictions")
    parser.add_argument("--metrics", required=True, help="output: metrics JSON")
    parser.add_argument("--text-encoder", default=defaults.text_encoder, help="recall's text encoder")
    parser.add_argument("--iou-thresh", type=float, default=defaults.iou_thresh,
                        help="recall's IoU threshold")
    parser.add_argument("--text-sim-thresh", type=float, default=defaults.text_sim_thresh,
                        help="recall's text similarity threshold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = GcgEvalConfig(text_encoder=args.text_encoder, iou_thresh=args.iou_thresh,
                        text_sim_thresh=args.text_sim_thresh)
    metrics = run(cfg, args.mask_gt, args.caption_gt, args.manifest, args.generations, args.masks,
                  args.mask_predictions, args.caption_predictions, args.metrics)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
