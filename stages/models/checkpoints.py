"""Checkpoints in the published pickle formats (``.bin``, ``.pth``), read without running their code.

Unpickling may call any function the file names. ``torch.load(weights_only=True)`` unpickles tensors,
containers and plain values only and refuses anything else before calling it;
:func:`load_weights_only` turns that refusal into a ConfigError naming the file. This is the project's
only reader of pickles: artifacts are Parquet, Zarr and JSON, other checkpoints safetensors.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from stages.config import ConfigError


def load_weights_only(path: str | os.PathLike, *, what: str, mmap: bool = False) -> Any:
    """The tensors (in their containers) of the pickle checkpoint ``path``, on the CPU (``mmap``: mapped
    rather than read, for large files). ConfigError naming ``what`` and ``path`` when the file holds
    anything else, e.g. an object whose unpickling would run code; nothing of it runs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message: advice to load unsafely, the reason, a documentation link.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines[1:-1]) or str(exc)
        raise ConfigError(f"{what} {path} was refused: it holds more than tensors and plain values "
                          f"({reason}). Nothing in it was run; re-save the weights of a trusted copy as "
                          f"tensors only (e.g. .safetensors)") from None
