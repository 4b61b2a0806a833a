"""Train the embedded toy LLaVA on captions only, so that pixel grounding *emerges* in its attention.

A faithful miniature of the paper's setting: the model (CLIP ViT vision tower, 2-layer MLP projector,
Llama language model, exactly the architecture and on-disk layout of
:func:`stages.toy.model.build_toy_llava`) is trained from scratch with nothing but the
next-token loss on image captions of the toy world's *train* split (:func:`stages.toy.world.make_example`).
No boxes, masks, coordinates or region tokens are used anywhere. Captions name each object with its
colour and size ("a small red cross"), so to emit "cross" after "red" the model has to look at the red
object's patches: the attention of that step points at the object, which is what the pipeline reads.

Training sequence of one image: the chat prompt the pipeline uses at inference
(``USER: <image>\\n{question} ASSISTANT:``, the question drawn from :attr:`TrainLmmConfig.questions`),
then the answer = `` {caption}</s>``. The loss covers only the answer tokens (caption + end of
sequence); prompt and image tokens have label -100. Images are preprocessed exactly as
:mod:`stages.generate` does: JPEG round trip as the synthetic stage writes them, padding to a square
with the processor's mean colour (:func:`stages.generate.expand_to_square`), then the processor.

Deterministic: everything follows from ``seed`` (torch.manual_seed, deterministic algorithms,
a seeded sampler); the folder appears atomically. Progress goes to the log, one line every
1/25th of the steps. How well the trained model grounds, through the pipeline's own stages:
:mod:`stages.toy.diagnostics`.

CLI::

    python -m stages.toy.train_lmm --out results/models/toy-llava [--steps N --num-train-images N ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.config import schema_default
from stages.io.atomic import atomic_path

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = ("Describe the image in detail.",
                     "Please describe the image in detail, naming every object.")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainLmmConfig:
    """Everything the trained toy model follows from.

    World: ``num_train_images`` images of the synthetic *train* split drawn from ``world_seed`` with
    sides in ``image_size`` (the config's ``synthetic.image_size``). Model: ``model_image_size`` px
    input with ``patch_size`` px patches (grid = model_image_size / patch_size), tower sizes as in
    :func:`stages.toy.model.build_toy_llava`. Optimisation: AdamW, ``steps`` steps of
    ``batch_size`` images, linear warm-up then cosine decay of ``lr``, gradient clipping.
    """

    num_train_images: int = schema_default("train", "lmm", "num_train_images")
    steps: int = schema_default("train", "lmm", "steps")
    batch_size: int = schema_default("train", "lmm", "batch_size")
    lr: float = schema_default("train", "lmm", "lr")
    warmup_steps: int = 60
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = schema_default("train", "lmm", "seed")
    world_seed: int = schema_default("synthetic", "seed")
    image_size: tuple[int, int] = schema_default("synthetic", "image_size")
    model_image_size: int = 96
    patch_size: int = 12
    vision_hidden_size: int = 64
    vision_layers: int = 2
    text_hidden_size: int = 64
    text_layers: int = 2
    num_attention_heads: int = 4
    initializer_range: float = 0.02
    questions: tuple[str, ...] = DEFAULT_QUESTIONS

    def __post_init__(self) -> None:
        for name in ("num_train_images", "steps", "batch_size", "model_image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_image_size % self.patch_size:
            raise ValueError("model_image_size must be a multiple of patch_size")
        if not self.questions:
            raise ValueError("questions must not be empty")


# ---------------------------------------------------------------------------------------------
# Data


def vocabulary_corpus(captions: Sequence[str], questions: Sequence[str]) -> list[str]:
    """Texts the tokenizer is trained on: the captions, the questions, and every word of the toy
    world (so that val/test captions never meet ``<unk>``)."""
    from stages.toy.world import BACKGROUND_TONES, COLOURS, SHAPES, SIZE_WORDS

    words = [*SHAPES, *COLOURS, *BACKGROUND_TONES, *(w for ws in SIZE_WORDS.values() for w in ws if w),
             "A", "An", "The", "a", "an", "the"]
    return [*captions, *questions, " ".join(words)]


def preprocess_image(pixels: np.ndarray, processor: Any, *, jpeg_quality: int | None = None):
    """``pixel_values`` (3, S, S) float32 of one RGB uint8 image, exactly as the generate stage makes
    them (optional JPEG round trip as the synthetic stage saves images, pad to square with the
    processor's mean colour, then the image processor)."""
    from PIL import Image

    from stages.generate import expand_to_square

    image = Image.fromarray(pixels)
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    background = tuple(int(255 * c) for c in processor.image_processor.image_mean)
    square = expand_to_square(image, background)
    return processor.image_processor(images=[square], return_tensors="pt")["pixel_values"][0]


def encode_example(processor: Any, question: str, caption: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one training sequence: the chat prompt with ``<image>`` expanded to
    the grid's image tokens, then the caption and end of sequence. Labels are -100 everywhere but
    on the answer (caption + ``</s>``). The prompt's ids are those the pipeline gives the model at
    inference: the tokenizer's for a ``LlavaProcessor``, the release's chunk-wise ids for the difflmm
    family's ``LlavaV1Processor``."""
    from stages.generate import build_prompt
    from stages.models.llava_v1 import LlavaV1Processor, encode_release_prompt

    tokenizer = processor.tokenizer
    prompt = build_prompt(processor, question, None)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(f"{prompt} {caption}", add_special_tokens=True)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"prompt tokens are not a prefix of prompt + caption for {caption!r}")
    answer = full_ids[len(prompt_ids):] + [tokenizer.eos_token_id]
    if tokenizer.unk_token_id in answer:
        raise ValueError(f"caption has words outside the vocabulary: {caption!r}")
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    crop = processor.image_processor.crop_size
    num_image_tokens = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    if isinstance(processor, LlavaV1Processor):     # the difflmm family: the release's prompt ids
        expanded = encode_release_prompt(tokenizer, prompt, image_id, num_image_tokens)
    else:
        expanded = []
        for token in prompt_ids:
            expanded.extend([token] * num_image_tokens if token == image_id else [token])
    return expanded + answer, [IGNORE_INDEX] * len(expanded) + answer


@dataclass
class TrainData:
    """Pre-processed training set: pixel values (N, 3, S, S) and per (image, question) sequences."""

    pixel_values: Any                      # torch.Tensor (N, 3, S, S)
    input_ids: list[list[list[int]]]       # [image][question] -> ids
    labels: list[list[list[int]]]


def build_train_data(cfg: TrainLmmConfig, processor: Any, examples: Sequence[Any]) -> TrainData:
    import torch

    from stages.toy.world import JPEG_QUALITY

    pixels = torch.stack([preprocess_image(ex.pixels, processor, jpeg_quality=JPEG_QUALITY) for ex in examples])
    input_ids, labels = [], []
    for ex in examples:
        pairs = [encode_example(processor, q, ex.caption) for q in cfg.questions]
        input_ids.append([p[0] for p in pairs])
        labels.append([p[1] for p in pairs])
    return TrainData(pixels, input_ids, labels)


def collate(data: TrainData, indices: Sequence[int], question_indices: Sequence[int], pad_id: int):
    """A right-padded batch: input_ids, attention_mask, labels (long) and pixel_values."""
    import torch

    seqs = [data.input_ids[i][q] for i, q in zip(indices, question_indices)]
    labs = [data.labels[i][q] for i, q in zip(indices, question_indices)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        ids[b, :len(s)] = torch.tensor(s)
        labels[b, :len(lab)] = torch.tensor(lab)
        mask[b, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": data.pixel_values[list(indices)]}


def answer_loss(model: Any, batch: dict[str, Any]):
    """Mean next-token cross-entropy over the answer tokens (labels != -100) of ``batch``."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Model


def init_model(cfg: TrainLmmConfig, corpus: Sequence[str], folder: str | os.PathLike):
    """The random-initialised toy LLaVA (model, processor) of ``cfg``, built by
    :func:`build_toy_llava` into ``folder`` and loaded back with the stock classes, so that the
    trained model's layout is exactly the toy's."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from stages.toy.model import build_toy_llava

    path = build_toy_llava(Path(folder) / "init", corpus, seed=cfg.seed, image_size=cfg.model_image_size,
                           patch_size=cfg.patch_size, vision_hidden_size=cfg.vision_hidden_size,
                           vision_layers=cfg.vision_layers, text_hidden_size=cfg.text_hidden_size,
                           text_layers=cfg.text_layers, num_attention_heads=cfg.num_attention_heads,
                           initializer_range=cfg.initializer_range)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    return model, processor


def learning_rate(cfg: TrainLmmConfig, step: int) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to 5% of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def write_llava(model: Any, processor: Any, folder: Path) -> None:
    """Write the toy LLaVA (llava-hf layout) into the existing empty ``folder``."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


class Trainer:
    """Holds model, processor, data and optimiser; :meth:`step` runs one optimisation step.

    ``init(cfg, corpus, work_dir) -> (model, processor)`` builds the untrained model (default: the toy
    LLaVA, :func:`init_model`); ``write(model, processor, folder)`` writes it in its layout (default:
    :func:`write_llava`). Only parameters with ``requires_grad`` are optimised."""

    def __init__(self, cfg: TrainLmmConfig, work_dir: str | os.PathLike, device: str = "cpu", *,
                 init: Callable[..., tuple[Any, Any]] = init_model,
                 write: Callable[[Any, Any, Path], None] = write_llava):
        import torch

        from stages.toy.world import make_example

        self.cfg = cfg
        self.device = torch.device(device)
        self.write = write
        examples = [make_example(cfg.world_seed, "train", i, cfg.image_size) for i in range(cfg.num_train_images)]
        corpus = vocabulary_corpus([ex.caption for ex in examples], cfg.questions)
        self.model, self.processor = init(cfg, corpus, work_dir)
        self.model.to(self.device).train()
        self.data = build_train_data(cfg, self.processor, examples)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, betas=(0.9, 0.98),
                                           weight_decay=cfg.weight_decay)
        self.num_steps = 0
        self._order: list[int] = []

    def next_batch(self) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        indices = []
        while len(indices) < cfg.batch_size:
            if not self._order:
                self._order = torch.randperm(cfg.num_train_images, generator=self.generator).tolist()
            indices.append(self._order.pop())
        questions = torch.randint(len(cfg.questions), (len(indices),), generator=self.generator).tolist()
        return collate(self.data, indices, questions, self.pad_id)

    def step(self, batch: dict[str, Any] | None = None) -> float:
        import torch

        batch = self.next_batch() if batch is None else batch
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.num_steps)
        loss = answer_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip)
        self.optimizer.step()
        self.num_steps += 1
        return float(loss.detach())

    def save(self, out_dir: str | os.PathLike) -> Path:
        out_dir = Path(out_dir)
        self.model.eval()
        with atomic_path(out_dir) as tmp:
            self.write(self.model.to("cpu"), self.processor, Path(tmp))
        return out_dir


def train_toy_llava(out_dir: str | os.PathLike, cfg: TrainLmmConfig = TrainLmmConfig(), *,
                    device: str = "cpu") -> Path:
    """Train the toy LLaVA of ``cfg`` on train-split captions and write it to ``out_dir`` (llava-hf
    layout, loads with stock ``LlavaForConditionalGeneration`` / ``AutoProcessor``); atomic.

    ``device``: "cpu" (the default run) or "cuda[:N]"; deterministic on either, but a GPU's float
    reductions differ from the CPU's, so the two give (slightly) different models."""
    return train_model(out_dir, cfg, device=device)


@contextlib.contextmanager
def deterministic_training(seed: int, device: str = "cpu"):
    """Seeded (``torch.manual_seed(seed)`` inside a forked RNG), deterministic kernels, one intra-op
    thread; the caller's settings are restored on exit."""
    import torch

    if torch.device(device).type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace (torch.use_deterministic_algorithms).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    # On a GPU some kernels (e.g. the image-feature scatter's backward) have no deterministic
    # implementation: warn there instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=torch.device(device).type == "cuda")
    # One intra-op thread: the same float reductions on every machine, and on a shared 2-core box
    # several times faster than two oversubscribed threads.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train_model(out_dir: str | os.PathLike, cfg: TrainLmmConfig, *, device: str = "cpu",
                init: Callable[..., tuple[Any, Any]] = init_model,
                write: Callable[[Any, Any, Path], None] = write_llava, name: str = "toy llava") -> Path:
    """The training loop of :func:`train_toy_llava` for the model ``init`` builds (see :class:`Trainer`):
    the same data, loss, optimiser, schedule, batch order and seed for every toy LMM; atomic."""
    from stages.progress import ProgressLog

    with deterministic_training(cfg.seed, device), tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        trainer = Trainer(cfg, work, device, init=init, write=write)
        log.info("training data ready in %.1f s (%d images)", time.perf_counter() - start, cfg.num_train_images)
        progress = ProgressLog(cfg.steps, f"train {name}", logger=log)
        running = None
        for _ in range(cfg.steps):
            loss = trainer.step()
            running = loss if running is None else 0.95 * running + 0.05 * loss
            progress.update(loss=running)
        log.info("trained %d steps in %.1f s, final loss %.3f", cfg.steps, time.perf_counter() - start,
                 running)
        return trainer.save(out_dir)


def init_toy_llava(out_dir: str | os.PathLike, cfg: TrainLmmConfig = TrainLmmConfig()) -> Path:
    """The untrained twin of :func:`train_toy_llava` (the random-init control): the same architecture,
    tokenizer and initialisation seed, saved before any optimisation step; atomic."""
    import torch

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as work:
        torch.manual_seed(cfg.seed)
        return Trainer(cfg, work).save(out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.toy.train_lmm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the trained model into (llava-hf layout)")
    defaults = TrainLmmConfig()
    for field in dataclasses.fields(TrainLmmConfig):
        if field.name in ("questions", "image_size"):
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--image-size", type=int, nargs=2, default=list(defaults.image_size))
    parser.add_argument("--question", action="append", help="question(s) to train with (default: both "
                        "pipeline questions); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainLmmConfig)
              if f.name not in ("questions", "image_size")}
    cfg = TrainLmmConfig(**values, image_size=tuple(args.image_size),
                         questions=tuple(args.question) if args.question else DEFAULT_QUESTIONS)
    train_toy_llava(args.out, cfg)


if __name__ == "__main__":
    main()
