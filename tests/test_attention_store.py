"""The attention store (schema version 2): per-image grids in one flat float16 array, read back one
contiguous slice per image; stores of another version are refused with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from schemas.artifacts import SCHEMA_VERSION
from stages.io.attention import AttentionWriter, attention_attrs, open_attention, read_rows
from stages.io.tables import ArtifactError

REDUCTION = {"layers": "all", "heads": "all", "statistic": "mean"}


def maps(num_tokens: int, grid: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((num_tokens, *grid), dtype=np.float32) / (grid[0] * grid[1])


def test_images_with_different_grids_round_trip(tmp_path):
    """Two images of one shard on different grids (as LLaVA-NeXT gives them), an error image between
    them: each reads back from its own offset on its own grid, as float16."""
    first, second = maps(5, (3, 7), seed=0), maps(4, (6, 2), seed=1)
    path = tmp_path / "attention.zarr"
    with AttentionWriter(path, model="m", reduction=REDUCTION, grid_covers="image") as writer:
        offsets = [writer.append(first), writer.num_values, writer.append(second)]
        assert writer.num_values == first.size + second.size
    assert offsets == [0, first.size, first.size]       # the error image stored nothing
    assert not list(tmp_path.glob("*.tmp*")) and path.is_dir()

    values = open_attention(path)
    assert values.shape == (first.size + second.size,) and values.dtype == np.float16
    assert values.metadata.dimension_names == ("element",)
    for rows, offset in ((first, offsets[0]), (second, offsets[2])):
        back = read_rows(values, offset, len(rows), rows.shape[1:])
        assert back.dtype == np.float32 and back.shape == rows.shape
        np.testing.assert_array_equal(back, rows.astype(np.float16).astype(np.float32))
    assert read_rows(values, offsets[1], 0, (1, 1)).shape == (0, 1, 1)
    attrs = attention_attrs(path)
    assert attrs == {"schema_version": SCHEMA_VERSION, "artifact": "attention", "model": "m",
                     "grid_covers": "image", "reduction": REDUCTION, "forced_rows": "emitting"}


def test_appends_are_written_a_whole_shard_file_at_a_time(tmp_path):
    """With 8-value chunks and 2 chunks per shard file, 13 images of 3 x 1 maps (values 0, 1, 2, ...)
    cross shard boundaries mid-image; the store holds exactly the appended values, in order."""
    path = tmp_path / "attention.zarr"
    written = []
    with AttentionWriter(path, model="m", reduction=REDUCTION, grid_covers="padded_square",
                         chunk_values=8, chunks_per_shard=2) as writer:
        start = 0
        for k in range(13):
            rows = np.arange(start, start + 3 * (k % 4 + 1), dtype=np.float32).reshape(-1, 3, 1)
            assert writer.append(rows) == start
            written.append(rows)
            start += rows.size
            # only whole 16-value shard files have been written so far; the rest waits
            assert writer._written % 16 == 0 and writer._written <= start
    values = open_attention(path)
    assert values.chunks == (8,) and values.shards == (16,)
    np.testing.assert_array_equal(np.asarray(values[:]), np.concatenate([w.ravel() for w in written]))


def test_rows_outside_the_store_are_an_artifact_error(tmp_path):
    path = tmp_path / "attention.zarr"
    with AttentionWriter(path, model="m", reduction=REDUCTION, grid_covers="image") as writer:
        writer.append(maps(2, (2, 2), seed=0))
    values = open_attention(path)
    with pytest.raises(ArtifactError, match=r"values 4\.\.12 \(2 maps of 2 x 2\) are outside the store \(8"):
        read_rows(values, 4, 2, (2, 2))
    with pytest.raises(ValueError, match="grid_covers"):
        AttentionWriter(tmp_path / "other.zarr", model="m", reduction=REDUCTION, grid_covers="square")
    with pytest.raises(ValueError, match=r"\(n, grid_h, grid_w\)"):
        with AttentionWriter(tmp_path / "bad.zarr", model="m", reduction=REDUCTION,
                             grid_covers="image") as writer:
            writer.append(np.zeros((4, 4)))
    assert not (tmp_path / "bad.zarr").exists()            # an aborted store never appears


def test_a_version_1_store_is_refused_naming_the_versions(tmp_path):
    """The previous layout: one (tokens, h, w) array `rows`, attribute grid, schema version "1"."""
    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update({"schema_version": "1", "artifact": "attention", "model": "m", "grid": [24, 24],
                        "reduction": REDUCTION})
    group.create_array("rows", shape=(3, 24, 24), dtype="float16")
    with pytest.raises(ArtifactError, match=rf"schema version {SCHEMA_VERSION} .*version='1'.*rerun"):
        open_attention(path)
    with pytest.raises(ArtifactError, match="not found"):
        open_attention(tmp_path / "missing.zarr")
