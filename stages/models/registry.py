"""Registry of LMM families: family name -> loader returning the model and its processor.

A loader takes ``(path, dtype, attn_implementation, device, base)`` and returns a :class:`LoadedLMM`
whose model is in eval mode on ``device``; ``base`` is the base language model of a LoRA checkpoint
(the release's ``--model-base``), None for the checkpoint's own choice. ``path`` is a local folder or a hub id; a loader raises
:class:`~stages.config.ConfigError` naming ``path`` when neither works. Heavy imports happen inside
the loaders.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from stages.config import ConfigError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Where one image's feature-grid cells sit in one input sequence."""
    positions: "torch.Tensor"   # (rows * columns,) int64 sequence indices, row-major over the grid
    grid: tuple[int, int]       # (rows, columns)


@dataclasses.dataclass(frozen=True)
class LoadedLMM:
    """A loaded LMM: the model, its processor (tokenizer + image processor + chat template) and facts
    the generate stage needs.

    ``image_token_id``: id of the image placeholder token in ``input_ids``; ``patch_size``: pixels per
    feature-grid cell of the vision tower; ``grid``: (rows, columns) of the feature grid the image
    tokens are laid on, row-major (LLaVA-1.5: 24 x 24).

    ``image_layouts``: the processor's batch output (input_ids, attention_mask, pixel_values,
    image_grid_thw ...) -> one :class:`ImageLayout` per batch item (one image per item).
    ``pad_to_square``: whether the image is padded to a square before the processor (LLaVA-1.5's
    ``expand2square``); False: the image goes to the processor as is and the grid covers the whole image.

    This branch's copy of the per-image-grid contract (branch ragged-grid owns it and sets the new
    fields in every loader). Until it lands, every field after ``image_token_id`` has a default: the
    fixed-grid loaders do not set the new fields yet, and a per-image-grid family (qwen2_5_vl) has no
    fixed ``patch_size`` or ``grid``.
    """

    family: str
    path: str
    model: Any
    processor: Any
    image_token_id: int
    patch_size: int | None = None
    grid: tuple[int, int] | None = None
    image_layouts: Callable[[Mapping[str, Any]], list[ImageLayout]] | None = None
    pad_to_square: bool = True


# A hub id: "name" or "owner/name" (letters, digits, "-", "_", "."), not starting with a dot.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


def model_source(path: str) -> str:
    """Check that ``path`` is an existing folder or has the form of a hub id; return it unchanged.

    Anything else (e.g. ``results/models/toy-llava`` before it is built, an absolute path that does
    not exist, a file) raises ConfigError naming the path at once, without a network round trip.
    """
    local = Path(path)
    if local.is_dir():
        return path
    if local.exists():
        raise ConfigError(f"LMM path {path!r} is a file; expected a model folder or a hub id")
    if not _HUB_ID.match(path):
        raise ConfigError(f"LMM folder {path!r} does not exist (and is not a hub id)")
    return path


LMMLoader = Callable[[str, "torch.dtype", str, "torch.device", "str | None"], LoadedLMM]


def _no_base(family: str, base: str | None) -> None:
    if base is not None:
        raise ConfigError(f"lmm.base ({base!r}) names the base model of a LoRA checkpoint; family {family!r} "
                          "loads full checkpoints: leave lmm.base null")


def _load_llava(path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device,
                base: str | None) -> LoadedLMM:
    from stages.models.llava import load_llava

    _no_base("llava", base)
    return load_llava(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


def _load_llava_original(path: str, dtype: torch.dtype, attn_implementation: str,
                         device: torch.device, base: str | None) -> LoadedLMM:
    from stages.models.llava_original import load_llava_original

    _no_base("llava_original", base)
    return load_llava_original(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


def _load_difflmm(path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device,
                  base: str | None) -> LoadedLMM:
    from stages.models.difflmm import load_difflmm

    return load_difflmm(path, dtype=dtype, attn_implementation=attn_implementation, device=device, base=base)


def _load_qwen2_5_vl(path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device,
                     base: str | None) -> LoadedLMM:
    from stages.models.qwen2_5_vl import load_qwen2_5_vl

    _no_base("qwen2_5_vl", base)
    return load_qwen2_5_vl(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


LMM_FAMILIES: dict[str, LMMLoader] = {
    "llava": _load_llava,
    "llava_original": _load_llava_original,
    "difflmm": _load_difflmm,
    "qwen2_5_vl": _load_qwen2_5_vl,
}


def load_lmm(family: str, path: str, *, dtype: torch.dtype, attn_implementation: str,
             device: torch.device, base: str | None = None) -> LoadedLMM:
    """Load the LMM of ``family`` from ``path`` (``base``: a LoRA checkpoint's base model, None = the
    checkpoint's own); unknown family -> ConfigError listing the known ones."""
    try:
        loader = LMM_FAMILIES[family]
    except KeyError:
        raise ConfigError(f"unknown LMM family {family!r} (lmm.family); "
                          f"known: {sorted(LMM_FAMILIES)}") from None
    return loader(path, dtype, attn_implementation, device, base)
