"""Generate stage (GPU, one job per shard): answer each sample and capture its attention rows.

A sample is one question about one image (the manifest's rows; ``sample_id``). For every sample of
the shard: the chat prompt (the model's own template, optional system message, the configured
question, with the sample's referring expression where it says ``{expression}``), the image padded
to a square with the image processor's mean colour (LLaVA-1.5 ``expand2square``) when the model was trained that way (``generate.pad_to_square: auto``
follows ``LoadedLMM.pad_to_square``; true / false override it), greedy decoding in left-padded
batches (or, with ``generate.do_sample``, sampling that each sample's own seeded generator makes
reproducible whatever its batch or shard: :mod:`stages.sampling`), and for every generated token g_j
the attention row of the query that emitted it over the
image tokens, reduced over the configured layers and heads (:mod:`stages.capture`), laid on that
image's own feature grid (``LoadedLMM.image_layouts``: cell (r, c) of the grid is the token at one
sequence position; images of one batch may have different grids).

A sample with a forced answer (the manifest's ``forced_answer``: a narrative's utterances) is not
answered: its pieces are tokenised one by one without special tokens and concatenated after the
prompt, and one forward pass scores them (teacher forcing, ``finish_reason`` "forced"); each forced
token gets the row of the query ``generate.forced_rows`` names ("emitting": the query before it, as
generation records; "own": its own position), and ``token_pieces`` says which piece each token
comes from.

Outputs (schemas in :mod:`schemas.artifacts`): the generations table (one row per manifest row of
the shard, in manifest order: answer text, token ids, each token's character span in the answer,
finish reason, the image's grid and the offset of its maps in the store) and the attention store
(every sample's float16 (num_tokens, grid_h, grid_w) maps, one contiguous slice each, in one flat
array; its ``grid_covers`` attribute says whether the grids cover the padded square or the whole
image, which the segment stage follows). A sample that cannot be used
(manifest error, unreadable file, a failure while generating) becomes an error row with the reason
(num_tokens 0, finish_reason "error"), never a crash of the shard; model-level problems (unknown
family, missing model, bad layer/head indices, a question without ``{expression}`` for samples that
have one) raise ConfigError.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from schemas.artifacts import FORCED_ROWS
from stages import provenance
from stages.config import DATASET_HELP, ConfigError, from_mapping, read_sections, schema_default
from stages.io.attention import AttentionWriter
from stages.io.images import ImageError, load_rgb_image
from stages.io.tables import read_provenance, read_table, write_table

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from stages.capture import AttentionCapture
    from stages.devices import InputDevices
    from stages.models.base import ImageLayout, LoadedLMM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LMMConfig:
    """Config section ``lmm``: which model, in which precision, with which attention kernel, over how
    many GPUs (``gpus``: the model is spread over that many when no device is given), with which
    feature grid (``grid``), per-image pixel budget (``min_pixels``, ``max_pixels``) and tile range
    (``min_tiles``, ``max_tiles``) where the family has a choice."""

    family: str = schema_default("lmm", "family")
    path: str = schema_default("lmm", "path")
    base: str | None = schema_default("lmm", "base")
    grid: str | None = schema_default("lmm", "grid")
    min_pixels: int | None = schema_default("lmm", "min_pixels")
    max_pixels: int | None = schema_default("lmm", "max_pixels")
    min_tiles: int | None = schema_default("lmm", "min_tiles")
    max_tiles: int | None = schema_default("lmm", "max_tiles")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = schema_default("lmm", "dtype")
    attn_implementation: Literal["sdpa", "flash_attention_2"] = schema_default("lmm", "attn_implementation")
    gpus: int = schema_default("lmm", "gpus")

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ConfigError(f"lmm.gpus must be an integer >= 1, got {self.gpus!r}")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Config section ``generate`` (see schemas/config.schema.yaml for every key's meaning)."""

    question: str = schema_default("generate", "question")
    system_prompt: str | None = schema_default("generate", "system_prompt")
    pad_to_square: Literal["auto"] | bool = schema_default("generate", "pad_to_square")
    max_new_tokens: int = schema_default("generate", "max_new_tokens")
    batch_size: int = schema_default("generate", "batch_size")
    layers: Literal["all"] | tuple[int, ...] = schema_default("generate", "layers")
    heads: Literal["all"] | tuple[int, ...] = schema_default("generate", "heads")
    forced_rows: Literal["emitting", "own"] = schema_default("generate", "forced_rows")
    forced_piece_suffix: str = schema_default("generate", "forced_piece_suffix")
    do_sample: bool = schema_default("generate", "do_sample")
    temperature: float = schema_default("generate", "temperature")
    top_p: float = schema_default("generate", "top_p")
    seed: int = schema_default("generate", "seed")

    def __post_init__(self) -> None:
        if self.pad_to_square != "auto" and not isinstance(self.pad_to_square, bool):
            raise ConfigError("generate.pad_to_square must be auto, true or false, "
                              f"got {self.pad_to_square!r}")
        if self.forced_rows not in FORCED_ROWS:
            raise ConfigError(f"generate.forced_rows must be one of {list(FORCED_ROWS)}, "
                              f"got {self.forced_rows!r}")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"generate.do_sample must be true or false, got {self.do_sample!r}")
        if not _is_number(self.temperature) or not 0 < self.temperature < math.inf:
            raise ConfigError(f"generate.temperature must be a finite number > 0 (greedy decoding is do_sample: "
                              f"false), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"generate.seed must be an integer >= 0, got {self.seed!r}")


def _is_number(value: Any) -> bool:
    """An int or float that is no bool (YAML's true would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


EXPRESSION_FIELD = "{expression}"


@dataclasses.dataclass
class _Item:
    """One manifest row (a sample) on its way through the stage: an RGB image with its prompt and, for
    teacher forcing, the answer's pieces; or an error."""

    sample_id: str
    image_id: str
    prompt: str
    image: Image.Image | None = None
    forced_answer: list[str] | None = None
    error: str | None = None


@dataclasses.dataclass
class _Answer:
    """Generation of one image: ``token_ids`` (T,) trimmed after the first end-of-sequence token and
    ``rows`` (T, grid_h, grid_w) float32 on the image's own grid, row j = attention of the query that
    emitted token j."""

    token_ids: list[int]
    rows: np.ndarray
    finish_reason: str
    # Forced answers: the index of the piece each token comes from; None for a generated answer.
    token_pieces: list[int] | None = None


def resolve_devices(device: str | Sequence[str] | None, gpus: int) -> list[torch.device]:
    """The devices the model is placed on: ``device`` as given (one "cuda:N" / "cpu", or several
    "cuda:N"), or, when None, the first ``gpus`` CUDA devices when CUDA is available (ConfigError
    naming lmm.gpus when fewer are visible), else the cpu."""
    import torch

    from stages.devices import as_devices

    if device is not None:
        return as_devices(device)
    if not torch.cuda.is_available():
        if gpus > 1:
            log.warning("lmm.gpus is %d but CUDA is not available: the model runs on the CPU", gpus)
        return [torch.device("cpu")]
    if gpus > torch.cuda.device_count():
        raise ConfigError(f"lmm.gpus is {gpus} but {torch.cuda.device_count()} CUDA device(s) are visible")
    return [torch.device("cuda", index) for index in range(gpus)]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Config dtype -> torch dtype; "auto" is bfloat16 on a GPU that supports it, float16 on one that
    does not, float32 on the CPU."""
    import torch

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"lmm.dtype {name!r} unknown; known: ['auto', {', '.join(map(repr, dtypes))}]")
    return dtypes[name]


def build_prompt(processor: Any, question: str, system_prompt: str | None) -> str:
    """The model's chat template applied to [system message], user (image, question), with the
    generation prompt appended (llava-1.5: ``"[system ]USER: <image>\\n{question} ASSISTANT:"``).

    The LLaVA-1.5 release's conversation (``llava_v1``) is ``"{system line} USER: <image>\\n{question}
    ASSISTANT:"`` with :data:`stages.models.llava_v1.LLAVA_V1_SYSTEM` as the system line. The
    ``llava_original`` and ``difflmm`` families put that line in when ``system_prompt`` is None; the
    llava-hf template of the ``llava`` family has no default system line, so ``generate.system_prompt``
    set to that line renders exactly the release's conversation there too.
    """
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square of its longer side, centred, filling with ``background`` (LLaVA-1.5's
    ``expand2square``: the offset is (longer - shorter) // 2 on the shorter axis)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def token_char_spans(tokenizer: Any,
                     token_ids: Sequence[int]) -> tuple[str, list[int], list[int], list[bool]]:
    """Decode ``token_ids`` once, incrementally, into the answer text and each token's character span.

    Returns ``(answer, starts, ends, special)``: ``answer`` equals
    ``tokenizer.decode(token_ids, skip_special_tokens=True)``; token j covers ``answer[starts[j]:ends[j]]``
    (code-point offsets, [start, end)); ``special[j]`` marks special tokens (end-of-sequence, padding, ...),
    which get an empty span at the current end of the text.

    Cost O(T): each token decodes a short window (the tokens since the last emitted text, plus the
    one before them for context), the scheme of tokenizers' ``DecodeStream`` and of TGI/vLLM
    detokenisers, instead of decoding every prefix. A token whose text is not complete yet (part of
    a multi-byte character split over byte-level tokens: the window decodes to a trailing U+FFFD)
    waits; every token waiting that way shares the span of the text emitted when the character
    completes. Tokens still waiting at the end get the span of whatever their bytes decode to (e.g.
    U+FFFD). A token that decodes to no text (e.g. a leading "▁" the decoder strips) gets an empty
    span, as prefix decoding would give it.
    """
    special_ids = set(tokenizer.all_special_ids)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    text_ids: list[int] = []       # the non-special tokens so far
    prefix_offset = read_offset = 0
    prefix_text = ""               # decode(text_ids[prefix_offset:read_offset])
    pieces: list[str] = []
    length = 0
    waiting: list[int] = []        # indices of tokens whose character is not complete yet
    starts, ends, special = [0] * len(token_ids), [0] * len(token_ids), [False] * len(token_ids)

    def emit(piece: str) -> None:
        nonlocal length
        for j in waiting:
            starts[j], ends[j] = length, length + len(piece)
        waiting.clear()
        pieces.append(piece)
        length += len(piece)

    for j, token_id in enumerate(token_ids):
        token_id = int(token_id)
        if token_id in special_ids:
            special[j] = True
            starts[j] = ends[j] = length
            continue
        text_ids.append(token_id)
        waiting.append(j)
        window_text = decode(text_ids[prefix_offset:])
        if not window_text.endswith("\ufffd"):
            emit(window_text[len(prefix_text):])
            prefix_offset, read_offset = read_offset, len(text_ids)
            prefix_text = decode(text_ids[prefix_offset:read_offset])
    if waiting:
        emit(decode(text_ids[prefix_offset:])[len(prefix_text):])
    return "".join(pieces), starts, ends, special


def sample_prompt(template: str, expression: str | None, sample_id: str) -> str:
    """The chat prompt of one sample: ``template`` (:func:`build_prompt` of generate.question) with the
    sample's referring expression where it says ``{expression}``. ConfigError when one is given without
    the other (a question that cannot hold the expression, or a placeholder with nothing to put in)."""
    if expression is None:
        if EXPRESSION_FIELD in template:
            raise ConfigError(f"generate.question says {EXPRESSION_FIELD} but sample {sample_id!r} has no "
                              "expression (only task res data sets have expressions)")
        return template
    if EXPRESSION_FIELD not in template:
        raise ConfigError(f"sample {sample_id!r} has a referring expression, but generate.question has no "
                          f"{EXPRESSION_FIELD} to put it in (the release asks "
                          f"'Describe the \"{EXPRESSION_FIELD}\".')")
    return template.replace(EXPRESSION_FIELD, expression)


def _prepare(row: Any, template: str, pad_to_square: bool, background: tuple[int, int, int]) -> _Item:
    sample_id, image_id = str(row.sample_id), str(row.image_id)
    expression = row.expression if isinstance(row.expression, str) else None
    forced = None if row.forced_answer is None else [str(piece) for piece in row.forced_answer]
    item = _Item(sample_id, image_id, sample_prompt(template, expression, sample_id), forced_answer=forced)
    if isinstance(row.error, str) and row.error:
        item.error = f"manifest: {row.error}"
        return item
    if forced is not None and not forced:
        item.error = "the forced answer has no pieces"
        return item
    try:
        image = load_rgb_image(row.file)
    except ImageError as exc:
        item.error = str(exc)
        return item
    item.image = expand_to_square(image, background) if pad_to_square else image
    return item


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _model_inputs(lmm: LoadedLMM, items: list[_Item], devices: InputDevices) -> Any:
    """The processor's left-padded batch of ``items``' prompts and images: token inputs on
    ``devices.tokens``, pixel values on ``devices.pixels`` in the model's dtype."""
    inputs = lmm.processor(images=[item.image for item in items], text=[item.prompt for item in items],
                           padding=True, return_tensors="pt")
    inputs = inputs.to(devices.tokens)
    inputs["pixel_values"] = inputs["pixel_values"].to(devices.pixels, lmm.model.dtype)
    return inputs


def _layouts(lmm: LoadedLMM, inputs: Any) -> list[ImageLayout]:
    """``lmm.image_layouts(inputs)``; a batch whose image tokens do not fit the model's layout is a
    ConfigError (a model/processor problem, not an image's)."""
    try:
        return lmm.image_layouts(inputs)
    except ValueError as exc:
        raise ConfigError(f"the processor of {lmm.path!r} (lmm.path) does not give the image tokens its "
                          f"model expects: {exc}") from None


def _generate_batch(lmm: LoadedLMM, capture: AttentionCapture, items: list[_Item], cfg: GenerateConfig,
                    devices: InputDevices, *, streamer: Any = None, stopping_criteria: Any = None) -> list[_Answer]:
    """Generation for ``items`` (one left-padded batch, each with its own prompt) with attention
    capture; each image's rows are laid on its own grid (``lmm.image_layouts``). Token inputs go to
    ``devices.tokens`` (where the rows are accumulated), pixel values to ``devices.pixels``.

    Greedy, or with ``cfg.do_sample`` each item's tokens drawn from its own generator seeded from
    ``cfg.seed`` and its sample id (:mod:`stages.sampling`), so that an item's answer does not depend on
    its batch. ``streamer`` and ``stopping_criteria`` (transformers' ``generate`` arguments; the chat's
    token-by-token output and stop flag, :mod:`stages.conversation`) are passed on; an answer stopped
    by them before its end-of-sequence token has finish_reason "length"."""
    import torch

    from stages.capture import CaptureError

    inputs = _model_inputs(lmm, items, devices)
    layouts = _layouts(lmm, inputs)
    sampler = None
    if cfg.do_sample:
        from transformers import LogitsProcessorList

        from stages.sampling import SeededSampler, sample_seed

        sampler = LogitsProcessorList([SeededSampler([sample_seed(cfg.seed, item.sample_id) for item in items],
                                                     cfg.temperature, cfg.top_p)])
    with torch.inference_mode(), capture.recording([layout.positions for layout in layouts]):
        sequences = lmm.model.generate(**lmm.model_inputs(inputs), do_sample=False, num_beams=1,
                                       max_new_tokens=cfg.max_new_tokens, logits_processor=sampler,
                                       streamer=streamer, stopping_criteria=stopping_criteria)
    item_rows = [rows.float().cpu().numpy() for rows in capture.item_rows()]
    generated = sequences[:, inputs["input_ids"].shape[1]:].cpu()
    if item_rows[0].shape[0] != generated.shape[1]:
        raise CaptureError(f"captured {item_rows[0].shape[0]} steps for {generated.shape[1]} "
                           "generated tokens")
    eos_ids = _eos_ids(lmm.model)
    answers = []
    for b, layout in enumerate(layouts):
        ids = generated[b].tolist()
        ends = [j for j, token_id in enumerate(ids) if token_id in eos_ids]
        num_tokens, reason = (ends[0] + 1, "eos") if ends else (len(ids), "length")
        rows = item_rows[b][:num_tokens].reshape(num_tokens, *layout.grid)
        answers.append(_Answer(ids[:num_tokens], rows, reason))
    return answers


def forced_answer_ids(tokenizer: Any, pieces: Sequence[str], suffix: str = "") -> tuple[list[int], list[int]]:
    """A forced answer's token ids and each token's piece: every piece, with ``suffix`` appended
    (``generate.forced_piece_suffix``; the release's InternVL2.5 PNG script appends " "), tokenised on its
    own without special tokens (``tokenizer(piece + suffix, add_special_tokens=False)``, as the release's
    PNG scoring does), concatenated. Returns ``(token_ids, token_pieces)``, both of length T."""
    token_ids: list[int] = []
    token_pieces: list[int] = []
    for index, piece in enumerate(pieces):
        ids = tokenizer(piece + suffix, add_special_tokens=False)["input_ids"]
        token_ids.extend(int(i) for i in ids)
        token_pieces.extend([index] * len(ids))
    return token_ids, token_pieces


def _append_answers(inputs: Any, answers: list[list[int]], pad_id: int) -> Any:
    """``inputs`` (the processor's left-padded prompt batch) with each item's answer ids appended after
    its prompt and the batch left-padded again (:func:`stages.capture.left_pad`), so that every item
    ends at the last column. Every other per-token input (shape (B, L), e.g. token type ids) is
    re-laid the same way, 0 on the answer and the padding."""
    import torch

    from stages.capture import left_pad

    real = inputs["attention_mask"].bool()
    sequences = [torch.cat([inputs["input_ids"][b][real[b]], torch.tensor(ids, dtype=torch.long,
                                                                          device=real.device)])
                 for b, ids in enumerate(answers)]
    input_ids, attention_mask = left_pad(sequences, pad_id)
    width = input_ids.shape[1]
    forced = dict(inputs)
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask") or not (
                isinstance(value, torch.Tensor) and value.shape[:2] == inputs["input_ids"].shape):
            continue
        relaid = value.new_zeros((value.shape[0], width, *value.shape[2:]))
        for b, answer in enumerate(answers):
            prompt = value[b][real[b]]
            start = width - len(answer) - len(prompt)
            relaid[b, start:start + len(prompt)] = prompt
        forced[key] = relaid
    forced["input_ids"], forced["attention_mask"] = input_ids, attention_mask
    return forced


def _forced_batch(lmm: LoadedLMM, capture: AttentionCapture, items: list[_Item], cfg: GenerateConfig,
                  devices: InputDevices) -> list[_Answer]:
    """Teacher forcing for ``items`` (one batch, each with its forced answer): one forward pass over
    each prompt followed by its forced answer's tokens (:func:`forced_answer_ids`), left-padded, that
    records the last T_max + 1 query rows; token a_j gets the row ``cfg.forced_rows`` names
    (:func:`stages.capture.forced_rows`: "emitting", the query at a_{j-1}, the prompt's last token for
    a_0; "own", the query at a_j). ValueError (the item's error) when a forced answer tokenises to no
    token or holds the model's image token."""
    import torch

    from stages.capture import forced_rows

    tokenizer = lmm.processor.tokenizer
    answers = [forced_answer_ids(tokenizer, item.forced_answer, cfg.forced_piece_suffix) for item in items]
    image_token = getattr(lmm.model.config, "image_token_id", None)
    for item, (ids, _) in zip(items, answers):
        if not ids:
            raise ValueError(f"the forced answer of sample {item.sample_id} has no tokens")
        if image_token is not None and image_token in ids:
            raise ValueError(f"the forced answer of sample {item.sample_id} holds the image token")
    prompts = _model_inputs(lmm, items, devices)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = _append_answers(prompts, [ids for ids, _ in answers], pad_id)
    layouts = _layouts(lmm, inputs)
    longest = max(len(ids) for ids, _ in answers)
    with torch.inference_mode(), capture.recording([layout.positions for layout in layouts],
                                                   queries=longest + 1):
        lmm.model(**lmm.model_inputs(inputs), use_cache=False)
    query_rows = capture.query_rows()
    return [_Answer(ids, forced_rows(query_rows[b], len(ids), cfg.forced_rows).float().cpu().numpy()
                    .reshape(len(ids), *layout.grid), "forced", pieces)
            for b, ((ids, pieces), layout) in enumerate(zip(answers, layouts))]


def _answer_items(lmm: LoadedLMM, capture: AttentionCapture, items: list[_Item], cfg: GenerateConfig,
                  devices: InputDevices) -> list[_Answer | str]:
    """Answers for ``items`` (all with an image, all with a forced answer or all without); if the batch
    fails, each sample is retried alone and a failing one yields its error message instead of an
    answer. ConfigError and CaptureError (problems of the model, not of a sample) propagate."""
    from stages.capture import CaptureError

    try:
        if items[0].forced_answer is not None:
            return _forced_batch(lmm, capture, items, cfg, devices)
        return _generate_batch(lmm, capture, items, cfg, devices)
    except (ConfigError, CaptureError):
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure of one image must not lose the others
        if len(items) == 1:
            log.warning("sample %s failed: %s: %s", items[0].sample_id, type(exc).__name__, exc)
            return [f"generation failed: {type(exc).__name__}: {exc}"]
        log.warning("batch of %d failed (%s: %s); retrying its samples one by one",
                    len(items), type(exc).__name__, exc)
    results: list[_Answer | str] = []
    for item in items:
        results.extend(_answer_items(lmm, capture, [item], cfg, devices))
    return results


def _batches(items: Iterator[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Consecutive groups of items, each closed when it holds ``batch_size`` images (error items ride
    along, so that the output keeps the manifest order); a group's forced and generated samples are
    answered as two batches."""
    group: list[_Item] = []
    images = 0
    for item in items:
        group.append(item)
        images += item.image is not None
        if images == batch_size:
            yield group
            group, images = [], 0
    if group:
        yield group


def _error_row(item: _Item, reason: str, attention_offset: int) -> dict[str, Any]:
    """A generations row for a sample that produced no tokens."""
    return {"sample_id": item.sample_id, "image_id": item.image_id, "prompt": item.prompt, "answer": None,
            "token_ids": [], "token_starts": [],
            "token_ends": [], "token_special": [], "num_tokens": 0, "attention_offset": attention_offset,
            "grid_h": None, "grid_w": None, "finish_reason": "error", "error": reason}


def run(generate_cfg: GenerateConfig, lmm_cfg: LMMConfig, manifest_path: str | os.PathLike, shard: int,
        generations_path: str | os.PathLike, attention_path: str | os.PathLike,
        device: str | Sequence[str] | None = None) -> None:
    """Answer every sample of ``shard`` in the manifest; write its generations table and attention store,
    each with its provenance record (the generate and lmm sections, the LMM and its base).

    ``device``: "cuda:N" / "cpu", or several "cuda:N" the model is spread over (the workflow claims
    ``lmm.gpus`` of them); None = the first ``lmm_cfg.gpus`` CUDA devices when CUDA is available,
    else cpu (:func:`resolve_devices`). Raises ConfigError for model-level problems (among them a
    model that does not fit on its devices); per-sample problems become error rows.
    """
    from stages.capture import CAPTURABLE_IMPLEMENTATIONS, AttentionCapture
    from stages.devices import input_devices
    from stages.models.registry import load_lmm
    from stages.progress import progress_bar

    if lmm_cfg.attn_implementation not in CAPTURABLE_IMPLEMENTATIONS:
        raise ConfigError(f"lmm.attn_implementation {lmm_cfg.attn_implementation!r}: attention capture runs "
                          f"over {list(CAPTURABLE_IMPLEMENTATIONS)}")
    manifest = read_table(manifest_path, "manifest")
    rows = manifest[manifest["shard"] == shard]
    devices = resolve_devices(device, lmm_cfg.gpus)
    lmm = load_lmm(lmm_cfg.family, lmm_cfg.path, dtype=resolve_dtype(lmm_cfg.dtype, devices[0]),
                   attn_implementation=lmm_cfg.attn_implementation,
                   device=devices[0] if len(devices) == 1 else devices, base=lmm_cfg.base,
                   grid=lmm_cfg.grid, min_pixels=lmm_cfg.min_pixels, max_pixels=lmm_cfg.max_pixels,
                   min_tiles=lmm_cfg.min_tiles, max_tiles=lmm_cfg.max_tiles)
    inputs_at = input_devices(lmm.model)
    try:
        capture = AttentionCapture(lmm.model, layers=generate_cfg.layers, heads=generate_cfg.heads)
    except ValueError as exc:
        raise ConfigError(f"attention capture of {lmm_cfg.path!r} (generate.layers, generate.heads): "
                          f"{exc}") from None
    # LLaVA-1.5's expand2square colour: tuple(int(x * 255) for x in image_mean), truncated.
    background = tuple(int(255 * c) for c in lmm.processor.image_processor.image_mean)
    pad = lmm.pad_to_square if generate_cfg.pad_to_square == "auto" else generate_cfg.pad_to_square
    template = build_prompt(lmm.processor, generate_cfg.question, generate_cfg.system_prompt)
    lmm.processor.tokenizer.padding_side = "left"
    reduction = {"layers": _reduction_value(generate_cfg.layers),
                 "heads": _reduction_value(generate_cfg.heads), "statistic": "mean"}
    log.info("shard %d: %d samples, prompt %r, %s", shard, len(rows), template,
             "padded to squares" if pad else "not padded")
    models = [provenance.model("lmm", lmm_cfg.path)]
    if lmm_cfg.base is not None:
        models.append(provenance.model("lmm_base", lmm_cfg.base))
    sections = {"generate": generate_cfg, "lmm": lmm_cfg}
    inputs = [read_provenance(manifest_path)]

    table: list[dict[str, Any]] = []
    items = (_prepare(row, template, pad, background) for row in rows.itertuples(index=False))
    with AttentionWriter(attention_path, model=lmm_cfg.path, reduction=reduction,
                         grid_covers="padded_square" if pad else lmm.unpadded_grid_covers,
                         forced_rows=generate_cfg.forced_rows,
                         provenance=provenance.record("generate", "attention", sections, models=models,
                                                      inputs=inputs)) as writer, \
            progress_bar(len(rows), f"generate shard {shard}", logger=log, unit="sample") as progress:
        for group in _batches(items, generate_cfg.batch_size):
            answers: dict[int, _Answer | str] = {}
            for forced in (False, True):
                batch = [item for item in group
                         if item.image is not None and (item.forced_answer is not None) == forced]
                if batch:
                    answered = _answer_items(lmm, capture, batch, generate_cfg, inputs_at)
                    answers.update(zip(map(id, batch), answered))
            for item in group:
                answer = answers.get(id(item), item.error)
                if isinstance(answer, str):
                    table.append(_error_row(item, answer, writer.num_values))
                    continue
                offset = writer.append(answer.rows)
                table.append(_generation_row(item, answer, lmm.processor.tokenizer, offset))
            progress.update(len(group))
    write_table(table, generations_path, "generations",
                provenance.record("generate", "generations", sections, models=models, inputs=inputs))
    errors = sum(row["error"] is not None for row in table)
    log.info("shard %d: %d generations (%d errors), %d attention rows", shard, len(table), errors,
             sum(row["num_tokens"] for row in table))


def _generation_row(item: _Item, answer: _Answer, tokenizer: Any, attention_offset: int) -> dict[str, Any]:
    text, starts, ends, special = token_char_spans(tokenizer, answer.token_ids)
    _, grid_h, grid_w = answer.rows.shape
    return {"sample_id": item.sample_id, "image_id": item.image_id, "prompt": item.prompt, "answer": text,
            "token_ids": answer.token_ids, "token_starts": starts, "token_ends": ends,
            "token_special": special, "token_pieces": answer.token_pieces,
            "num_tokens": len(answer.token_ids), "attention_offset": attention_offset, "grid_h": grid_h,
            "grid_w": grid_w, "finish_reason": answer.finish_reason, "error": None}


def _reduction_value(selection: str | Sequence[int]) -> str | list[int]:
    return selection if isinstance(selection, str) else [int(i) for i in selection]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True,
                        help="pipeline config YAML (sections `lmm` and `generate`)")
    parser.add_argument("--manifest", required=True, help="manifest.parquet of the data set")
    parser.add_argument("--shard", type=int, required=True, help="shard to answer")
    parser.add_argument("--generations", required=True, help="output generations/shard-K.parquet")
    parser.add_argument("--attention", required=True, help="output attention/shard-K.zarr")
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--question", help="overrides generate.question (a data set's own question)")
    parser.add_argument("--device", help="cuda:N or cpu, or comma-separated cuda:N to spread the model "
                        "over (default: lmm.gpus CUDA devices from cuda:0 when available, else cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = read_sections(args.config, args.dataset)
    generate_section = dict(config.get("generate") or {})
    if args.question:
        generate_section["question"] = args.question
    generate_cfg = from_mapping(GenerateConfig, generate_section, where="generate")
    lmm_cfg = from_mapping(LMMConfig, config.get("lmm"), where="lmm")
    run(generate_cfg, lmm_cfg, args.manifest, args.shard, args.generations, args.attention,
        device=args.device.split(",") if args.device else None)


if __name__ == "__main__":
    main()
