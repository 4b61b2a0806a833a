"""Panoptic narrative grounding (PNG) metrics: average accuracy of one mask per narrative phrase.

The protocol is the release's ``aas/png.py``, which follows F-LMM's ``scripts/multiprocess_eval_png.py``:
a sample is one narrative (a COCO image's caption); its phrases are the narrative's segments that have
segment ids, each with a ground-truth mask (the union of its panoptic segments); the pipeline predicts
at most one mask per phrase, and every phrase counts, with or without a prediction. This module is the
metric core: phrases come in as :class:`PngPhrase` objects and the masks as a pandas DataFrame (the masks
table of all shards, keyed on ``sample_id`` and ``phrase_index``), metrics go out as
``{"png": {metric: value}}`` (ready for :func:`stages.evaluation.write_json`) plus a per-phrase table.

Conventions (shared with :mod:`stages.evaluate_res`): masks are COCO compressed RLE dicts; a phrase's
prediction is its mask row without error and with a non-empty mask, the highest ``score`` among several,
ties to the lowest ``mask_index`` (:func:`stages.evaluate_res.chosen_masks`); IoU is computed by
pycocotools on the RLEs, 0 without a prediction, and 0 (with a warning) when the ground truth is empty
(:func:`stages.evaluate_res.overlap`; the release asserts that it never is).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from stages.evaluate_res import ChosenMask, chosen_masks, manifest_masks, overlap, usable, write_results

if TYPE_CHECKING:
    from stages.datasets import DatasetConfig

log = logging.getLogger(__name__)

PER_PHRASE_COLUMNS = ("sample_id", "phrase_index", "is_thing", "plural", "mask_index", "score", "intersection",
                      "union", "iou")
# Metric suffix -> which phrases the group holds, from the per-phrase table's flags.
GROUPS = {
    "things": lambda table: table["is_thing"],
    "stuff": lambda table: ~table["is_thing"],
    "singulars": lambda table: ~table["plural"],
    "plurals": lambda table: table["plural"],
}


@dataclasses.dataclass(frozen=True)
class PngPhrase:
    """One phrase of a narrative: the ground truth one predicted mask is measured against.

    ``sample_id``: the narrative's sample (str); ``phrase_index``: the ``phrase_index`` of its mask rows
    (int; with ``phrases.select: forced_pieces``, the segment's index among all the narrative's segments,
    those without segment ids included); ``gt_rle``: compressed RLE ``{"size": [height, width], "counts": str | bytes}`` of the union of
    its panoptic segments; ``is_thing`` and ``plural``: its groups, as :meth:`from_segments` sets them.
    """

    sample_id: str
    phrase_index: int
    gt_rle: Mapping[str, Any]
    is_thing: bool
    plural: bool

    @classmethod
    def from_segments(cls, sample_id: str, phrase_index: int, segment_rles: Sequence[Mapping[str, Any]],
                      segments_are_things: Sequence[bool], plural: bool) -> PngPhrase:
        """The phrase of a narrative segment with panoptic segments ``segment_rles`` (compressed RLEs of
        one size; at least one), whose categories are things or not (``segments_are_things``, the
        panoptic categories' ``isthing``), and the annotation's ``plural`` flag.

        The groups are the release's: ``plural`` is the annotation's flag (its singular/plural split is
        F-LMM's); ``is_thing`` is the category's ``isthing`` for a phrase of one segment and True for a
        phrase of several (all plural: several segments without the flag raise ``ValueError``, where the
        release asserts). F-LMM differs on one case: a plural-flagged phrase of a single stuff segment is
        a thing there, stuff here.
        """
        name = f"PNG phrase {phrase_index} of sample {sample_id!r}"
        if not segment_rles or len(segment_rles) != len(segments_are_things):
            raise ValueError(f"{name}: {len(segment_rles)} segment mask(s) and {len(segments_are_things)} "
                             "isthing flag(s); a phrase needs at least one segment, each with its flag")
        if len(segment_rles) > 1 and not plural:
            raise ValueError(f"{name} has {len(segment_rles)} segments but is not flagged plural")
        sizes = {tuple(rle["size"]) for rle in segment_rles}
        if len(sizes) > 1:
            raise ValueError(f"{name}: its segments' masks differ in size {sorted(sizes)}")
        gt_rle = mask_utils.merge(list(segment_rles), intersect=False)
        return cls(sample_id, int(phrase_index), gt_rle, bool(segments_are_things[0]) if len(segment_rles) == 1
                   else True, bool(plural))


def average_accuracy(ious: Iterable[float]) -> float:
    """Average accuracy of a set of IoUs: the area under recall(t) = share of IoUs >= t, for t in [0, 1].

    Computed exactly, as the mean IoU: with N IoUs u_i in [0, 1],
    ∫_0^1 recall(t) dt = ∫_0^1 (1/N) Σ_i 1[u_i >= t] dt = (1/N) Σ_i ∫_0^{u_i} 1 dt = (1/N) Σ_i u_i.
    The release (F-LMM's ``average_accuracy``) takes a left Riemann sum of the step function on the grid
    t_k = k * 1e-5, k = 0 ... 99998 (``np.arange(0, 1, 1e-5)``, whose last point gets no interval): each
    IoU then adds 1e-5 * min(floor(u_i / 1e-5) + 1, 99999), within 1e-5 of u_i, so the two agree within
    1e-5 (tests/test_evaluate_png.py compares them). Returns a fraction in [0, 1]; raises ``ValueError``
    for no IoU or one outside [0, 1] (NaN included).
    """
    values = np.asarray(list(ious), dtype=np.float64)
    if values.size == 0:
        raise ValueError("average accuracy of no IoU is undefined")
    if not ((values >= 0) & (values <= 1)).all():
        raise ValueError(f"IoUs must lie in [0, 1], got {values[~((values >= 0) & (values <= 1))][:5].tolist()}")
    return float(values.mean())


class PngEvaluator:
    """Average accuracy over PNG phrases, one (phrase, prediction) pair at a time.

    Use it as detectron2's evaluators: ``reset()``, ``process(phrase, prediction)`` for every phrase,
    then ``evaluate()`` -> ``{"png": {metric: value}}`` and :meth:`per_phrase`.

    Definitions:

    - IoU of a phrase: its prediction's IoU with its ground truth; 0 without a prediction (no mask row,
      only error rows, an empty mask) and when its ground truth is empty (``num_empty_ground_truth``).
    - ``AA``: :func:`average_accuracy` of all phrases' IoUs; ``AA_things`` / ``AA_stuff``: of the phrases
      with ``is_thing`` true / false; ``AA_singulars`` / ``AA_plurals``: with ``plural`` false / true
      (:meth:`PngPhrase.from_segments`). All x100, as the literature reports them; None for a group
      without phrases (not 0: nothing was measured).
    - Counts: ``num_phrases``, ``num_things``, ``num_stuff``, ``num_singulars``, ``num_plurals`` (the
      groups' sizes), ``num_samples`` (narratives with at least one phrase), ``num_predicted`` (phrases
      with a prediction), ``num_empty_ground_truth``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._rows: list[tuple[str, int, bool, bool, int | None, float, int, int, float]] = []
        self._seen: set[tuple[str, int]] = set()
        self._num_empty_ground_truth = 0

    def process(self, phrase: PngPhrase, prediction: ChosenMask | None) -> None:
        """Add one phrase and its prediction (:func:`stages.evaluate_res.chosen_masks`; None when it has
        none; an empty mask counts as none). Raises ``ValueError`` for a phrase given twice (same
        sample_id and phrase_index) or a prediction of another size than its ground truth."""
        key = (phrase.sample_id, phrase.phrase_index)
        if key in self._seen:
            raise ValueError(f"PNG phrase {phrase.phrase_index} of sample {phrase.sample_id!r} is given twice")
        self._seen.add(key)
        prediction = usable(prediction)
        pair = overlap(phrase.gt_rle, None if prediction is None else prediction.rle,
                       f"PNG phrase {phrase.phrase_index} of sample {phrase.sample_id!r}")
        self._num_empty_ground_truth += pair.empty_ground_truth
        self._rows.append((phrase.sample_id, phrase.phrase_index, phrase.is_thing, phrase.plural,
                           None if prediction is None else prediction.mask_index,
                           np.nan if prediction is None else prediction.score,
                           pair.intersection, pair.union, pair.iou))

    def per_phrase(self) -> pd.DataFrame:
        """One row per processed phrase, in processing order: ``sample_id`` (str), ``phrase_index``
        (int64), ``is_thing`` and ``plural`` (bool), ``mask_index`` (nullable Int64: the row used, null
        without prediction), ``score`` (float64, NaN without prediction), ``intersection`` and ``union``
        (int64 pixels), ``iou`` (float64 in [0, 1])."""
        table = pd.DataFrame(self._rows, columns=list(PER_PHRASE_COLUMNS))
        return table.astype({"sample_id": str, "phrase_index": np.int64, "is_thing": bool, "plural": bool,
                             "mask_index": "Int64", "score": np.float64, "intersection": np.int64,
                             "union": np.int64, "iou": np.float64})

    def evaluate(self) -> dict[str, dict[str, Any]]:
        table = self.per_phrase()
        metrics: dict[str, Any] = {"AA": _percent(table["iou"])}
        for group, members in GROUPS.items():
            metrics[f"AA_{group}"] = _percent(table.loc[members(table), "iou"])
        metrics["num_phrases"] = len(table)
        for group, members in GROUPS.items():
            metrics[f"num_{group}"] = int(members(table).sum())
        metrics.update(num_samples=int(table["sample_id"].nunique()),
                       num_predicted=int(table["mask_index"].notna().sum()),
                       num_empty_ground_truth=self._num_empty_ground_truth)
        return {"png": metrics}


def _percent(ious: pd.Series) -> float | None:
    """:func:`average_accuracy` x100 of ``ious``; None when there are none."""
    return 100.0 * average_accuracy(ious) if len(ious) else None


def png_metrics(phrases: Sequence[PngPhrase], masks: pd.DataFrame) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """PNG metrics of a masks table against the phrases (see :class:`PngEvaluator`).

    ``phrases``: every evaluated phrase, in the order of the per-phrase table; the phrases of one sample
    share a mask size (``ValueError`` otherwise). ``masks``: the masks table of all shards as a DataFrame
    (:func:`stages.evaluate_res.chosen_masks`); a row naming a sample without phrases raises
    ``ValueError``, a row of a known sample whose ``phrase_index`` is no phrase (a narrative segment
    without segment ids) is ignored. Returns ``({"png": metrics}, per-phrase table)``.
    """
    sizes: dict[str, tuple[int, int]] = {}
    for phrase in phrases:
        size = tuple(phrase.gt_rle["size"])
        if sizes.setdefault(phrase.sample_id, size) != size:
            raise ValueError(f"PNG sample {phrase.sample_id!r}: its phrases' ground-truth masks differ in size "
                             f"({list(sizes[phrase.sample_id])} and {list(size)})")
    chosen = chosen_masks(masks, sizes)
    evaluator = PngEvaluator()
    for phrase in phrases:
        evaluator.process(phrase, chosen.get((phrase.sample_id, phrase.phrase_index)))
    return evaluator.evaluate(), evaluator.per_phrase()


def run(dataset: DatasetConfig, manifest_path: str | os.PathLike, masks_paths: Sequence[str | os.PathLike],
        predictions_path: str | os.PathLike, metrics_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Evaluate a ``png`` data set's masks (all shards) against its narratives' panoptic ground truth
    (:func:`stages.datasets.load_png_ground_truth`: each segment with segment ids is a phrase, its mask
    the union of its panoptic segments); write the per-phrase table as a JSON list of records
    (``predictions_path``) and the metrics (``{"png": {...}, "provenance": {...}}``, ``metrics_path``);
    return the metrics.

    Every phrase of every narrative with ground truth counts, predicted or not (IoU 0). A narrative
    whose ground truth cannot be built (an error sample of the listing) is left out and counted in
    ``num_samples_without_ground_truth``; the masks rows of a narrative without segment ids (no phrase)
    are ignored. A masks row naming a sample outside the manifest is an error.
    """
    from stages.datasets import load_png_ground_truth

    targets = load_png_ground_truth(dataset)
    phrases = []
    for sample_id, target in targets.items():
        masks_of = target.masks()
        for phrase in target.phrases:
            rle = mask_utils.encode(np.asfortranarray(masks_of[phrase.phrase_index].astype(np.uint8)))
            phrases.append(PngPhrase(sample_id, phrase.phrase_index, {"size": rle["size"], "counts": rle["counts"]},
                                     phrase.is_thing, phrase.plural))
    # A narrative without segment ids has no phrase (the release skips it): the rows the pipeline wrote
    # for its pieces are not evaluated, as those of the error samples.
    with_phrases = {sample_id for sample_id, target in targets.items() if target.phrases}
    masks, num_samples = manifest_masks(manifest_path, masks_paths, with_phrases)
    metrics, per_phrase = png_metrics(phrases, masks)
    metrics["png"]["num_samples_without_ground_truth"] = num_samples - len(targets)
    write_results("evaluate_png", metrics, per_phrase, manifest_path, masks_paths, predictions_path, metrics_path)
    return metrics
