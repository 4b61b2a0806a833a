"""Segment stage: attention maps -> SAM prompts -> masks, with the toy SAM on the CPU.

Shards are fabricated directly (generations via write_table, rows via AttentionWriter), mostly on a
6 x 6 grid; a phrase's planted attention peak at cell (i, j) must give a point in that cell's pixels,
also on non-square per-image grids, for both geometries (padded square, whole image).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

import stages.segment as segment
from stages.config import ConfigError, from_mapping
from stages.io.attention import AttentionWriter
from stages.io.tables import read_arrow, write_table
from stages.models.sam import build_toy_sam, load_sam
from stages.segment import (
    ATTENTION_SCORE,
    EMPTY_ATTENTION_MASK_ERROR,
    EMPTY_MASK_ERROR,
    SamConfig,
    SegmentConfig,
    attention_mask,
    centre_rows,
    mask_prompt,
    pool_phrase,
    remove_corners,
    upsample_map,
)

GRID = 6


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    return build_toy_sam(tmp_path_factory.mktemp("sam") / "toy.safetensors", seed=0)


def rows_with_peaks(num_tokens, peaks=(), *, sink=None, grid=(GRID, GRID)):
    """Uniform rows (T, *grid) plus ``peaks``: (token, (i, j), value) added at cell (i, j);
    ``sink`` (value, (i, j)) is added to every token."""
    rows = np.full((num_tokens, *grid), 1.0 / (grid[0] * grid[1]), dtype=np.float32)
    for token, (i, j), value in peaks:
        rows[token, i, j] += value
    if sink is not None:
        value, (i, j) = sink
        rows[:, i, j] += value
    return rows


def write_shard(folder: Path, images, grid_covers="padded_square"):
    """Write manifest, generations, phrases and attention of a shard; return the run's paths.

    ``images``: dicts with ``image_id``, ``size`` ((H, W), or None for an unreadable file), ``rows``
    (T, h, w) on the image's own grid and ``phrases`` (token index lists, or a string: a phrase error
    row with that reason). ``generation_error`` makes a failed generation with no phrase row.
    ``grid_covers``: the store's attribute ("padded_square", "centre_square" or "image").
    """
    rng = np.random.default_rng(0)
    manifest, generations, phrase_rows = [], [], []
    with AttentionWriter(folder / "attention.zarr", model="test", grid_covers=grid_covers,
                         reduction={"layers": "all", "heads": "all", "statistic": "mean"}) as writer:
        for image in images:
            image_id = image["image_id"]
            file = folder / f"{image_id}.png"
            if image.get("size") is None:
                file.write_bytes(b"this is not a png")
            else:
                Image.fromarray(rng.integers(0, 256, (*image["size"], 3), dtype=np.uint8)).save(file)
            manifest.append({"image_id": image_id, "file": str(file), "shard": 0})
            if "generation_error" in image:
                generations.append({"image_id": image_id, "num_tokens": 0,
                                    "attention_offset": writer.num_values,
                                    "finish_reason": "error", "error": image["generation_error"]})
                continue
            rows = image["rows"]
            offset = writer.append(rows)
            generations.append({"image_id": image_id, "answer": "...", "num_tokens": len(rows),
                                "attention_offset": offset, "grid_h": rows.shape[1], "grid_w": rows.shape[2],
                                "finish_reason": "eos"})
            for k, tokens in enumerate(image["phrases"]):
                if isinstance(tokens, str):
                    phrase_rows.append({"image_id": image_id, "text": f"phrase {k}", "error": tokens})
                else:
                    phrase_rows.append({"image_id": image_id, "phrase_index": k, "text": f"phrase {k}",
                                        "token_indices": tokens, "category_id": 10 + k})
    paths = {name: folder / f"{name}.parquet" for name in ("manifest", "generations", "phrases", "masks")}
    write_table(manifest, paths["manifest"], "manifest")
    write_table(generations, paths["generations"], "generations")
    write_table(phrase_rows, paths["phrases"], "phrases")
    paths["attention"] = folder / "attention.zarr"
    return paths


def run_segment(paths, checkpoint, **cfg):
    segment.run(SegmentConfig(**cfg), SamConfig(type="tiny", checkpoint=str(checkpoint)), paths["manifest"],
                paths["generations"], paths["attention"], paths["phrases"], paths["masks"], device="cpu")
    return read_arrow(paths["masks"], "masks").to_pylist()


def cell_region(i, j, height, width, mode, grid=(GRID, GRID)):
    """Cell (i, j) of a ``grid`` (rows, columns) covers the original image's pixels with column index
    in [x0, x1) and row index in [y0, y1); returns (x0, x1, y0, y1)."""
    rows, columns = grid
    if mode == "original":
        return j * width / columns, (j + 1) * width / columns, i * height / rows, (i + 1) * height / rows
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    step_y, step_x = side / rows, side / columns
    return j * step_x - left, (j + 1) * step_x - left, i * step_y - top, (i + 1) * step_y - top


def assert_point_in_cell(row, cell, mode, grid=(GRID, GRID)):
    x0, x1, y0, y1 = cell_region(*cell, row["height"], row["width"], mode, grid)
    assert x0 <= row["point_x"] < x1 and y0 <= row["point_y"] < y1, (row["point_x"], row["point_y"], cell)
    # the chosen pixel's centre (index + 0.5) is within a pixel of the cell's centre
    assert abs(row["point_x"] + 0.5 - (x0 + x1) / 2) <= 1 and abs(row["point_y"] + 0.5 - (y0 + y1) / 2) <= 1


# --- points from planted peaks ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pad", "original"])
def test_planted_peaks_give_points_in_their_cells(tmp_path, sam_checkpoint, mode):
    cells = [(2, 3), (3, 1)]
    rows = rows_with_peaks(4, [(1, cells[0], 0.5), (2, cells[1], 0.5)])
    images = [{"image_id": name, "size": size, "rows": rows, "phrases": [[1], [2]]}
              for name, size in (("landscape", (60, 90)), ("portrait", (90, 60)))]
    out = run_segment(write_shard(tmp_path, images), sam_checkpoint, upsample=mode)
    assert [(r["image_id"], r["phrase_index"], r["mask_index"]) for r in out] == [
        ("landscape", 0, 2), ("landscape", 1, 2), ("portrait", 0, 2), ("portrait", 1, 2)]
    for row in out:
        assert (row["height"], row["width"]) == ((60, 90) if row["image_id"] == "landscape" else (90, 60))
        assert_point_in_cell(row, cells[row["phrase_index"]], mode)


@pytest.mark.parametrize(("grid_covers", "mode"), [("padded_square", "pad"), ("image", "original")])
def test_each_image_uses_its_own_grid_and_the_store_geometry(tmp_path, sam_checkpoint, grid_covers, mode):
    """Two images of one shard on different non-square grids (4 x 7 and 9 x 3, as LLaVA-NeXT gives
    per image); upsample auto follows the store's grid_covers: each planted peak lands in its cell's
    pixels of that geometry, for both the SAM point and the attention-only mask."""
    images = [
        {"image_id": "wide", "size": (48, 84), "phrases": [[1], [2]],
         "rows": rows_with_peaks(4, [(1, (1, 5), 0.5), (2, (2, 1), 0.5)], grid=(4, 7))},
        {"image_id": "tall", "size": (90, 30), "phrases": [[1]],
         "rows": rows_with_peaks(3, [(1, (6, 1), 0.5)], grid=(9, 3))},
    ]
    # (cells whose centre lies inside the image in both geometries)
    cells = {("wide", 0): ((1, 5), (4, 7)), ("wide", 1): ((2, 1), (4, 7)), ("tall", 0): ((6, 1), (9, 3))}
    paths = write_shard(tmp_path, images, grid_covers=grid_covers)
    for prompt in ("point", "attention"):
        out = run_segment(paths, sam_checkpoint, prompt=prompt)
        assert [(r["image_id"], r["phrase_index"]) for r in out] == list(cells)
        for row in out:
            cell, grid = cells[(row["image_id"], row["phrase_index"])]
            assert_point_in_cell(row, cell, mode, grid)
    # the explicit override wins over the store: here the other geometry, so the points move
    other = "original" if mode == "pad" else "pad"
    moved = run_segment(paths, sam_checkpoint, upsample=other)
    assert [(r["point_x"], r["point_y"]) for r in moved] != [(r["point_x"], r["point_y"]) for r in out]
    for row in moved:
        cell, grid = cells[(row["image_id"], row["phrase_index"])]
        assert_point_in_cell(row, cell, other, grid)


def test_a_planted_peak_on_a_non_square_grid_lands_at_the_expected_pixel(tmp_path):
    """Exact pixels: a 3 x 5 grid on a 30 x 50 image (10 px cells) covering the image, peak at cell
    (1, 3) -> argmax pixel (35 or 34, 15 or 14) (bicubic is symmetric about the cell centre 35, 15);
    a 5 x 3 grid covering the padded 50 x 50 square (cells 10 x 16.7 px; the image is rows 10..40 of
    it), peak at cell (3, 1): centre (25, 35) in the square -> (25, 25) in the image."""
    image = [{"image_id": "x", "size": (30, 50), "phrases": [[1]],
              "rows": rows_with_peaks(3, [(1, (1, 3), 0.5)], grid=(3, 5))}]
    unused_sam = tmp_path / "unused.safetensors"
    (tmp_path / "image").mkdir()
    [row] = run_segment(write_shard(tmp_path / "image", image, grid_covers="image"), unused_sam,
                        prompt="attention")
    assert row["point_x"] in (34, 35) and row["point_y"] in (14, 15)
    image[0]["rows"] = rows_with_peaks(3, [(1, (3, 1), 0.5)], grid=(5, 3))
    (tmp_path / "square").mkdir()
    [row] = run_segment(write_shard(tmp_path / "square", image), unused_sam, prompt="attention")
    assert row["point_x"] in (24, 25) and row["point_y"] in (24, 25)
    # centre_square: a 5 x 5 grid on the image's centred 30 x 30 square (columns 10..40, 6 px cells),
    # peak at the inner cell (2, 3): centre (21, 15) in the square -> (31, 15) in the image.
    image[0]["rows"] = rows_with_peaks(3, [(1, (2, 3), 0.5)], grid=(5, 5))
    (tmp_path / "crop").mkdir()
    [row] = run_segment(write_shard(tmp_path / "crop", image, grid_covers="centre_square"), unused_sam,
                        prompt="attention")
    assert row["point_x"] in (30, 31) and row["point_y"] in (14, 15)


def test_crop_lays_the_map_on_the_centre_square_and_fills_the_rest_with_its_minimum():
    import torch

    from stages.segment import upsample_map

    phrase_map = torch.tensor([[0.1, 0.2], [0.3, 0.9]])
    wide = upsample_map(phrase_map, 20, 40, "crop")
    assert wide.shape == (20, 40)
    square = torch.nn.functional.interpolate(phrase_map[None, None], size=(20, 20), mode="bicubic",
                                             align_corners=False)[0, 0]
    assert torch.equal(wide[:, 10:30], square)
    assert torch.all(wide[:, :10] == square.min()) and torch.all(wide[:, 30:] == square.min())
    tall = upsample_map(phrase_map, 41, 20, "crop")          # odd margin: top row (41 - 20) // 2 = 10
    assert torch.equal(tall[10:30], square) and torch.all(tall[:10] == square.min())


def test_pad_crops_the_centre_of_the_square(tmp_path, sam_checkpoint):
    """On a 60 x 90 image the padded square's first grid row lies above the image: a peak in grid
    row 1 (square rows 15..30) lands in image rows 0..15 with pad (centre row 7), rows 10..20 with
    original."""
    rows = rows_with_peaks(3, [(1, (1, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (60, 90), "rows": rows, "phrases": [[1]]}])
    [pad] = run_segment(paths, sam_checkpoint, upsample="pad")
    [original] = run_segment(paths, sam_checkpoint, upsample="original")
    assert pad["point_x"] == original["point_x"]
    assert pad["point_y"] == 7 and 10 <= original["point_y"] < 20


def test_remove_corner_ignores_a_corner_peak(tmp_path, sam_checkpoint):
    rows = rows_with_peaks(4, [(1, (0, 0), 0.9), (1, (3, 3), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "sq", "size": (48, 48), "rows": rows, "phrases": [[1]]}])
    [kept] = run_segment(paths, sam_checkpoint)
    [removed] = run_segment(paths, sam_checkpoint, remove_corner=True)
    assert_point_in_cell(removed, (3, 3), "pad")
    assert kept["point_x"] < 8 and kept["point_y"] < 8


def test_mean_and_max_pooling_pick_different_cells(tmp_path, sam_checkpoint):
    # token 1: 0.6 at P, 0.4 at Q; token 2: 0.5 at Q; 8 background tokens.
    # centred mean pooling: P 0.24 < Q 0.36; centred max pooling: P 0.54 > Q 0.41
    p_cell, q_cell = (1, 2), (4, 3)
    rows = rows_with_peaks(10, [(1, p_cell, 0.6), (1, q_cell, 0.4), (2, q_cell, 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (60, 60), "rows": rows, "phrases": [[1, 2]]}])
    [mean] = run_segment(paths, sam_checkpoint, pool="mean")
    [peak] = run_segment(paths, sam_checkpoint, pool="max")
    assert_point_in_cell(mean, q_cell, "pad")
    assert_point_in_cell(peak, p_cell, "pad")


def test_mean_centring_removes_a_sink_common_to_all_tokens(tmp_path, sam_checkpoint):
    sink_cell, object_cell = (4, 1), (1, 4)
    rows = rows_with_peaks(5, [(2, object_cell, 0.3)], sink=(0.5, sink_cell))
    assert np.unravel_index(rows[2].argmax(), rows[2].shape) == sink_cell  # the raw row points at the sink
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (60, 60), "rows": rows, "phrases": [[2]]}])
    [row] = run_segment(paths, sam_checkpoint)
    assert_point_in_cell(row, object_cell, "pad")


# --- masks ---------------------------------------------------------------------------------------------

def test_masks_decode_to_the_image_and_match_a_direct_sam_call(tmp_path, sam_checkpoint):
    from segment_anything import SamPredictor

    rows = rows_with_peaks(4, [(1, (2, 3), 0.5), (2, (4, 1), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (50, 80), "rows": rows, "phrases": [[1], [2]]}])
    out = [r for r in run_segment(paths, sam_checkpoint) if r["error"] is None]
    assert len(out) == 2
    predictor = SamPredictor(load_sam("tiny", sam_checkpoint))
    predictor.set_image(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")))
    for row in out:
        mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle_counts"]})
        assert mask.shape == (50, 80) and int(mask.sum()) == row["area"] > 0
        # the stored point is the pixel index SAM was given
        point = np.array([[row["point_x"], row["point_y"]]])
        masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]),
                                             multimask_output=True)
        overlap = np.logical_and(masks[2], mask).sum() / np.logical_or(masks[2], mask).sum()
        assert overlap > 0.99
        assert row["score"] == pytest.approx(float(scores[2]), abs=1e-4)


def test_more_masks_keeps_all_three(tmp_path, sam_checkpoint):
    rows = rows_with_peaks(3, [(1, (2, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (40, 40), "rows": rows, "phrases": [[1]]}])
    [last] = run_segment(paths, sam_checkpoint)
    three = run_segment(paths, sam_checkpoint, more_masks=True)
    assert [r["mask_index"] for r in three] == [0, 1, 2]
    assert len({(r["point_x"], r["point_y"]) for r in three}) == 1
    assert three[2] == last


def test_empty_sam_mask_is_kept_as_an_error_row(tmp_path, sam_checkpoint, monkeypatch):
    from segment_anything.modeling import Sam

    monkeypatch.setattr(Sam, "mask_threshold", 1e9)
    rows = rows_with_peaks(3, [(1, (2, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (40, 40), "rows": rows, "phrases": [[1]]}])
    [row] = run_segment(paths, sam_checkpoint)
    assert row["error"] == EMPTY_MASK_ERROR and row["area"] == 0 and row["phrase_index"] == 0
    assert row["point_x"] is not None and row["score"] is not None


def test_one_pixel_image(tmp_path, sam_checkpoint):
    rows = rows_with_peaks(2, [(1, (2, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "dot", "size": (1, 1), "rows": rows, "phrases": [[1]]}])
    for mode in ("pad", "original"):
        [row] = run_segment(paths, sam_checkpoint, upsample=mode)
        assert (row["height"], row["width"], row["point_x"], row["point_y"]) == (1, 1, 0, 0)
        mask = mask_utils.decode({"size": [1, 1], "counts": row["rle_counts"]})
        assert mask.shape == (1, 1) and int(mask.sum()) == row["area"]


def test_mask_prompt_mode(tmp_path, sam_checkpoint):
    rows = rows_with_peaks(3, [(1, (2, 2), 0.5), (2, (4, 4), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (40, 70), "rows": rows, "phrases": [[1], [2]]}])
    out = run_segment(paths, sam_checkpoint, prompt="mask", more_masks=True)
    assert [(r["phrase_index"], r["mask_index"]) for r in out] == [(p, k) for p in (0, 1) for k in (0, 1, 2)]
    for row in out:
        assert row["point_x"] is None and row["point_y"] is None
        assert mask_utils.decode({"size": [40, 70], "counts": row["rle_counts"]}).sum() == row["area"]


# --- attention-only control (no SAM) -----------------------------------------------------------------

def decode(row):
    rle = {"size": [row["height"], row["width"]], "counts": row["rle_counts"]}
    return mask_utils.decode(rle).astype(bool)


def test_attention_mode_masks_a_planted_blob_without_sam(tmp_path):
    """A 2 x 2-cell blob (rows 2-3, columns 3-4 of the 6 x 6 grid) on a 60 x 60 image: cells are
    10 px, so the blob covers pixels rows 20..40, columns 30..50. No SAM checkpoint exists: none is
    loaded."""
    blob = [(1, (i, j), 0.5) for i in (2, 3) for j in (3, 4)]
    rows = rows_with_peaks(4, blob)
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (60, 60), "rows": rows, "phrases": [[1]]}])
    [row] = run_segment(paths, tmp_path / "no-such-sam.safetensors", prompt="attention")
    assert row["error"] is None and row["mask_index"] == 0
    assert row["score"] == ATTENTION_SCORE == 1.0
    mask = decode(row)
    assert mask.shape == (60, 60) and int(mask.sum()) == row["area"]
    blob_pixels = np.zeros((60, 60), dtype=bool)
    blob_pixels[20:40, 30:50] = True
    near = np.zeros((60, 60), dtype=bool)
    near[18:42, 28:52] = True
    assert mask[25:35, 35:45].all()    # the blob's interior is covered (bicubic rounds its corners)
    assert not (mask & ~near).any()               # nothing beyond 2 px around it
    assert (mask & blob_pixels).sum() / (mask | blob_pixels).sum() > 0.6
    # the point is still the argmax, inside the blob
    assert 20 <= row["point_y"] < 40 and 30 <= row["point_x"] < 50


def test_attention_threshold_grows_the_mask():
    image_map = torch.linspace(0, 1, 100).reshape(10, 10)
    low, high = attention_mask(image_map, 0.2), attention_mask(image_map, 0.8)
    assert low.dtype == bool and low.shape == (10, 10)
    assert high.sum() < low.sum() and not (high & ~low).any()
    assert attention_mask(image_map, 1.0).sum() == 1   # only the maximum
    assert not attention_mask(image_map - 2.0, 0.5).any()  # no positive value: empty


@pytest.mark.parametrize("mode", ["pad", "original"])
def test_attention_mode_rle_has_the_image_size(tmp_path, mode):
    rows = rows_with_peaks(3, [(1, (2, 3), 0.5), (2, (4, 1), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (50, 80), "rows": rows, "phrases": [[1], [2]]}])
    out = run_segment(paths, tmp_path / "unused.safetensors", prompt="attention", upsample=mode,
                      more_masks=True)
    assert [(r["phrase_index"], r["mask_index"]) for r in out] == [(0, 0), (1, 0)]  # one mask per phrase
    for row, cell in zip(out, [(2, 3), (4, 1)]):
        assert (row["height"], row["width"]) == (50, 80) and row["error"] is None
        mask = decode(row)
        assert mask.shape == (50, 80) and int(mask.sum()) == row["area"] > 0
        assert_point_in_cell(row, cell, mode)
        assert mask[int(row["point_y"]), int(row["point_x"])]


def test_attention_mode_shard_completes_with_error_rows(tmp_path):
    nan_rows = rows_with_peaks(3, [(2, (2, 2), 0.5)])
    nan_rows[1, 0, 0] = np.nan
    flat = rows_with_peaks(2)  # every token the same: the centred map is 0 everywhere
    good = rows_with_peaks(3, [(1, (3, 3), 0.5)])
    images = [
        {"image_id": "nan", "size": (30, 30), "rows": nan_rows, "phrases": [[2], [1, 2]]},
        {"image_id": "flat", "size": (30, 30), "rows": flat, "phrases": [[0]]},
        {"image_id": "unreadable", "size": None, "rows": good, "phrases": [[1]]},
        {"image_id": "phrase_error", "size": (30, 30), "rows": good, "phrases": ["no noun phrase"]},
        {"image_id": "generation_error", "size": (30, 30), "generation_error": "out of memory"},
        {"image_id": "ok", "size": (30, 30), "rows": good, "phrases": [[1]]},
    ]
    out = run_segment(write_shard(tmp_path, images), tmp_path / "unused.safetensors", prompt="attention")
    summary = [(r["image_id"], r["phrase_index"], r["error"]) for r in out]
    assert summary[0] == ("nan", 0, None)
    assert summary[1][:2] == ("nan", None) and "tokens [1] hold NaN/inf" in summary[1][2]
    assert summary[2] == ("flat", 0, EMPTY_ATTENTION_MASK_ERROR)
    assert out[2]["area"] == 0 and out[2]["rle_counts"] and out[2]["point_x"] is not None
    assert summary[3][:2] == ("unreadable", None) and "unreadable image" in summary[3][2]
    assert summary[4] == ("phrase_error", None, "no noun phrase")
    assert summary[5] == ("generation_error", None, "generation failed: out of memory")
    assert summary[6] == ("ok", 0, None)
    assert len(summary) == 7


# --- error rows ---------------------------------------------------------------------------------------

def test_failures_become_error_rows_and_the_shard_completes(tmp_path, sam_checkpoint):
    nan_rows = rows_with_peaks(3, [(2, (2, 2), 0.5)])
    nan_rows[1, 0, 0] = np.nan
    inf_rows = np.full((2, GRID, GRID), np.inf, dtype=np.float32)
    good = rows_with_peaks(3, [(1, (3, 3), 0.5)])
    images = [
        {"image_id": "nan", "size": (30, 30), "rows": nan_rows, "phrases": [[0, 2], [1, 2]]},
        {"image_id": "inf", "size": (30, 30), "rows": inf_rows, "phrases": [[0], [1]]},
        {"image_id": "unreadable", "size": None, "rows": good, "phrases": [[1]]},
        {"image_id": "no_tokens", "size": (30, 30), "rows": good, "phrases": [[], [1]]},
        {"image_id": "out_of_range", "size": (30, 30), "rows": good, "phrases": [[1, 7]]},
        {"image_id": "phrase_error", "size": (30, 30), "rows": good, 
         "phrases": ["answer has no noun phrase"]},
        {"image_id": "no_phrase_rows", "size": (30, 30), "rows": good, "phrases": []},
        {"image_id": "generation_error", "size": (30, 30), "generation_error": "out of memory"},
        {"image_id": "ok", "size": (30, 30), "rows": good, "phrases": [[1]]},
    ]
    paths = write_shard(tmp_path, images)
    write_table([*read_arrow(paths["phrases"], "phrases").to_pylist(),
                 {"image_id": "stray", "phrase_index": 0, "text": "x", "token_indices": [0]}],
                paths["phrases"], "phrases")
    out = run_segment(paths, sam_checkpoint)
    summary = [(r["image_id"], r["phrase_index"], r["error"]) for r in out]
    assert summary[0] == ("nan", 0, None)
    assert summary[1][:2] == ("nan", None) and "tokens [1] hold NaN/inf" in summary[1][2]
    assert summary[2] == ("inf", None, "every attention row of the image holds NaN/inf")
    assert summary[3][:2] == ("unreadable", None) and "unreadable image" in summary[3][2]
    assert summary[4] == ("no_tokens", None, "phrase has no tokens")
    assert summary[5] == ("no_tokens", 1, None)
    assert summary[6] == ("out_of_range", None, "token indices [7] outside the generation's 3 tokens")
    assert summary[7] == ("phrase_error", None, "answer has no noun phrase")
    assert summary[8] == ("no_phrase_rows", None, "sample has no row in the phrases table")
    assert summary[9] == ("generation_error", None, "generation failed: out of memory")
    assert summary[10] == ("ok", 0, None)
    assert summary[11] == ("stray", None, "sample not in the generations table")
    assert len(summary) == 12
    assert out[1]["text"] == "phrase 1" and out[1]["category_id"] == 11  # phrase errors keep the phrase


def test_an_unexpected_failure_of_one_image_does_not_stop_the_shard(tmp_path, sam_checkpoint, monkeypatch):
    real_load = segment.load_rgb_array

    def flaky_load(path):
        if Path(path).stem == "boom":
            raise RuntimeError("device lost")
        return real_load(path)

    monkeypatch.setattr(segment, "load_rgb_array", flaky_load)
    rows = rows_with_peaks(3, [(1, (2, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": name, "size": (20, 20), "rows": rows, "phrases": [[1]]}
                                   for name in ("boom", "fine")])
    out = run_segment(paths, sam_checkpoint)
    assert [(r["image_id"], r["error"]) for r in out] == [
        ("boom", "segmentation failed: RuntimeError: device lost"), ("fine", None)]


# --- building blocks ------------------------------------------------------------------------------------

def test_centre_rows_leaves_non_finite_rows_out_of_the_mean():
    rows = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]], [[float("nan"), 0.0]]])
    centred, finite = centre_rows(rows)
    assert finite.tolist() == [True, True, False]
    assert torch.equal(centred[:2], torch.tensor([[[-1.0, -1.0]], [[1.0, 1.0]]]))


def test_pool_phrase_mean_and_max():
    rows = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]], [[9.0, 9.0]]])
    assert torch.equal(pool_phrase(rows, [0, 1], "mean"), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(pool_phrase(rows, [0, 1], "max"), torch.tensor([[3.0, 4.0]]))


def test_remove_corners_uses_the_minimum_over_all_phrase_maps_of_the_image():
    phrase_maps = torch.arange(32.0).reshape(2, 4, 4) + 1
    phrase_maps[1, 1, 2] = -5.0  # the second phrase's map holds the image's minimum
    out = remove_corners(phrase_maps)
    for k in range(2):
        assert out[k, 0, 0] == out[k, 0, 3] == out[k, 3, 0] == out[k, 3, 3] == -5.0
        assert torch.equal(out[k, 1:3], phrase_maps[k, 1:3])
    assert phrase_maps[0, 0, 0] == 1.0  # the input is left as it was


def test_pad_and_original_agree_on_a_square_image():
    phrase_map = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    pad, original = upsample_map(phrase_map, 33, 33, "pad"), upsample_map(phrase_map, 33, 33, "original")
    assert pad.shape == (33, 33) and torch.equal(pad, original)
    assert upsample_map(phrase_map, 20, 50, "pad").shape == (20, 50)


def test_mask_prompt_logits_and_box():
    image_map = torch.zeros(60, 90)
    image_map[10:20, 30:50] = 1.0
    image_map[40:45, 70:80] = 0.8   # map / temperature > 0.75: inside the box
    image_map[55:58, 0:5] = 0.5     # below: outside the box
    logits, box = mask_prompt(image_map, temperature=1.0, box_thresh=0.75, mask_size=64)
    assert logits.shape == (64, 64)
    # 60 x 90 -> 43 x 64 in SAM's low-res frame (rounded like ResizeLongestSide), padded with 0 below
    assert torch.all(logits[43:] == 0) and logits[:43].abs().sum() > 0
    assert logits[10, 25] == pytest.approx(np.log(0.999 / 0.001), rel=1e-3)
    assert logits[35, 5] == pytest.approx(np.log(0.001 / 0.999), rel=1e-3)
    assert box.tolist() == [30.0, 10.0, 80.0, 45.0]
    _, whole = mask_prompt(torch.full((60, 90), -1.0), temperature=1.0, box_thresh=0.75, mask_size=64)
    assert whole.tolist() == [0.0, 0.0, 90.0, 60.0]


# --- config and CLI ----------------------------------------------------------------------------------

def test_config_yaml_sections_build_the_configs():
    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    assert from_mapping(SegmentConfig, config["segment"], where="segment") == SegmentConfig(
        pool="mean", upsample="auto", remove_corner=False, prompt="point", more_masks=False,
        mask_temperature=0.0002, box_thresh=0.75)
    assert from_mapping(SamConfig, config["sam"], where="sam") == SamConfig(
        type="tiny", checkpoint="results/models/toy-sam.safetensors")


@pytest.mark.parametrize("mapping, match", [
    ({"pool": "median"}, "segment.pool"), ({"upsample": "stretch"}, "segment.upsample"),
    ({"prompt": "box"}, "segment.prompt"), ({"mask_temperature": 0}, "mask_temperature"),
    ({"temperature": 1}, "unknown key"), ({"attention_thresh": 1.5}, "attention_thresh"),
    ({"attention_thresh": -0.1}, "attention_thresh"),
])
def test_bad_segment_config_is_a_config_error(mapping, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(SegmentConfig, mapping, where="segment")


def test_cli_writes_the_table(tmp_path, sam_checkpoint):
    rows = rows_with_peaks(3, [(1, (2, 2), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (30, 40), "rows": rows, "phrases": [[1]]}])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sam": {"type": "tiny", "checkpoint": str(sam_checkpoint)},
                                      "segment": {"more_masks": True}}))
    segment.main(["--config", str(config), "--manifest", str(paths["manifest"]),
                  "--generations", str(paths["generations"]), "--attention", str(paths["attention"]),
                  "--phrases", str(paths["phrases"]), "--out", str(paths["masks"]), "--device", "cpu"])
    assert [r["mask_index"] for r in read_arrow(paths["masks"], "masks").to_pylist()] == [0, 1, 2]


# --- extreme aspect ratios ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["point", "mask"])
@pytest.mark.parametrize("size", [(4000, 5), (5, 4000), (4000, 20), (1, 1)])
def test_images_of_any_aspect_ratio_are_segmented(tmp_path, sam_checkpoint, size, prompt):
    """A 4000 x 5 image: SAM's ResizeLongestSide would round its short side to 0 px at the tiny SAM's
    256 (at SAM's 1,024 from 2,048:1 on) and fail; the predictor keeps at least 1 px, and the masks
    have the image's size."""
    height, width = size
    rows = rows_with_peaks(2, [(0, (3, 4), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "thin", "size": (height, width), "rows": rows, "phrases": [[0]]}])
    out = run_segment(paths, sam_checkpoint, prompt=prompt)
    assert len(out) == 1 and out[0]["error"] in (None, segment.EMPTY_MASK_ERROR), out[0]["error"]
    assert (out[0]["height"], out[0]["width"]) == (height, width)
    decoded = mask_utils.decode({"size": [height, width], "counts": out[0]["rle_counts"]})
    assert decoded.shape == (height, width)


def test_preprocess_shape_is_sams_except_that_no_side_is_zero():
    from segment_anything.utils.transforms import ResizeLongestSide

    for height, width in [(480, 640), (1, 1), (20, 4000), (333, 1000)]:
        assert segment.preprocess_shape(height, width, 1024) == ResizeLongestSide.get_preprocess_shape(
            height, width, 1024)
    assert ResizeLongestSide.get_preprocess_shape(5, 4000, 256) == (0, 256)
    assert segment.preprocess_shape(5, 4000, 256) == (1, 256)
    assert segment.preprocess_shape(4000, 1, 1024) == (1024, 1)
