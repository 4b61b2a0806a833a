"""Visualize stage: overlays and attention grids from fabricated artifacts, error images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from stages import visualize
from stages.io.attention import AttentionWriter
from stages.io.tables import write_table
from stages.visualize import (
    ERROR_WIDTH,
    PALETTE,
    VisualizeConfig,
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


def run_visualize(artifacts, out_dir, num_images=4):
    return visualize.run(VisualizeConfig(num_images=num_images), artifacts["manifest"],
                         artifacts["generations"], artifacts["attention"], artifacts["phrases"],
                         artifacts["masks"], out_dir)


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
    brightest, darkest = visualize.HEATMAP_ANCHORS[-1], visualize.HEATMAP_ANCHORS[0]
    assert (np.abs(grid - brightest).max(axis=2) == 0).sum() >= 6 * (96 // 4) * (72 // 3)
    assert (np.abs(grid - darkest).max(axis=2) == 0).sum() >= 6 * (96 // 4) * (72 // 3)
    # Token 2 grounds phrase 0: its tile is framed in phrase 0's colour.
    assert (np.abs(grid - PALETTE[0]).max(axis=2) == 0).sum() >= 4 * 96


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
