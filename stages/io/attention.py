"""The sharded attention store: one Zarr v3 group per shard holding every captured map.

Layout (declared in :mod:`schemas.artifacts`): one 1-D float16 array ``values`` holding every map of
the shard, sample after sample and token after token, each map row-major over its own image's grid
(images of one shard may have different grids); chunked and sharded along its only axis. The
generations table locates a sample's maps: ``attention_offset`` (first element), ``num_tokens``,
``grid_h`` and ``grid_w``; they are one contiguous slice of ``num_tokens * grid_h * grid_w`` values.
Group attributes: ``schema_version``, ``artifact``, ``model``, ``grid_covers`` (what the grids cover:
"padded_square", "centre_square" or "image"), ``reduction``, ``forced_rows`` (which query a forced
answer's token takes its row from: "emitting" or "own") and ``provenance`` (the record the stage
gives, :func:`stages.provenance.record`).

Chunks are Zstd-compressed with Zstd's content checksum, and every chunk is written, even one of zeros,
so a store always holds one Zarr shard file per ``chunk_values * chunks_per_shard`` values. Reading a
store whose metadata does not parse, one of whose shard files is missing or empty, or whose chunk or
shard index fails its checksum or decompression raises
:class:`~stages.io.tables.CorruptArtifactError` naming the store and rule ``generate``: a damaged store is
never read as zeros.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from schemas.artifacts import (
    ATTENTION_ARRAY,
    ATTENTION_DIMENSIONS,
    ATTENTION_DTYPE,
    FORCED_ROWS,
    GRID_COVERS,
    SCHEMA_VERSION,
)
from stages.io.atomic import atomic_path
from stages.io.tables import ArtifactError, CorruptArtifactError, unreadable

# 2**20 float16 values = 2 MiB per chunk (the unit read and decompressed); 16 chunks per shard file.
CHUNK_VALUES = 2**20
CHUNKS_PER_SHARD = 16


class AttentionWriter:
    """Append attention maps to a new store; the store appears at ``path`` only on :meth:`close`.

    Use as a context manager. ``append(rows)`` takes one sample's maps, a float array of shape
    (n, grid_h, grid_w) with that image's own grid, stores them as float16 and returns the element
    offset of their first value. ``grid_covers``: "padded_square", "centre_square" or "image" (see
    :data:`schemas.artifacts.GRID_COVERS`); ``forced_rows``: "emitting" or "own"
    (:data:`schemas.artifacts.FORCED_ROWS`); ``provenance``: the store's provenance record (attribute
    ``provenance``; none when None). Values are written a whole Zarr shard file at a time
    (``chunk_values * chunks_per_shard`` values), the remainder on close, so no shard file is
    rewritten.
    """

    def __init__(self, path: str | os.PathLike, *, model: str, reduction: dict[str, Any], grid_covers: str,
                 forced_rows: str = "emitting", provenance: dict[str, Any] | None = None, chunk_values: int = CHUNK_VALUES,
                 chunks_per_shard: int = CHUNKS_PER_SHARD):
        if grid_covers not in GRID_COVERS:
            raise ValueError(f"grid_covers must be one of {GRID_COVERS}, got {grid_covers!r}")
        if forced_rows not in FORCED_ROWS:
            raise ValueError(f"forced_rows must be one of {FORCED_ROWS}, got {forced_rows!r}")
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._shard_values = chunk_values * chunks_per_shard
        try:
            group = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
            group.attrs.update({
                "schema_version": SCHEMA_VERSION, "artifact": "attention", "model": model,
                "grid_covers": grid_covers, "reduction": reduction, "forced_rows": forced_rows,
                **({} if provenance is None else {"provenance": provenance}),
            })
            # Zstd with its content checksum: a damaged chunk fails to decode instead of reading as other
            # values. write_empty_chunks: a chunk of zeros is written too, so a missing shard file is damage.
            self._values = group.create_array(
                ATTENTION_ARRAY, shape=(0,), dtype=ATTENTION_DTYPE, chunks=(chunk_values,),
                shards=(self._shard_values,), dimension_names=ATTENTION_DIMENSIONS, fill_value=0,
                compressors=ZstdCodec(level=0, checksum=True), config={"write_empty_chunks": True})
        except BaseException as exc:
            self.abort(exc)
            raise
        self._pending: list[np.ndarray] = []
        self._pending_values = 0
        self._written = 0

    @property
    def num_values(self) -> int:
        """Values appended so far: the offset the next :meth:`append` returns."""
        return self._written + self._pending_values

    def append(self, rows: np.ndarray) -> int:
        rows = np.asarray(rows)
        if rows.ndim != 3:
            raise ValueError(f"rows must have shape (n, grid_h, grid_w), got {rows.shape}")
        offset = self.num_values
        if rows.size:
            self._pending.append(rows.astype(np.float16).reshape(-1))
            self._pending_values += rows.size
            if self._pending_values >= self._shard_values:
                self._flush(final=False)
        return offset

    def _flush(self, final: bool) -> None:
        """Write the pending values: all of them when ``final``, else the whole shard files among them."""
        if not self._pending:
            return
        block = np.concatenate(self._pending)
        count = len(block) if final else len(block) // self._shard_values * self._shard_values
        start = self._written
        self._values.resize((start + count,))
        self._values[start:start + count] = block[:count]
        self._written += count
        rest = block[count:]
        self._pending, self._pending_values = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        try:
            self._flush(final=True)
        except BaseException as exc:
            self.abort(exc)
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        """Remove the unfinished store; raises atomic_path's clearer error for a folder that is not
        writable or a full disk (else the caller re-raises ``exc``)."""
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def open_attention(path: str | os.PathLike) -> zarr.Array:
    """Open a shard's attention values read-only, checking the schema version and the attributes.

    Returns the ``values`` array (float16, 1-D); read one image's maps with :func:`read_rows`, the
    group's attributes (model, grid_covers, reduction) with :func:`attention_attrs`. A store of
    another schema version (e.g. "1": one (tokens, h, w) array ``rows`` with a single grid) raises
    :class:`ArtifactError` naming both versions; unreadable metadata or a missing or empty shard file
    raises :class:`CorruptArtifactError` (rerun rule generate).
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"attention store not found: {path}")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr.json missing or not JSON
        raise unreadable(path, "attention", exc) from exc
    version = group.attrs.get("schema_version")
    if group.attrs.get("artifact") != "attention" or version != SCHEMA_VERSION:
        raise ArtifactError(f"{path} is not an attention store of schema version {SCHEMA_VERSION} "
                            f"(found artifact={group.attrs.get('artifact')!r}, version={version!r}); "
                            "rerun the generate stage to rewrite it")
    if group.attrs.get("grid_covers") not in GRID_COVERS:
        raise ArtifactError(f"{path}: attribute grid_covers is {group.attrs.get('grid_covers')!r}, "
                            f"expected one of {GRID_COVERS}")
    try:
        values = group[ATTENTION_ARRAY]
    except Exception as exc:  # the array's metadata is missing or not JSON
        raise unreadable(path, "attention", exc) from exc
    missing = _missing_shard_files(path, values)
    if missing:
        raise CorruptArtifactError(
            f"{path} is unreadable (truncated or corrupt: shard file(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} of {ATTENTION_ARRAY} missing or empty): delete it and "
            "rerun rule generate")
    return values


def _missing_shard_files(path: Path, values: zarr.Array) -> list[str]:
    """The Zarr shard files of ``values`` (relative to the store) that a complete store has but that are
    missing or empty here (zarr would read them as zeros)."""
    encoding = getattr(values.metadata, "chunk_key_encoding", None)
    if encoding is None:                              # not a Zarr v3 array: not what generate writes
        return []
    per_file = (values.shards or values.chunks)[0]
    count = -(-int(values.shape[0]) // int(per_file))
    encode = encoding.encode_chunk_key
    keys = (f"{values.path}/{encode((k,))}" for k in range(count))
    return [key for key in keys if not (path / key).is_file() or (path / key).stat().st_size == 0]


def attention_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The attention store's group attributes (model, grid_covers, reduction, schema_version and, when
    written with one, provenance)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)


def read_rows(values: zarr.Array, offset: int, num_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    """One image's maps as float32, shape (num_tokens, grid_h, grid_w): the contiguous slice
    ``values[offset : offset + num_tokens * grid_h * grid_w]``. ArtifactError when the slice is not
    inside the store, CorruptArtifactError when its chunks cannot be read (checksum, decompression)."""
    grid_h, grid_w = int(grid[0]), int(grid[1])
    count = int(num_tokens) * grid_h * grid_w
    offset = int(offset)
    if offset < 0 or offset + count > values.shape[0]:
        raise ArtifactError(f"attention values {offset}..{offset + count} ({num_tokens} maps of {grid_h} x "
                            f"{grid_w}) are outside the store ({values.shape[0]} values)")
    try:
        flat = np.asarray(values[offset:offset + count], dtype=np.float32)
    except Exception as exc:
        raise unreadable(getattr(values.store, "root", values.store), "attention", exc) from exc
    return flat.reshape(int(num_tokens), grid_h, grid_w)
