"""The sharded attention store: one Zarr v3 group per shard holding every captured row.

Layout (declared in :mod:`schemas.artifacts`): array ``rows`` of float16, shape
``(total_tokens, grid_h, grid_w)``, chunked and sharded along the token axis; group attributes
``schema_version``, ``artifact``, ``model``, ``grid`` and ``reduction``. Rows of one image are
contiguous and located by the generations table's ``row_offset`` and ``num_tokens``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from schemas.artifacts import ATTENTION_ARRAY, ATTENTION_DIMENSIONS, ATTENTION_DTYPE, SCHEMA_VERSION
from stages.io.atomic import atomic_path
from stages.io.tables import ArtifactError


class AttentionWriter:
    """Append attention rows to a new store; the store appears at ``path`` only on :meth:`close`.

    Use as a context manager. ``append(rows)`` takes a float array of shape (n, grid_h, grid_w),
    stores it as float16 and returns the offset of its first row.
    """

    def __init__(self, path: str | os.PathLike, grid: tuple[int, int], *, model: str,
                 reduction: dict[str, Any], tokens_per_chunk: int = 256, chunks_per_shard: int = 16):
        self.path = Path(path)
        self.grid = (int(grid[0]), int(grid[1]))
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        group = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
        group.attrs.update({
            "schema_version": SCHEMA_VERSION, "artifact": "attention", "model": model,
            "grid": list(self.grid), "reduction": reduction,
        })
        self._rows = group.create_array(
            ATTENTION_ARRAY, shape=(0, *self.grid), dtype=ATTENTION_DTYPE,
            chunks=(tokens_per_chunk, *self.grid), shards=(tokens_per_chunk * chunks_per_shard, *self.grid),
            dimension_names=ATTENTION_DIMENSIONS, fill_value=0)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._written = 0
        self._flush_rows = tokens_per_chunk * chunks_per_shard

    @property
    def num_rows(self) -> int:
        return self._written + self._pending_rows

    def append(self, rows: np.ndarray) -> int:
        rows = np.asarray(rows)
        if rows.ndim != 3 or tuple(rows.shape[1:]) != self.grid:
            raise ValueError(f"rows must have shape (n, {self.grid[0]}, {self.grid[1]}), got {rows.shape}")
        offset = self.num_rows
        if len(rows):
            self._pending.append(rows.astype(np.float16))
            self._pending_rows += len(rows)
            if self._pending_rows >= self._flush_rows:
                self._flush()
        return offset

    def _flush(self) -> None:
        if not self._pending:
            return
        block = np.concatenate(self._pending)
        start = self._written
        self._rows.resize((start + len(block), *self.grid))
        self._rows[start:start + len(block)] = block
        self._written += len(block)
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self._atomic.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "AttentionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def open_attention(path: str | os.PathLike) -> zarr.Array:
    """Open a shard's attention rows read-only, checking the schema version.

    Returns the ``rows`` array (float16, (total_tokens, grid_h, grid_w)); the group's attributes
    (model, grid, reduction) come from :func:`attention_attrs`.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"attention store not found: {path}")
    group = zarr.open_group(str(path), mode="r")
    version = group.attrs.get("schema_version")
    if group.attrs.get("artifact") != "attention" or version != SCHEMA_VERSION:
        raise ArtifactError(f"{path} is not an attention store of schema version {SCHEMA_VERSION} "
                            f"(found artifact={group.attrs.get('artifact')!r}, version={version!r})")
    return group[ATTENTION_ARRAY]


def attention_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attention store's group attributes (model, grid, reduction, schema_version)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)


def read_rows(rows: zarr.Array, offset: int, count: int) -> np.ndarray:
    """Rows ``offset .. offset+count`` as float32, shape (count, grid_h, grid_w)."""
    return np.asarray(rows[offset:offset + count], dtype=np.float32)
