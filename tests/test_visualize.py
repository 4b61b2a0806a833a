"""Visualize stage: overlays and attention grids from fabricated artifacts, error images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from pycocotools import mask as mask_utils

from stages import visualize
from stages.io.attention import AttentionWriter
from stages.io.tables import write_table
from stages.segment import argmax_pixel, upsample_map
from stages.visualize import (
    ERROR_WIDTH,
    HEAT_WEIGHT,
    PALETTE,
    UNSEEN_HATCH,
    VisualizeConfig,
    attention_tiles,
    heatmap,
    render_overlay,
    token_label,
)

GRID = (3, 4)
ANSWER = "A red star here."
# Tokens "A", " red", " star", " here", "." and an end-of-sequence special token.
TOKENS = {"token_ids": [10, 11, 12, 13, 14, 2], "token_starts": [0, 1, 5, 10, 15, 16],
          "token_ends": [1, 5, 10, 15, 16, 16], "token_special": [False] * 5 + [True]}


def rle_row(mask: np.ndarray, **fields) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"rle_counts": rle["counts"].decode(), "height": mask.shape[0], "width": mask.shape[1],
            "area": int(mask.sum()), **fields}


def save_rgb(path: Path, width: int, height: int, colour=(90, 140, 200)) -> Path:
    Image.new("RGB", (width, height), colour).save(path)
    return path


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def artifacts(tmp_path):
    """Two shards: image a (shard 0) went through every stage; image b (shard 1) failed in generate;
    image c's file is missing (manifest error); image d (shard 1) has a mask of the wrong size."""
    a = save_rgb(tmp_path / "a.png", 40, 30)
    b = save_rgb(tmp_path / "b.png", 20, 50)
    d = save_rgb(tmp_path / "d.png", 16, 16)
    manifest = tmp_path / "manifest.parquet"
    write_table([
        {"image_id": "a", "file": str(a), "width": 40, "height": 30, "shard": 0},
        {"image_id": "b", "file": str(b), "width": 20, "height": 50, "shard": 1},
        {"image_id": "c", "file": str(tmp_path / "c.png"), "shard": 0,
         "error": "image file not found: c.png"},
        {"image_id": "d", "file": str(d), "width": 16, "height": 16, "shard": 1},
    ], manifest, "manifest")

    rows_a = np.random.default_rng(0).random((6, *GRID)) / 12
    generations, attention = [], []
    for shard, images in enumerate([["a"], ["b", "d"]]):
        store = tmp_path / f"attention-{shard}.zarr"
        gens = []
        reduction = {"layers": "all", "heads": "all", "statistic": "mean"}
        with AttentionWriter(store, model="fake", reduction=reduction, grid_covers="padded_square") as writer:
            for image_id in images:
                if image_id == "b":
                    gens.append({"image_id": "b", "num_tokens": 0, "attention_offset": writer.num_values,
                                 "finish_reason": "error", "error": "out of memory"})
                    continue
                offset = writer.append(rows_a)
                gens.append({"image_id": image_id, "prompt": "p", "answer": ANSWER, **TOKENS,
                             "num_tokens": 6, "attention_offset": offset, "grid_h": GRID[0], "grid_w": GRID[1],
                             "finish_reason": "eos"})
        write_table(gens, tmp_path / f"generations-{shard}.parquet", "generations")
        generations.append(tmp_path / f"generations-{shard}.parquet")
        attention.append(store)

    phrases = tmp_path / "phrases-0.parquet"
    write_table([
        {"image_id": "a", "phrase_index": 0, "text": "A red star", "root": "star", "token_indices": [2]},
        {"image_id": "b", "error": "no answer"},
        {"image_id": "d", "phrase_index": 0, "text": "A red star", "root": "star", "token_indices": [2]},
    ], phrases, "phrases")
    masks = tmp_path / "masks-0.parquet"
    write_table([
        rle_row(box_mask(30, 40, 5, 5, 15, 20), image_id="a", phrase_index=0, mask_index=2, text="A red star",
                score=0.9, point_x=10, point_y=12),
        {"image_id": "b", "error": "no phrase"},
        rle_row(box_mask(30, 40, 5, 5, 15, 20), image_id="d", phrase_index=0, mask_index=2, text="A red star",
                score=0.9, point_x=10, point_y=12),
    ], masks, "masks")
    return {"manifest": manifest, "generations": generations, "attention": attention,
            "phrases": [phrases], "masks": [masks], "rows_a": rows_a}


def run_visualize(artifacts, out_dir, num_images=4, upsample="auto"):
    return visualize.run(VisualizeConfig(num_images=num_images), artifacts["manifest"],
                         artifacts["generations"], artifacts["attention"], artifacts["phrases"],
                         artifacts["masks"], out_dir, upsample=upsample)


def grey_of(rgb) -> float:
    """PIL's greyscale (mode "L") value of one RGB colour."""
    return float(np.asarray(Image.new("RGB", (1, 1), tuple(int(c) for c in rgb)).convert("L"))[0, 0])


def tile_band(picture: np.ndarray) -> np.ndarray:
    """The rows of an attention picture with a single row of cells that hold the tiles (no header,
    no captions, whose anti-aliased text has every grey)."""
    top = picture.shape[0] - (visualize.TILE + 16 + 2 * visualize.PADDING) + visualize.PADDING
    return picture[top:top + visualize.TILE]


def blend(anchor, grey) -> np.ndarray:
    """A heat-map anchor colour blended over greyscale value(s) ``grey`` as the attention tiles do."""
    return np.rint(HEAT_WEIGHT * np.asarray(anchor) + (1 - HEAT_WEIGHT) * np.asarray(grey)[..., None])


def test_pngs_for_every_selected_image(artifacts, tmp_path):
    out = tmp_path / "viz"
    written = run_visualize(artifacts, out)
    expected = [out / f"{i}_{kind}.png" for i in "abcd" for kind in ("overlay", "attention")]
    assert written == expected
    assert sorted(out.iterdir()) == sorted(expected)


def test_first_n_images_only(artifacts, tmp_path):
    written = run_visualize(artifacts, tmp_path / "viz", num_images=1)
    assert [p.name for p in written] == ["a_overlay.png", "a_attention.png"]


def test_overlay_tints_mask_and_keeps_background(artifacts, tmp_path):
    run_visualize(artifacts, tmp_path / "viz")
    overlay = np.asarray(Image.open(tmp_path / "viz" / "a_overlay.png").convert("RGB")).astype(int)
    scale = 13  # the smallest whole factor that makes the long side (40) at least 512
    assert overlay.shape == (30 * scale, 40 * scale, 3)
    background = np.array([90, 140, 200])
    colour = np.array(PALETTE[0])
    inside = overlay[round(17 * scale), round(7 * scale)]
    assert np.abs(inside - (0.55 * background + 0.45 * colour)).max() <= 1
    assert (overlay[round(27 * scale), round(35 * scale)] == background).all()
    # The point marker is drawn on the prompt pixel (column 10, row 12) in the mask's colour.
    marker = overlay[12 * scale + scale // 2, 10 * scale + scale // 2]
    assert (marker == colour).all()


def test_attention_grid_shows_token_maps(artifacts, tmp_path):
    run_visualize(artifacts, tmp_path / "viz")
    grid = np.asarray(Image.open(tmp_path / "viz" / "a_attention.png").convert("RGB")).astype(int)
    # Seven tiles (thumbnail + six tokens) on one row of 108-pixel cells.
    assert grid.shape[1] == 7 * (visualize.TILE + 2 * visualize.PADDING)
    # Each 96 x 72 tile shows the 40 x 30 image (2.4 tile pixels per image pixel) in the padded 40 x 40
    # square's 3 x 4 grid (pad: the store covers the padded square): the least visible part of a cell is
    # 8.3 image rows (20 tile rows) of grid row 0 or 2 by 10 image columns (24 tile columns). Every map has
    # one hottest and one coldest cell, drawn over the uniform image's grey.
    grey = grey_of((90, 140, 200))
    for anchor in (visualize.HEATMAP_ANCHORS[-1], visualize.HEATMAP_ANCHORS[0]):
        assert (np.abs(grid - blend(anchor, grey)).max(axis=2) <= 1).sum() >= 6 * 20 * 24
    assert not (tile_band(grid) == UNSEEN_HATCH).all(axis=2).any()  # pad: every image pixel was seen
    # Token 2 grounds phrase 0: its tile is framed in phrase 0's colour.
    assert (np.abs(grid - PALETTE[0]).max(axis=2) == 0).sum() >= 4 * 96


@pytest.mark.parametrize(("height", "width", "mode", "cell", "hot", "unseen"), [
    # pad: the 48 x 48 square starts 8 rows above the image; its 12 x 12 cell (1, 2) covers square
    # rows 12..24 (image rows 4..16), columns 24..36.
    (32, 48, "pad", (1, 2), (4, 16, 24, 36), []),
    # Cell (0, 0) covers square rows 0..12: its top 8 rows are padding, above the image.
    (32, 48, "pad", (0, 0), (0, 4, 0, 12), []),
    # crop: the centre 32 x 32 square starts at column 8; its 8 x 8 cell (1, 2) covers rows 8..16,
    # columns 8 + 16..8 + 24; columns 0..8 and 40..48 were cut off.
    (32, 48, "crop", (1, 2), (8, 16, 24, 32), [(0, 32, 0, 8), (0, 32, 40, 48)]),
    # crop of a tall image: the square starts at row 8; rows 0..8 and 40..48 were cut off.
    (48, 32, "crop", (1, 2), (16, 24, 16, 24), [(0, 8, 0, 32), (40, 48, 0, 32)]),
    # original: 8 x 12 cells over the whole image.
    (32, 48, "original", (1, 2), (8, 16, 24, 36), []),
])
def test_attention_tile_lays_the_grid_on_the_image_as_segment_does(height, width, mode, cell, hot, unseen):
    """A one-hot 4 x 4 map on a 2:3 image: its tile (two tile pixels per image pixel) is the hot
    colour exactly on the cell's rectangle of image pixels, the cold colour on the other pixels the
    model saw, and hatched washed-out grey on those it never saw; each blended with the image's grey.
    The segment stage's point prompt (argmax of upsample_map) lies in the hot rectangle."""
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    values = np.zeros((4, 4), dtype=np.float32)
    values[cell] = 1.0
    [tile] = attention_tiles(image, values[None], mode)
    assert tile.shape == (2 * height, 2 * width, 3) and tile.dtype == np.uint8

    grey = np.asarray(Image.fromarray(image).convert("L"), dtype=float).repeat(2, axis=0).repeat(2, axis=1)
    hot_mask = np.zeros((2 * height, 2 * width), dtype=bool)
    r0, r1, c0, c1 = hot
    hot_mask[2 * r0:2 * r1, 2 * c0:2 * c1] = True
    unseen_mask = np.zeros_like(hot_mask)
    for r0, r1, c0, c1 in unseen:
        unseen_mask[2 * r0:2 * r1, 2 * c0:2 * c1] = True
    expected = np.where(hot_mask[..., None], blend(visualize.HEATMAP_ANCHORS[-1], grey),
                        blend(visualize.HEATMAP_ANCHORS[0], grey))
    ys, xs = np.indices(hot_mask.shape)
    hatch = (xs + ys) % visualize.HATCH_PERIOD == 0
    washed = np.rint((1 - visualize.UNSEEN_WASH) * grey + visualize.UNSEEN_WASH * 255)[..., None]
    expected[unseen_mask] = np.where(hatch[..., None], UNSEEN_HATCH, washed)[unseen_mask]
    assert np.abs(tile.astype(int) - expected).max() <= 1

    column, row = argmax_pixel(upsample_map(torch.from_numpy(values), height, width, mode))
    assert hot_mask[2 * row, 2 * column]


def test_upsample_auto_follows_the_store_and_can_be_overridden(artifacts, tmp_path):
    """A store whose grids cover the centre square (crop): the 40 x 30 image's columns 0..5 and
    35..40 (tile columns 0..12 and 84..96) were cut off and are hatched, unless upsample says pad."""
    zarr.open_group(str(artifacts["attention"][0]), mode="r+").attrs["grid_covers"] = "centre_square"

    def hatch_columns(folder):
        picture = tile_band(np.asarray(Image.open(folder / "a_attention.png").convert("RGB")))
        return np.flatnonzero((picture == UNSEEN_HATCH).all(axis=2).any(axis=0))

    run_visualize(artifacts, tmp_path / "auto", num_images=1)
    cell = visualize.TILE + 2 * visualize.PADDING
    tile_columns = {column % cell - visualize.PADDING for column in hatch_columns(tmp_path / "auto")}
    assert tile_columns == set(range(0, 12)) | set(range(84, 96))
    run_visualize(artifacts, tmp_path / "pad", num_images=1, upsample="pad")
    assert len(hatch_columns(tmp_path / "pad")) == 0
    with pytest.raises(ValueError, match="upsample must be one of"):
        run_visualize(artifacts, tmp_path / "bad", upsample="stretch")


def test_error_images_instead_of_crashes(artifacts, tmp_path):
    run_visualize(artifacts, tmp_path / "viz")
    for name in ["c_overlay.png", "c_attention.png", "b_attention.png", "d_overlay.png"]:
        image = np.asarray(Image.open(tmp_path / "viz" / name).convert("RGB"))
        assert image.shape[1] == ERROR_WIDTH, name
        assert (image == visualize.ERROR_COLOUR).all(axis=2).any(), name
    # Image b failed in generate: its overlay still shows the picture, with the reasons below it.
    overlay_b = np.asarray(Image.open(tmp_path / "viz" / "b_overlay.png").convert("RGB"))
    assert overlay_b.shape[0] > 50 * 11 and overlay_b.shape[1] == 20 * 11
    assert (overlay_b[:50 * 11] == [90, 140, 200]).all()
    assert (overlay_b[50 * 11:] == visualize.ERROR_COLOUR).all(axis=2).any()
    # Image d's mask does not fit the image, but its attention grid is still drawn.
    cell = visualize.TILE + 2 * visualize.PADDING
    assert Image.open(tmp_path / "viz" / "d_attention.png").width == 7 * cell


def test_attention_rows_outside_store_are_an_error_image(artifacts, tmp_path):
    write_table([{"image_id": "a", "answer": ANSWER, **TOKENS, "num_tokens": 6, "attention_offset": 4,
                  "grid_h": GRID[0], "grid_w": GRID[1], "finish_reason": "eos"}],
                artifacts["generations"][0], "generations")
    run_visualize(artifacts, tmp_path / "viz", num_images=1)
    image = Image.open(tmp_path / "viz" / "a_attention.png")
    assert image.width == ERROR_WIDTH


def test_mismatched_shard_lists_are_refused(artifacts, tmp_path):
    with pytest.raises(ValueError, match="one store per generations shard"):
        visualize.run(VisualizeConfig(2), artifacts["manifest"], artifacts["generations"],
                      artifacts["attention"][:1], artifacts["phrases"], artifacts["masks"], tmp_path)


def test_render_overlay_skips_error_rows_and_checks_size():
    image = np.full((10, 8, 3), 200, dtype=np.uint8)
    good = rle_row(box_mask(10, 8, 0, 0, 4, 10), text="left", point_x=2.0, point_y=5.0)
    canvas = render_overlay(image, [good, {"error": "no phrase", "rle_counts": None}], alpha=1.0)
    pixels = np.asarray(canvas)
    assert canvas.size == (8 * 52, 10 * 52)
    assert (pixels[400, 20] == PALETTE[0]).all()
    assert (pixels[400, 380] == 200).all()
    with pytest.raises(ValueError, match="mask of 'big' is 9 x 10 pixels, the image is 8 x 10"):
        render_overlay(image, [rle_row(np.ones((10, 9), dtype=bool), text="big")])


def test_render_overlay_downscales_huge_images():
    canvas = render_overlay(np.zeros((300, 2048, 3), dtype=np.uint8), [])
    assert canvas.size == (1024, 150)


def test_heatmap_spans_the_colour_map():
    values = np.array([[0.0, 0.5], [0.25, 1.0]])
    colours = heatmap(values)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert (colours[0, 0] == visualize.HEATMAP_ANCHORS[0]).all()
    assert (colours[1, 1] == visualize.HEATMAP_ANCHORS[-1]).all()
    assert (colours[0, 1] == visualize.HEATMAP_ANCHORS[2]).all()
    assert (heatmap(np.full((2, 3), 0.3)) == visualize.HEATMAP_ANCHORS[0]).all()


def test_token_labels():
    generation = {"answer": "Hi\n there", "token_ids": [5, 6, 7, 2], "token_starts": [0, 2, 3, 9],
                  "token_ends": [2, 3, 9, 9], "token_special": [False, False, False, True]}
    assert [token_label(generation, j) for j in range(4)] == ["Hi", repr("\n"), "there", "<2>"]


def test_bad_config():
    with pytest.raises(ValueError, match="num_images must be a non-negative integer"):
        VisualizeConfig(num_images=-1)
