"""Phrases stage (CPU): the phrases of each sample's answer, the answer tokens grounding them, and (for
COCO instance segmentation) the ground-truth category each phrase names.

Which phrases (``phrases.select``):

- ``noun_chunks`` (default): every spaCy noun chunk of the answer, grounded by the tokens overlapping
  its root word or the whole chunk (``token_match``);
- ``first_verb`` (the release's RES rule): one phrase per sample (index 0), grounded by the token
  after the first token whose text, stripped and lower-cased, is "is", "are" or "be": with the rows
  of a generated answer (row j = the query that emitted token j), that is the row of the step whose
  *input* is the verb;
- ``expression_head`` (this project's RES alternative): one phrase per sample (index 0), the answer's
  first noun chunk whose root word equals (lower-cased) the root word of the sample's referring
  expression (the manifest's ``expression``, parsed with the same spaCy pipeline), grounded by the
  tokens of that root;
- ``forced_pieces`` (the release's PNG grouping): one phrase per piece of a forced answer (phrase
  index = the piece's index, e.g. the narrative's utterance), grounded by every token of the piece
  (the generations table's ``token_pieces``); its text is the piece's span of the answer.

Input: a shard's GENERATIONS table (and the manifest for ``expression_head``). Output: its PHRASES
table (:mod:`schemas.artifacts`), one row per kept phrase and one error row (``phrase_index`` null,
``error`` set, ``sample_id`` and ``image_id`` kept) for: a failed generation, an answer without a
noun phrase (without the verb, without the expression's head), a phrase that no answer token
overlaps, an image missing from the ground truth or without any ground-truth category, and a sample
whose every phrase was dropped by ``category_thresh``. Phrases dropped by the threshold get no row
of their own.

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
SELECTIONS = ("noun_chunks", "first_verb", "expression_head", "forced_pieces")
# first_verb: the release's RES rule looks for the first of these tokens (stripped, lower-cased).
RES_VERBS = ("is", "are", "be")
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

    ``select``: which phrases a sample gets (module docstring). ``token_match``: ``root`` (tokens overlapping the chunk's root word, the release's default) or
    ``chunk`` (tokens overlapping the whole chunk). ``category_thresh``: with ground truth, phrases
    whose best category cosine similarity is below it are dropped.
    """

    select: str = schema_default("phrases", "select")
    spacy_model: str = schema_default("phrases", "spacy_model")
    token_match: str = schema_default("phrases", "token_match")
    category_thresh: float = schema_default("phrases", "category_thresh")
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        if self.token_match not in TOKEN_MATCHES:
            raise ConfigError(f"phrases.token_match must be one of {TOKEN_MATCHES}, got {self.token_match!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"phrases.select must be one of {SELECTIONS}, got {self.select!r}")


@dataclass(frozen=True)
class NounChunk:
    """One phrase of an answer: a spaCy noun chunk (or, for ``select`` first_verb, the verb; for
    forced_pieces, a piece, whose root fields are None); spans are ``[start, end)`` character
    offsets."""

    index: int
    text: str
    root: str | None
    root_start: int | None
    root_end: int | None
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


def _error_row(generation: dict[str, Any], reason: str, chunk: NounChunk | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"sample_id": generation["sample_id"], "image_id": generation["image_id"],
                           "phrase_index": None, "error": reason}
    if chunk is not None:
        row.update(text=chunk.text, root=chunk.root, root_start=chunk.root_start, root_end=chunk.root_end,
                   chunk_start=chunk.chunk_start, chunk_end=chunk.chunk_end)
    return row


def _phrase_row(generation: dict[str, Any], chunk: NounChunk, tokens: list[int]) -> dict[str, Any]:
    return {"sample_id": generation["sample_id"], "image_id": generation["image_id"],
            "phrase_index": chunk.index, "text": chunk.text, "root": chunk.root, "root_start": chunk.root_start,
            "root_end": chunk.root_end, "chunk_start": chunk.chunk_start, "chunk_end": chunk.chunk_end,
            "token_indices": tokens, "error": None}


def first_verb(answer: str, token_starts: Sequence[int], token_ends: Sequence[int],
               token_special: Sequence[bool]) -> int | None:
    """Index of the first answer token whose text (``answer[start:end]``, stripped, lower-cased) is one
    of :data:`RES_VERBS`; None when there is none. Special tokens never match."""
    for j, (start, end, special) in enumerate(zip(token_starts, token_ends, token_special)):
        if not special and answer[start:end].strip().lower() in RES_VERBS:
            return j
    return None


def _first_verb_rows(generation: dict[str, Any]) -> list[dict[str, Any]]:
    """``select: first_verb``: the phrase grounded by the token after the answer's first verb."""
    answer = generation["answer"] or ""
    starts, ends = generation["token_starts"] or [], generation["token_ends"] or []
    verb = first_verb(answer, starts, ends, generation["token_special"] or [])
    if verb is None:
        return [_error_row(generation, f"the answer has none of the verbs {list(RES_VERBS)}")]
    if verb + 1 >= generation["num_tokens"]:
        return [_error_row(generation, "the answer ends at its first verb: no step takes it as input")]
    verb_text = answer[starts[verb]:ends[verb]].strip()
    chunk = NounChunk(index=0, text=verb_text, root=verb_text,
                      root_start=starts[verb], root_end=ends[verb], chunk_start=starts[verb], chunk_end=ends[verb])
    return [_phrase_row(generation, chunk, [verb + 1])]


def _forced_piece_rows(generation: dict[str, Any], num_pieces: int) -> list[dict[str, Any]]:
    """``select: forced_pieces``: one phrase per piece of the forced answer, grounded by all its tokens."""
    if generation["token_pieces"] is None:
        return [_error_row(generation, "phrases.select forced_pieces needs a forced answer; this answer was "
                                       "generated")]
    answer = generation["answer"] or ""
    tokens_of: list[list[int]] = [[] for _ in range(num_pieces)]
    for j, piece in enumerate(generation["token_pieces"]):
        if not 0 <= piece < num_pieces:   # generations and manifest disagree: no IndexError, no wrap-around
            return [_error_row(generation, f"token {j} comes from forced piece {piece}; the manifest's forced "
                                           f"answer has {num_pieces} pieces")]
        tokens_of[piece].append(j)
    rows = []
    for piece, tokens in enumerate(tokens_of):
        if not tokens:
            rows.append(_error_row(generation, f"forced piece {piece} has no tokens"))
            continue
        start = min(generation["token_starts"][j] for j in tokens)
        end = max(generation["token_ends"][j] for j in tokens)
        chunk = NounChunk(index=piece, text=answer[start:end].strip(), root=None, root_start=None, root_end=None,
                          chunk_start=start, chunk_end=end)
        rows.append(_phrase_row(generation, chunk, tokens))
    return rows


def expression_head(doc) -> str | None:
    """The head word of a referring expression's spaCy ``Doc``, lower-cased: the root of its first noun
    chunk, else the root of its first sentence (an expression without a noun chunk, e.g. "left one");
    None for an empty (or whitespace-only) expression."""
    if not doc.text.strip():
        return None
    chunks = list(doc.noun_chunks)
    if chunks:
        return chunks[0].root.text.lower()
    sentences = list(doc.sents) if len(doc) else []
    return sentences[0].root.text.lower() if sentences else None


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
        instances_path: str | os.PathLike | None = None, manifest_path: str | os.PathLike | None = None) -> None:
    """Write the PHRASES table of one shard.

    ``manifest_path`` (the data set's manifest) is needed by ``select`` ``expression_head`` (the
    samples' expressions) and ``forced_pieces`` (how many pieces each forced answer has); the others
    do not read it. Without ``instances_path`` the category columns stay null and nothing is dropped. With it
    (a COCO instances json), each phrase is matched to the ground-truth categories present in its
    image: cosine similarity between the normalised root word and each normalised category name
    (:func:`normalise_category_text`); the best category wins (ties: smallest id); phrases scoring
    below ``cfg.category_thresh`` are dropped. Every distinct string is embedded once per shard.
    The table's provenance record names the spaCy pipeline (when the selection parses text) and, when
    category matching used one, the transformer text encoder.
    """
    generations = read_arrow(generations_path, "generations").to_pylist()
    gt = GroundTruthCategories.from_coco(instances_path) if instances_path is not None else None
    samples = _manifest_samples(cfg, manifest_path)
    parses = cfg.select in ("noun_chunks", "expression_head")
    nlp = load_spacy(cfg.spacy_model) if parses else None

    early_errors = [_generation_error(g) or _ground_truth_error(g["image_id"], gt) for g in generations]
    parse_positions = [k for k, error in enumerate(early_errors) if error is None] if parses else []
    answers = [generations[k]["answer"] or "" for k in parse_positions]
    chunks_of = dict(zip(parse_positions, (noun_chunks(doc) for doc in nlp.pipe(answers)))) if parses else {}
    heads: dict[str, str | None] = {}
    if cfg.select == "expression_head":
        with_expression = [(sid, row["expression"]) for sid, row in samples.items() if row["expression"]]
        heads = dict(zip((sid for sid, _ in with_expression),
                         map(expression_head, nlp.pipe(text for _, text in with_expression))))

    similarity = None
    inputs = [read_provenance(generations_path)]
    models = [provenance.spacy_pipeline("spacy_model", cfg.spacy_model, nlp)] if parses else []
    if gt is not None and parses:
        roots = [chunk.root for chunks in chunks_of.values() for chunk in chunks]
        similarity = _CategorySimilarity(cfg, nlp, gt, roots)
        if isinstance(similarity.encoder, TransformerMeanEncoder):
            models.append(provenance.model("text_encoder", cfg.text_encoder.path))

    rows: list[dict[str, Any]] = []
    for k, generation in enumerate(generations):
        if early_errors[k] is not None:
            rows.append(_error_row(generation, early_errors[k]))
        elif cfg.select == "first_verb":
            rows.extend(_first_verb_rows(generation))
        elif cfg.select == "forced_pieces":
            sample = samples.get(generation["sample_id"])
            if sample is None or sample["forced_answer"] is None:
                rows.append(_error_row(generation, "the manifest gives this sample no forced answer"))
            else:
                rows.extend(_forced_piece_rows(generation, len(sample["forced_answer"])))
        elif cfg.select == "expression_head":
            rows.extend(_expression_head_rows(cfg, generation, chunks_of[k], heads.get(generation["sample_id"])))
        else:
            rows.extend(_noun_chunk_rows(cfg, generation, chunks_of[k], similarity, gt))
    if manifest_path is not None:
        inputs.append(read_provenance(manifest_path))
    record = provenance.record("phrases", "phrases", {"phrases": cfg}, models=models, inputs=inputs)
    write_table(rows, phrases_path, "phrases", record)


def answer_phrases(cfg: PhrasesConfig, generation: dict[str, Any], nlp) -> list[dict[str, Any]]:
    """PHRASES rows of one GENERATIONS row (a dict) as ``select: noun_chunks`` gives them without ground
    truth: every noun chunk of the answer with its tokens (``cfg.token_match``), or the error rows
    :func:`run` writes (a failed generation, no noun phrase, a phrase no token overlaps). ``nlp``: the
    spaCy pipeline (:func:`load_spacy`). The chat's phrases of one turn (:mod:`stages.conversation`)."""
    error = _generation_error(generation)
    if error is not None:
        return [_error_row(generation, error)]
    return _noun_chunk_rows(cfg, generation, noun_chunks(nlp(generation["answer"] or "")), None, None)


def _manifest_samples(cfg: PhrasesConfig, manifest_path: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """The manifest's rows by sample id, for the selections that read it (empty for the others)."""
    if cfg.select not in ("expression_head", "forced_pieces"):
        return {}
    if manifest_path is None:
        raise ConfigError(f"phrases.select {cfg.select} reads the samples' "
                          f"{'expressions' if cfg.select == 'expression_head' else 'forced answers'} from "
                          "the manifest: give its path")
    return {row["sample_id"]: row for row in read_arrow(manifest_path, "manifest").to_pylist()}


def _root_tokens(cfg: PhrasesConfig, generation: dict[str, Any], chunks: list[NounChunk]) -> list[list[int]]:
    """Each chunk's tokens: those overlapping its root word or the whole chunk (``token_match``)."""
    spans = ([(c.root_start, c.root_end) for c in chunks] if cfg.token_match == "root"
             else [(c.chunk_start, c.chunk_end) for c in chunks])
    return overlapping_tokens(spans, generation["token_starts"] or [], generation["token_ends"] or [],
                              generation["token_special"] or [])


def _no_token_error(cfg: PhrasesConfig, generation: dict[str, Any], chunk: NounChunk) -> dict[str, Any]:
    start, end = ((chunk.root_start, chunk.root_end) if cfg.token_match == "root"
                  else (chunk.chunk_start, chunk.chunk_end))
    return _error_row(generation, f"no generated token overlaps the {cfg.token_match} [{start}, {end}) of "
                                  f"{chunk.text!r} (special tokens and empty spans excluded)", chunk)


def _expression_head_rows(cfg: PhrasesConfig, generation: dict[str, Any], chunks: list[NounChunk],
                          head: str | None) -> list[dict[str, Any]]:
    """``select: expression_head``: the answer's first noun chunk whose root is the expression's head."""
    if head is None:
        return [_error_row(generation, "the sample has no referring expression (or an empty one)")]
    matching = [chunk for chunk in chunks if chunk.root.lower() == head]
    if not matching:
        return [_error_row(generation, f"no noun chunk of the answer has the expression's head {head!r} as "
                                       "its root")]
    chunk = dataclasses.replace(matching[0], index=0)
    tokens = _root_tokens(cfg, generation, [chunk])[0]
    return [_phrase_row(generation, chunk, tokens) if tokens else _no_token_error(cfg, generation, chunk)]


def _noun_chunk_rows(cfg: PhrasesConfig, generation: dict[str, Any], chunks: list[NounChunk],
                     similarity: _CategorySimilarity | None,
                     gt: GroundTruthCategories | None) -> list[dict[str, Any]]:
    """``select: noun_chunks``: every noun chunk with its tokens (and, with ground truth, its category)."""
    if not chunks:
        return [_error_row(generation, "answer has no noun phrase")]
    rows = []
    kept = dropped = 0
    for chunk, tokens in zip(chunks, _root_tokens(cfg, generation, chunks)):
        if not tokens:
            rows.append(_no_token_error(cfg, generation, chunk))
            continue
        row = _phrase_row(generation, chunk, tokens)
        if similarity is not None:
            category_id, score = similarity.best(chunk.root, generation["image_id"])
            if score < cfg.category_thresh:
                dropped += 1
                continue
            row.update(category_id=category_id, category_name=gt.names[category_id], category_score=score)
        rows.append(row)
        kept += 1
    if dropped and not kept:
        rows.append(_error_row(generation, f"every phrase was dropped: best category similarity below "
                                           f"category_thresh={cfg.category_thresh}"))
    return rows


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
    """``python -m stages.phrases --generations G --out P [--instances I] [--manifest M] [--config config.yaml]``."""
    parser = argparse.ArgumentParser(prog="python -m stages.phrases", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml", help="YAML config; its `phrases` section is used")
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--generations", required=True, help="generations table of the shard (Parquet)")
    parser.add_argument("--out", required=True, help="phrases table to write (Parquet)")
    parser.add_argument("--instances", default=None, help="COCO instances json (enables category matching)")
    parser.add_argument("--manifest", default=None,
                        help="the data set's manifest (needed by select expression_head and forced_pieces)")
    args = parser.parse_args(argv)
    config = read_sections(args.config, args.dataset)
    cfg = from_mapping(PhrasesConfig, config.get("phrases"), where="phrases")
    run(cfg, args.generations, args.out, args.instances, args.manifest)


if __name__ == "__main__":
    main()
