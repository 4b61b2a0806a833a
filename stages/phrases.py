"""Phrases stage (CPU): noun phrases of each answer, the generated tokens grounding them, and (for COCO
instance segmentation) the ground-truth category each phrase names.

Input: a shard's GENERATIONS table. Output: its PHRASES table (:mod:`schemas.artifacts`), one row per
kept noun chunk and one error row (``phrase_index`` null, ``error`` set, ``image_id`` kept) for:
a failed generation, an answer without a noun phrase, a phrase that no generated token overlaps,
an image missing from the ground truth or without any ground-truth category, and an image whose
every phrase was dropped by ``category_thresh``. Phrases dropped by the threshold get no row of
their own.

Character spans are ``[start, end)`` Python ``str`` offsets into the stored ``answer``; the tokens
of a phrase are found from the generations table's stored token spans, never by decoding.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages import provenance
from stages.config import DATASET_HELP, ConfigError, from_mapping, read_sections, schema_default
from stages.datasets import FieldRule, GroundTruthSpec, load_json, must_be, validate_ground_truth
from stages.io.tables import read_arrow, read_provenance, write_table
from stages.text_encoders import TransformerMeanEncoder, load_text_encoder

TOKEN_MATCHES = ("root", "chunk")
ENCODER_KINDS = ("auto", "spacy", "transformer")
LEADING_ARTICLES = ("the ", "an ", "a ")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Encoder of root words and category names: ``kind`` auto | spacy | transformer; ``path`` of the
    transformer (folder, hub id or ``python:<module>``)."""

    kind: str = schema_default("phrases", "text_encoder", "kind")
    path: str | None = schema_default("phrases", "text_encoder", "path")

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ConfigError(f"phrases.text_encoder.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class PhrasesConfig:
    """The ``phrases`` config section.

    ``token_match``: ``root`` (tokens overlapping the chunk's root word, the release's default) or
    ``chunk`` (tokens overlapping the whole chunk). ``category_thresh``: with ground truth, phrases
    whose best category cosine similarity is below it are dropped.
    """

    spacy_model: str = schema_default("phrases", "spacy_model")
    token_match: str = schema_default("phrases", "token_match")
    category_thresh: float = schema_default("phrases", "category_thresh")
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        if self.token_match not in TOKEN_MATCHES:
            raise ConfigError(f"phrases.token_match must be one of {TOKEN_MATCHES}, got {self.token_match!r}")


@dataclass(frozen=True)
class NounChunk:
    """One spaCy noun chunk of an answer; spans are ``[start, end)`` character offsets."""

    index: int
    text: str
    root: str
    root_start: int
    root_end: int
    chunk_start: int
    chunk_end: int


def noun_chunks(doc) -> list[NounChunk]:
    """The noun chunks of a spaCy ``Doc``, in text order (spaCy yields them disjoint and sorted)."""
    return [NounChunk(index=i, text=chunk.text, root=chunk.root.text, root_start=chunk.root.idx,
                      root_end=chunk.root.idx + len(chunk.root.text), chunk_start=chunk.start_char,
                      chunk_end=chunk.end_char)
            for i, chunk in enumerate(doc.noun_chunks)]


def overlapping_tokens(spans: Sequence[tuple[int, int]], token_starts: Sequence[int],
                       token_ends: Sequence[int], token_special: Sequence[bool]) -> list[list[int]]:
    """For each query span, the indices j of the tokens whose span overlaps it.

    ``spans``: disjoint ``[start, end)`` spans sorted by start (noun chunks or their roots).
    Token j overlaps span ``[a, b)`` when ``token_starts[j] < b`` and ``token_ends[j] > a``;
    special tokens and tokens with an empty span never overlap. Token spans may come in any order.
    Because the query spans are disjoint and sorted, both their starts and their ends are sorted,
    so the spans a token overlaps are one contiguous run found by two bisections:
    O(T log C + output) for T tokens and C spans. Each list comes out in increasing token order.
    """
    starts = [a for a, _ in spans]
    ends = [b for _, b in spans]
    matches: list[list[int]] = [[] for _ in spans]
    for j, (start, end, special) in enumerate(zip(token_starts, token_ends, token_special)):
        if special or end <= start:
            continue
        first = bisect.bisect_right(ends, start)   # first span ending after the token starts
        stop = bisect.bisect_left(starts, end)     # spans from here on start at or after the token ends
        for q in range(first, stop):
            matches[q].append(j)
    return matches


def normalise_category_text(text: str) -> str:
    """Lower-case and strip one leading article ("the ", "an ", "a "), as the release's matching."""
    text = text.lower()
    for article in LEADING_ARTICLES:
        if text.startswith(article):
            return text[len(article):]
    return text


# What category matching reads from a COCO instances file: category ids (integers, as the phrases
# table stores them) and names, image ids, and which categories each image's annotations use. An id
# listed twice is allowed here: the manifest has made that image an error row already.
INSTANCES_CATEGORIES = GroundTruthSpec(
    kind="COCO instances", images=("id",), annotations=("image_id", "category_id"), categories=("id", "name"),
    rules=(FieldRule("categories", "id", must_be(
               "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))),
           FieldRule("categories", "name", must_be("a non-empty string", lambda v: isinstance(v, str) and v != ""))),
    repeated_image_ids=True)


@dataclass(frozen=True)
class GroundTruthCategories:
    """What category matching needs from a COCO instances file.

    ``names``: category id -> name; ``by_image``: image id as text -> ids of the declared categories
    with at least one annotation in that image, ascending (images listed without annotations map to ``()``).
    """

    names: dict[int, str]
    by_image: dict[str, tuple[int, ...]]

    @classmethod
    def from_coco(cls, path: str | os.PathLike) -> GroundTruthCategories:
        """Categories of a COCO instances file, validated with :data:`INSTANCES_CATEGORIES`
        (:class:`~stages.datasets.DatasetError` names the file, entry and field of a bad one)."""
        lists = validate_ground_truth(load_json(path), path, INSTANCES_CATEGORIES)
        names = {c["id"]: c["name"] for c in lists["categories"]}
        present: dict[str, set[int]] = {str(image["id"]): set() for image in lists["images"]}
        for annotation in lists["annotations"]:
            present[str(annotation["image_id"])].add(annotation["category_id"])
        return cls(names=names, by_image={k: tuple(sorted(v)) for k, v in present.items()})


def _error_row(image_id: str, reason: str, chunk: NounChunk | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"image_id": image_id, "phrase_index": None, "error": reason}
    if chunk is not None:
        row.update(text=chunk.text, root=chunk.root, root_start=chunk.root_start, root_end=chunk.root_end,
                   chunk_start=chunk.chunk_start, chunk_end=chunk.chunk_end)
    return row


def _phrase_row(image_id: str, chunk: NounChunk, tokens: list[int]) -> dict[str, Any]:
    return {"image_id": image_id, "phrase_index": chunk.index, "text": chunk.text, "root": chunk.root,
            "root_start": chunk.root_start, "root_end": chunk.root_end, "chunk_start": chunk.chunk_start,
            "chunk_end": chunk.chunk_end, "token_indices": tokens, "error": None}


def _generation_error(generation: dict[str, Any]) -> str | None:
    if generation["error"] is not None or generation["finish_reason"] == "error":
        return f"generation failed: {generation['error'] or '(no reason recorded)'}"
    return None


def _ground_truth_error(image_id: str, gt: GroundTruthCategories | None) -> str | None:
    if gt is None:
        return None
    if image_id not in gt.by_image:
        return "image not in the ground truth"
    if not gt.by_image[image_id]:
        return "image has no ground-truth category"
    return None


@functools.cache
def load_spacy(name: str):
    """spaCy pipeline ``name`` (installed package or folder), loaded once per process; ConfigError when
    it is missing, saying how to install it (e.g. ``en_core_web_lg``, the release's, which comes from
    spaCy's download server and so needs a connected machine)."""
    import spacy

    try:
        return spacy.load(name)
    except OSError as exc:
        raise ConfigError(
            f"phrases.spacy_model {name!r} cannot be loaded: {exc}\nInstall it into this environment on a "
            f"machine with network access: `python -m spacy download {name}` (or pip install the package's "
            f"wheel, e.g. copied from a connected machine), or set phrases.spacy_model to an installed "
            f"pipeline or a folder.") from None


def run(cfg: PhrasesConfig, generations_path: str | os.PathLike, phrases_path: str | os.PathLike,
        instances_path: str | os.PathLike | None = None) -> None:
    """Write the PHRASES table of one shard.

    Without ``instances_path`` the category columns stay null and nothing is dropped. With it
    (a COCO instances json), each phrase is matched to the ground-truth categories present in its
    image: cosine similarity between the normalised root word and each normalised category name
    (:func:`normalise_category_text`); the best category wins (ties: smallest id); phrases scoring
    below ``cfg.category_thresh`` are dropped. Every distinct string is embedded once per shard.
    The table's provenance record names the spaCy pipeline and, when category matching used one, the
    transformer text encoder.
    """
    generations = read_arrow(generations_path, "generations").to_pylist()
    gt = GroundTruthCategories.from_coco(instances_path) if instances_path is not None else None
    nlp = load_spacy(cfg.spacy_model)

    early_errors = [_generation_error(g) or _ground_truth_error(g["image_id"], gt) for g in generations]
    parse_positions = [k for k, error in enumerate(early_errors) if error is None]
    answers = [generations[k]["answer"] or "" for k in parse_positions]
    chunks_of = dict(zip(parse_positions, (noun_chunks(doc) for doc in nlp.pipe(answers))))

    similarity = None
    models = [provenance.spacy_pipeline("spacy_model", cfg.spacy_model, nlp)]
    if gt is not None:
        roots = [chunk.root for chunks in chunks_of.values() for chunk in chunks]
        similarity = _CategorySimilarity(cfg, nlp, gt, roots)
        if isinstance(similarity.encoder, TransformerMeanEncoder):
            models.append(provenance.model("text_encoder", cfg.text_encoder.path))

    rows: list[dict[str, Any]] = []
    for k, generation in enumerate(generations):
        image_id = generation["image_id"]
        if early_errors[k] is not None:
            rows.append(_error_row(image_id, early_errors[k]))
            continue
        chunks = chunks_of[k]
        if not chunks:
            rows.append(_error_row(image_id, "answer has no noun phrase"))
            continue
        spans = ([(c.root_start, c.root_end) for c in chunks] if cfg.token_match == "root"
                 else [(c.chunk_start, c.chunk_end) for c in chunks])
        tokens_of = overlapping_tokens(spans, generation["token_starts"] or [],
                                       generation["token_ends"] or [], generation["token_special"] or [])
        kept = dropped = 0
        for chunk, tokens, (start, end) in zip(chunks, tokens_of, spans):
            if not tokens:
                rows.append(_error_row(image_id, f"no generated token overlaps the {cfg.token_match} "
                                                 f"[{start}, {end}) of {chunk.text!r} (special tokens and "
                                                 "empty spans excluded)", chunk))
                continue
            row = _phrase_row(image_id, chunk, tokens)
            if similarity is not None:
                category_id, score = similarity.best(chunk.root, image_id)
                if score < cfg.category_thresh:
                    dropped += 1
                    continue
                row.update(category_id=category_id, category_name=gt.names[category_id], category_score=score)
            rows.append(row)
            kept += 1
        if dropped and not kept:
            rows.append(_error_row(image_id, f"every phrase was dropped: best category similarity below "
                                             f"category_thresh={cfg.category_thresh}"))
    record = provenance.record("phrases", "phrases", {"phrases": cfg}, models=models,
                               inputs=[read_provenance(generations_path)])
    write_table(rows, phrases_path, "phrases", record)


class _CategorySimilarity:
    """Cosine similarity of root words to the categories of an image, from one embedding call of
    ``encoder`` over the distinct normalised root words and category names of the shard."""

    def __init__(self, cfg: PhrasesConfig, nlp, gt: GroundTruthCategories, roots: list[str]):
        self.encoder = encoder = load_text_encoder(cfg.text_encoder.kind, cfg.text_encoder.path, spacy_nlp=nlp)
        self.gt = gt
        category_texts = {c: normalise_category_text(name) for c, name in gt.names.items()}
        texts = list(dict.fromkeys([*category_texts.values(), *(normalise_category_text(r) for r in roots)]))
        vectors = encoder.embed(texts)
        self.vector_of = {text: vectors[i] for i, text in enumerate(texts)}
        self.category_vectors = {c: self.vector_of[text] for c, text in category_texts.items()}

    def best(self, root: str, image_id: str) -> tuple[int, float]:
        """(category id, cosine similarity) of the image's ground-truth category closest to ``root``."""
        candidates = self.gt.by_image[image_id]
        vector = self.vector_of[normalise_category_text(root)]
        scores = np.stack([self.category_vectors[c] for c in candidates]) @ vector
        best = int(np.argmax(scores))
        return candidates[best], float(scores[best])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.phrases --generations G --out P [--instances I] [--config config.yaml]``."""
    parser = argparse.ArgumentParser(prog="python -m stages.phrases", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml", help="YAML config; its `phrases` section is used")
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--generations", required=True, help="generations table of the shard (Parquet)")
    parser.add_argument("--out", required=True, help="phrases table to write (Parquet)")
    parser.add_argument("--instances", default=None, help="COCO instances json (enables category matching)")
    args = parser.parse_args(argv)
    config = read_sections(args.config, args.dataset)
    cfg = from_mapping(PhrasesConfig, config.get("phrases"), where="phrases")
    run(cfg, args.generations, args.out, args.instances)


if __name__ == "__main__":
    main()
