"""Registry of LMM families: a table of :class:`~stages.models.base.FamilySpec`, loaded lazily.

:func:`load_lmm` checks ``lmm.family``, ``lmm.base`` and ``lmm.grid`` against the table, then imports
the family's module and calls its loader (the contract is in :mod:`stages.models.base`). Importing
this module imports no family module, torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from stages.config import ConfigError
from stages.models.base import FamilySpec

if TYPE_CHECKING:
    import torch

    from stages.models.base import Devices, LoadedLMM

LMM_FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("llava", "stages.models.llava", "load_llava"),
    FamilySpec("llava_original", "stages.models.llava_original", "load_llava_original"),
    FamilySpec("difflmm", "stages.models.difflmm", "load_difflmm", takes_base=True),
    FamilySpec("llava_next", "stages.models.llava_next", "load_llava_next", grid_choices=("highres", "base")),
    FamilySpec("qwen2_5_vl", "stages.models.qwen2_5_vl", "load_qwen2_5_vl", takes_pixels=True),
    FamilySpec("cambrian", "stages.models.cambrian", "load_cambrian"),
    FamilySpec("internvl2_5", "stages.models.internvl2_5", "load_internvl2_5", grid_choices=("tiles", "thumbnail"),
               takes_tiles=True),
)}


def _bounds(family: str, unit: str, low: int | None, high: int | None, what: str, why_not: str) -> dict[str, int]:
    """The loader options ``min_<unit>`` / ``max_<unit>`` of ``lmm.min_<unit>`` / ``lmm.max_<unit>`` (None:
    left out). ConfigError naming the key when ``family`` does not take them (FamilySpec.takes_<unit>:
    ``what`` they set, ``why_not`` this family has none) or when ``low > high``."""
    given = {f"{end}_{unit}": value for end, value in (("min", low), ("max", high)) if value is not None}
    if given and not getattr(LMM_FAMILIES[family], f"takes_{unit}"):
        others = sorted(name for name, spec in LMM_FAMILIES.items() if getattr(spec, f"takes_{unit}"))
        raise ConfigError(f"lmm.{next(iter(given))} {what} {others}; family {family!r} {why_not}: leave it null")
    if len(given) == 2 and low > high:
        raise ConfigError(f"lmm.min_{unit} ({low}) is above lmm.max_{unit} ({high})")
    return given


def load_lmm(family: str, path: str, *, dtype: torch.dtype, attn_implementation: str,
             device: Devices, base: str | None = None, grid: str | None = None,
             min_pixels: int | None = None, max_pixels: int | None = None,
             min_tiles: int | None = None, max_tiles: int | None = None) -> LoadedLMM:
    """Load the LMM of ``family`` from ``path`` (``base``: a LoRA checkpoint's base model, None = the
    checkpoint's own; ``grid``: which feature grid the rows map onto, for families with
    ``grid_choices``, None = the family's default; ``min_pixels`` / ``max_pixels``: the per-image pixel
    budget of families that take one, None = the checkpoint's; ``min_tiles`` / ``max_tiles``: the tile
    range of families that tile images, None = the checkpoint's).

    ConfigError for an unknown family (listing the known ones), a ``base`` given to a family that loads
    full checkpoints (naming lmm.base), a ``grid`` given to a family with one grid or not among the
    family's choices (naming lmm.grid), a pixel budget given to a family without one or with
    ``min_pixels > max_pixels`` (naming lmm.min_pixels / lmm.max_pixels), a tile range likewise (naming
    lmm.min_tiles / lmm.max_tiles); the loader's own ConfigErrors name ``path``.
    """
    try:
        spec = LMM_FAMILIES[family]
    except KeyError:
        raise ConfigError(f"unknown LMM family {family!r} (lmm.family); "
                          f"known: {sorted(LMM_FAMILIES)}") from None
    if base is not None and not spec.takes_base:
        raise ConfigError(f"lmm.base ({base!r}) names the base model of a LoRA checkpoint; family {family!r} "
                          "loads full checkpoints: leave lmm.base null")
    options = {"base": base} if spec.takes_base else {}
    if grid is not None and not spec.grid_choices:
        with_grids = sorted(name for name, other in LMM_FAMILIES.items() if other.grid_choices)
        raise ConfigError(f"lmm.grid ({grid!r}) chooses between feature grids of families {with_grids}; "
                          f"family {family!r} has one grid: leave lmm.grid null")
    if spec.grid_choices:
        if grid is not None and grid not in spec.grid_choices:
            raise ConfigError(f"lmm.grid {grid!r} unknown for family {family!r}; "
                              f"known: {list(spec.grid_choices)}")
        options["grid"] = spec.grid_choices[0] if grid is None else grid
    options.update(_bounds(family, "pixels", min_pixels, max_pixels, "sets the per-image pixel budget of families",
                           "resizes every image to its fixed input"))
    options.update(_bounds(family, "tiles", min_tiles, max_tiles, "sets how many tiles an image is cut into by families",
                           "does not tile images"))
    loader = getattr(importlib.import_module(spec.module), spec.loader)
    return loader(path, dtype=dtype, attn_implementation=attn_implementation, device=device, **options)
