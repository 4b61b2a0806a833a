"""Registry of LMM families: family name -> loader returning the model and its processor.

A loader takes ``(path, dtype, attn_implementation, device, base)`` and returns a :class:`LoadedLMM`
whose model is in eval mode on ``device`` (:data:`Devices`: one device, or several CUDA devices the
model is spread over by :func:`stages.devices.place_model`); ``base`` is the base language model of
a LoRA checkpoint (the release's ``--model-base``), None for the checkpoint's own choice. A family whose image
features can be laid on more than one grid (:data:`GRID_CHOICES`) also takes ``grid`` (``lmm.grid``)
as a keyword. ``path`` is a local folder or a hub id; a loader raises
:class:`~stages.config.ConfigError` naming ``path`` when neither works. Heavy imports happen inside
the loaders.

Coordinate conventions: a feature grid has ``rows`` x ``columns`` cells, cell (r, c) in row r from
the top and column c from the left; grids are flattened row-major (index r * columns + c).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from stages.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

# Where a loader puts its model: one device ("cpu", "cuda:1", torch.device), or several CUDA devices
# ("cuda:0", "cuda:1", ...) it is spread over (lmm.gpus > 1).
Devices: TypeAlias = "str | torch.device | Sequence[str | torch.device]"


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Where one image's feature-grid cells sit in one input sequence.

    ``positions``: (rows * columns,) int64 sequence indices into that batch item's ``input_ids``
    (left padding included, so they are the key positions the language model attends to), row-major
    over the grid: cell (r, c) is the token at ``positions[r * columns + c]``. ``grid``: (rows,
    columns). Tokens of the image that are no grid cell (LLaVA-NeXT's row-end newline tokens, a
    second grid) are simply not listed.
    """

    positions: "torch.Tensor"   # (rows * columns,) int64 sequence indices, row-major over the grid
    grid: tuple[int, int]       # (rows, columns)

    def __post_init__(self) -> None:
        rows, columns = self.grid
        if rows < 1 or columns < 1 or tuple(self.positions.shape) != (rows * columns,):
            raise ValueError(f"an image layout on a {rows} x {columns} grid needs {rows * columns} "
                             f"positions, got shape {tuple(self.positions.shape)}")


@dataclasses.dataclass(frozen=True)
class LoadedLMM:
    """A loaded LMM: the model, its processor (tokenizer + image processor + chat template) and facts
    the generate stage needs.

    ``image_token_id``: id of the image placeholder token in ``input_ids``.
    ``image_layouts``: the processor's batch output (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_sizes`` / ``image_grid_thw`` ...; one image per batch item) -> one
    :class:`ImageLayout` per batch item, on the device of ``input_ids``; raises ValueError when the
    batch does not hold the image tokens the model expects. Grids may differ between items.
    ``pad_to_square``: True when the model was trained on images padded to a centred square with the
    processor's mean colour (LLaVA-1.5 ``expand2square``): the generate stage then pads before the
    processor and the grid covers that square. False: the image goes to the processor as it is and
    the grid covers the whole image, stretched to the grid's aspect. (``generate.pad_to_square``
    may override it; the store records what the grids cover.)
    ``unpadded_grid_covers``: what the grid covers when the image is *not* padded: "image" (the
    processor takes the whole image) or "centre_square" (a CLIP-style processor resizes the shorter
    side and crops the centre square, as the LLaVA-1.5 families' do).
    """

    family: str
    path: str
    model: Any
    processor: Any
    image_token_id: int
    image_layouts: Callable[[Mapping[str, Any]], list[ImageLayout]]
    pad_to_square: bool
    unpadded_grid_covers: str = "image"


def uniform_layouts(image_token_id: int,
                    grid: tuple[int, int]) -> Callable[[Mapping[str, Any]], list[ImageLayout]]:
    """:attr:`LoadedLMM.image_layouts` for models whose every image fills one fixed grid with its
    image tokens in row-major order (LLaVA-1.5: 24 x 24 = 576 "<image>" tokens per image).

    The returned function finds the ``image_token_id`` tokens of each ``input_ids`` row (B, L) and
    raises ValueError unless every row holds exactly ``rows * columns`` of them.
    """
    rows, columns = int(grid[0]), int(grid[1])

    def layouts(inputs: Mapping[str, Any]) -> list[ImageLayout]:
        is_image = inputs["input_ids"] == image_token_id
        counts = is_image.sum(dim=1).tolist()
        if any(count != rows * columns for count in counts):
            raise ValueError(f"the {rows} x {columns} feature grid needs {rows * columns} image tokens "
                             f"(id {image_token_id}) per sequence; the processor gave {counts}")
        positions = is_image.nonzero()[:, 1].view(len(counts), rows * columns)
        return [ImageLayout(positions[b], (rows, columns)) for b in range(len(counts))]

    return layouts


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


LMMLoader = Callable[..., LoadedLMM]

# Families whose features can be read on more than one grid -> the choices of lmm.grid (first: default).
GRID_CHOICES: dict[str, tuple[str, ...]] = {"llava_next": ("highres", "base")}


def _no_base(family: str, base: str | None) -> None:
    if base is not None:
        raise ConfigError(f"lmm.base ({base!r}) names the base model of a LoRA checkpoint; family {family!r} "
                          "loads full checkpoints: leave lmm.base null")


def _load_llava(path: str, dtype: torch.dtype, attn_implementation: str, device: Devices,
                base: str | None) -> LoadedLMM:
    from stages.models.llava import load_llava

    _no_base("llava", base)
    return load_llava(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


def _load_llava_original(path: str, dtype: torch.dtype, attn_implementation: str,
                         device: Devices, base: str | None) -> LoadedLMM:
    from stages.models.llava_original import load_llava_original

    _no_base("llava_original", base)
    return load_llava_original(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


def _load_difflmm(path: str, dtype: torch.dtype, attn_implementation: str, device: Devices,
                  base: str | None) -> LoadedLMM:
    from stages.models.difflmm import load_difflmm

    return load_difflmm(path, dtype=dtype, attn_implementation=attn_implementation, device=device, base=base)


def _load_llava_next(path: str, dtype: torch.dtype, attn_implementation: str, device: Devices,
                     base: str | None, *, grid: str = GRID_CHOICES["llava_next"][0]) -> LoadedLMM:
    from stages.models.llava_next import load_llava_next

    _no_base("llava_next", base)
    return load_llava_next(path, dtype=dtype, attn_implementation=attn_implementation, device=device,
                           grid=grid)


def _load_qwen2_5_vl(path: str, dtype: torch.dtype, attn_implementation: str, device: Devices,
                     base: str | None) -> LoadedLMM:
    from stages.models.qwen2_5_vl import load_qwen2_5_vl

    _no_base("qwen2_5_vl", base)
    return load_qwen2_5_vl(path, dtype=dtype, attn_implementation=attn_implementation, device=device)


LMM_FAMILIES: dict[str, LMMLoader] = {
    "llava": _load_llava,
    "llava_original": _load_llava_original,
    "difflmm": _load_difflmm,
    "llava_next": _load_llava_next,
    "qwen2_5_vl": _load_qwen2_5_vl,
}


def load_lmm(family: str, path: str, *, dtype: torch.dtype, attn_implementation: str,
             device: Devices, base: str | None = None, grid: str | None = None) -> LoadedLMM:
    """Load the LMM of ``family`` from ``path`` (``base``: a LoRA checkpoint's base model, None = the
    checkpoint's own; ``grid``: which feature grid the rows map onto, for families in
    :data:`GRID_CHOICES`, None = the family's default). Unknown family -> ConfigError listing the
    known ones; a ``grid`` the family does not offer -> ConfigError naming lmm.grid."""
    try:
        loader = LMM_FAMILIES[family]
    except KeyError:
        raise ConfigError(f"unknown LMM family {family!r} (lmm.family); "
                          f"known: {sorted(LMM_FAMILIES)}") from None
    if grid is None:
        return loader(path, dtype, attn_implementation, device, base)
    choices = GRID_CHOICES.get(family)
    if choices is None:
        raise ConfigError(f"lmm.grid ({grid!r}) chooses between feature grids of families "
                          f"{sorted(GRID_CHOICES)}; family {family!r} has one grid: leave lmm.grid null")
    if grid not in choices:
        raise ConfigError(f"lmm.grid {grid!r} unknown for family {family!r}; known: {list(choices)}")
    return loader(path, dtype, attn_implementation, device, base, grid=grid)
