"""LLaVA's training JSON to token ids and labels, as LLaVA-1.5's ``train.py`` prepares them.

A data set is LLaVA's JSON list (LCS-558K's ``blip_laion_cc_sbu_558k.json``, the instruction mix
``llava_v1_5_mix665k.json``): entries ``{"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}``.

Templates (the release's ``conversation.py``):

- ``plain`` (stage 1, ``preprocess_plain``): the image, then the first answer (the caption) and "\\n";
  the human turn is dropped. Labels: the caption and "\\n".
- ``v1`` (stage 2, ``conv_llava_v1``, ``SeparatorStyle.TWO``): ``"{system} USER: <image>\\n{q1}
  ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."``, "<image>" moved to the front of the first
  human turn (``preprocess_multimodal``). Labels: every assistant answer with its "</s>"; system,
  user turns and "ASSISTANT:" are masked (-100). The prompt up to the first "ASSISTANT:" is exactly the
  prompt the generate stage gives the trained model.

Token ids are the release's ``tokenizer_image_token`` ids
(:func:`stages.models.llava_v1.encode_release_prompt`:
the prompt tokenised chunk by chunk around "<image>"), with the image expanded to the model's
``image_tokens`` copies of :data:`IMAGE_INDEX` (the release's sentinel -200), where the model writes its
image features. Where a label span starts is found by tokenising the text up to it: the span starts at
the first token where those ids and the whole text's ids part. Sequences are cut to ``max_length``
tokens, image tokens included (the release's ``tokenizer_model_max_length``); a cut through the image
is an error.

Images (``image_aspect_ratio``): ``pad`` pads to a centred square with the image processor's mean
colour (the generate stage's :func:`stages.generate.expand_to_square`), ``square`` leaves the image to
the processor (resize the shorter side, crop the centre).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import ConfigError
from stages.models.llava_v1 import IMAGE_TOKEN, LLAVA_V1_SYSTEM, encode_release_prompt

IMAGE_INDEX = -200
IGNORE_INDEX = -100
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def read_entries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a LLaVA JSON file; ConfigError naming the file when it is not that format."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the training data {path}: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("conversations")
                                                  for e in entries):
        raise ConfigError(f"{path}: not LLaVA's JSON format (a list of entries with `conversations`)")
    if not entries:
        raise ConfigError(f"{path}: no entries")
    return entries


def template_pieces(entry: dict[str, Any], template: str) -> list[tuple[str, bool]]:
    """The text of ``entry`` in ``template`` ("plain" | "v1") as (piece, trained) pairs."""
    turns = entry["conversations"]
    has_image = "image" in entry
    if template == "plain":
        if len(turns) < 2:
            raise ValueError(f"entry {entry.get('id')!r}: the plain template needs a human and a gpt turn")
        return [(IMAGE_TOKEN if has_image else "", False), (turns[1]["value"] + "\n", True)]
    if template != "v1":
        raise ValueError(f"unknown template {template!r}")
    if turns and turns[0]["from"] != "human":         # the release skips a leading non-human turn
        turns = turns[1:]
    pieces: list[tuple[str, bool]] = [(LLAVA_V1_SYSTEM + " ", False)]
    for index, turn in enumerate(turns):
        role = ROLES.get(turn["from"])
        if role is None or role != ("USER" if index % 2 == 0 else "ASSISTANT"):
            raise ValueError(f"entry {entry.get('id')!r}: turns must alternate human / gpt")
        value = turn["value"]
        if index == 0 and has_image:
            value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
        if role == "USER":
            pieces.append((f"USER: {value} ASSISTANT:", False))
        else:
            pieces.append((f" {value}</s>", True))
    return pieces


def encode_entry(tokenizer: Any, entry: dict[str, Any], template: str, image_tokens: int,
                 max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one entry (module docstring); image tokens are :data:`IMAGE_INDEX`."""
    pieces = template_pieces(entry, template)
    text = "".join(piece for piece, _ in pieces)
    ids = encode_release_prompt(tokenizer, text, IMAGE_INDEX, image_tokens)
    labels = [IGNORE_INDEX] * len(ids)
    prefix, start = "", 0
    for piece, trained in pieces:
        prefix += piece
        prefix_ids = ids if prefix == text else encode_release_prompt(tokenizer, prefix, IMAGE_INDEX,
                                                                      image_tokens)
        end = 0
        while end < min(len(prefix_ids), len(ids)) and prefix_ids[end] == ids[end]:
            end += 1
        if trained:
            labels[start:end] = ids[start:end]
        start = end
    ids, labels = ids[:max_length], labels[:max_length]
    if ids.count(IMAGE_INDEX) not in (0, image_tokens):
        raise ValueError(f"entry {entry.get('id')!r}: max_length {max_length} cuts through the image tokens")
    return ids, labels


def load_image(folder: str | os.PathLike, name: str, image_processor: Any, aspect: str):
    """pixel_values (3, H, W) of one image (module docstring: ``pad`` / ``square``)."""
    from PIL import Image

    from stages.generate import expand_to_square

    with Image.open(Path(folder) / name) as opened:
        image = opened.convert("RGB")
    if aspect == "pad":
        image = expand_to_square(image, tuple(int(255 * c) for c in image_processor.image_mean))
    return image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


@dataclass
class TrainingData:
    """One stage's data: the entries, how to encode them, and where their images are."""

    entries: list[dict[str, Any]]
    tokenizer: Any
    image_processor: Any
    template: str
    image_tokens: int
    max_length: int
    image_folder: str
    image_aspect_ratio: str

    def __len__(self) -> int:
        return len(self.entries)

    def item(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        ids, labels = encode_entry(self.tokenizer, entry, self.template, self.image_tokens, self.max_length)
        pixels = None
        if IMAGE_INDEX in ids:
            pixels = load_image(self.image_folder, entry["image"], self.image_processor,
                                self.image_aspect_ratio)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        return collate([self.item(i) for i in indices], self.tokenizer.pad_token_id)


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``labels`` / ``attention_mask`` (B, L) and the images of the items
    that have one, in batch order (``pixel_values`` (n, 3, H, W), or None)."""
    import torch

    length = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(images) if images else None}
