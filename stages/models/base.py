"""The contract between the generate stage and an LMM family (imported by the loaders and the registry).

A family is a loader function in its own module, described by a :class:`FamilySpec` in
:data:`stages.models.registry.LMM_FAMILIES`. The loader is called with keyword arguments ``path``
(a local folder or a hub id), ``dtype`` (torch dtype of the parameters), ``attn_implementation``
("sdpa" | "flash_attention_2" | "eager") and ``device`` (:data:`Devices`: one device, or several CUDA
devices the model is spread over by :func:`stages.devices.place_model`), plus ``base`` (the base
language model of a LoRA checkpoint, the release's ``--model-base``; None = the checkpoint's own
choice) when :attr:`FamilySpec.takes_base`, and ``grid`` (one of :attr:`FamilySpec.grid_choices`)
when the family offers several feature grids. It returns a :class:`LoadedLMM` whose model is in eval
mode on ``device``, and raises :class:`~stages.config.ConfigError` naming ``path`` when the model
cannot be loaded. This module and the registry import neither torch nor transformers; a family's
module (which may) is imported only when that family is loaded.

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
    ``layout_keys``: keys of the processor's output that only ``image_layouts`` reads (InternVL2.5's
    tile arrangement); :meth:`model_inputs` leaves them out of what the model is called with.
    """

    family: str
    path: str
    model: Any
    processor: Any
    image_token_id: int
    image_layouts: Callable[[Mapping[str, Any]], list[ImageLayout]]
    pad_to_square: bool
    unpadded_grid_covers: str = "image"
    layout_keys: tuple[str, ...] = ()

    def model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The processor's batch output without :attr:`layout_keys`: the keyword arguments of the model's
        forward and generate."""
        return {key: value for key, value in inputs.items() if key not in self.layout_keys}


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


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What the registry knows about one LMM family without importing it.

    ``name``: the ``lmm.family`` value. ``module``: dotted path of the module that defines the loader
    (imported only when the family is loaded). ``loader``: the loader function's name in it.
    ``takes_base``: whether the loader takes ``base`` (LoRA checkpoints); for the other families a
    non-null ``lmm.base`` is a ConfigError. ``grid_choices``: the values ``lmm.grid`` may take, the
    first being the default; empty when the family has one grid (then ``lmm.grid`` must be null and
    the loader takes no ``grid``). ``takes_pixels``: whether the loader takes ``min_pixels`` and
    ``max_pixels`` (the processor's per-image pixel budget); for the other families a non-null
    ``lmm.min_pixels`` / ``lmm.max_pixels`` is a ConfigError.
    """

    name: str
    module: str
    loader: str
    takes_base: bool = False
    grid_choices: tuple[str, ...] = ()
    takes_pixels: bool = False
    takes_tiles: bool = False
