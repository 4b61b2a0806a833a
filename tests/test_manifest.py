"""Manifest stage: sharding, sizes from headers of any image mode, error rows, warnings, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from schemas.artifacts import MANIFEST
from stages import manifest
from stages.config import ConfigError
from stages.datasets import DatasetConfig
from stages.io.tables import read_arrow, read_table


def save_image(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    """A (width, height) image of ``mode`` with varied pixels, saved in the format of the suffix."""
    width, height = size
    pixels = np.arange(width * height * 4, dtype=np.uint32).reshape(height, width, 4) % 251
    image = Image.fromarray(pixels.astype(np.uint8), "RGBA").convert(mode)
    image.save(path)
    return path


def folder_dataset(folder: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(name="folder", task="images", images=str(folder), **overrides)


def instances_dataset(tmp_path: Path, images: list[dict], **overrides) -> DatasetConfig:
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return DatasetConfig(name="coco", task="instance_seg", images=str(tmp_path / "imgs"),
                         instances=str(instances), **overrides)


def test_shards_are_deterministic_and_balanced(tmp_path):
    names = [f"img{i:02d}.png" for i in range(11)]
    for name in reversed(names):
        save_image(tmp_path / name, (8, 6))
    cfg = folder_dataset(tmp_path)
    first = manifest.run(cfg, 3, tmp_path / "m1.parquet").to_pandas()
    second = manifest.run(cfg, 3, tmp_path / "m2.parquet").to_pandas()
    assert first.equals(second)
    assert list(first["image_id"]) == [n.removesuffix(".png") for n in names]
    assert list(first["shard"]) == [i % 3 for i in range(11)]
    assert sorted(first["shard"].value_counts().tolist()) == [3, 4, 4]
    assert first["error"].isna().all()
    assert (first["width"] == 8).all() and (first["height"] == 6).all()


def test_more_shards_than_images_leaves_empty_shards(tmp_path):
    save_image(tmp_path / "a.png", (4, 4))
    table = manifest.run(folder_dataset(tmp_path), 5, tmp_path / "m.parquet").to_pandas()
    assert list(table["shard"]) == [0]


@pytest.mark.parametrize("shards", [0, -1, 1.5, True])
def test_bad_shard_count(tmp_path, shards):
    with pytest.raises(ConfigError, match="shards must be a positive integer"):
        manifest.run(folder_dataset(tmp_path), shards, tmp_path / "m.parquet")


@pytest.mark.parametrize(("name", "mode", "size"), [
    ("gray.png", "L", (13, 7)),
    ("rgba.png", "RGBA", (9, 21)),
    ("cmyk.jpg", "CMYK", (17, 5)),
    ("palette.png", "P", (6, 11)),
    ("gray16.png", "I;16", (10, 3)),
    ("binary.bmp", "1", (12, 12)),
    ("pixel.png", "RGB", (1, 1)),
    ("photo.webp", "RGB", (15, 4)),
    ("scan.tiff", "RGB", (5, 15)),
])
def test_sizes_from_headers_of_any_mode(tmp_path, name, mode, size):
    save_image(tmp_path / name, size, mode)
    row = manifest.run(folder_dataset(tmp_path), 1, tmp_path / "m.parquet").to_pylist()[0]
    assert (row["width"], row["height"]) == size
    assert row["error"] is None


def test_error_rows_keep_id_and_shard(tmp_path):
    images_dir = tmp_path / "imgs"
    images_dir.mkdir()
    save_image(images_dir / "good.png", (20, 10))
    save_image(images_dir / "huge.png", (30, 20))
    (images_dir / "broken.jpg").write_bytes(b"this is not a JPEG")
    images = [
        {"id": 1, "file_name": "good.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "missing.jpg", "width": 5, "height": 5},
        {"id": 3, "file_name": "broken.jpg", "width": 5, "height": 5},
        {"id": 4, "file_name": "huge.png", "width": 30, "height": 20},
    ]
    cfg = instances_dataset(tmp_path, images, max_pixels=500)
    rows = {r["image_id"]: r for r in manifest.run(cfg, 2, tmp_path / "m.parquet").to_pylist()}
    assert list(rows) == ["1", "2", "3", "4"]
    assert [rows[i]["shard"] for i in rows] == [0, 1, 0, 1]
    assert rows["1"]["error"] is None and (rows["1"]["width"], rows["1"]["height"]) == (20, 10)
    assert rows["2"]["error"].startswith(f"image listed in {cfg.instances} not found on disk")
    assert rows["2"]["file"] == str(images_dir / "missing.jpg")
    assert "unreadable image" in rows["3"]["error"] and rows["3"]["width"] is None
    assert rows["4"]["error"] == "image has 30 x 20 = 600 pixels, above max_pixels=500"
    assert (rows["4"]["width"], rows["4"]["height"]) == (30, 20)


def test_image_at_max_pixels_is_accepted(tmp_path):
    save_image(tmp_path / "a.png", (25, 20))
    row = manifest.run(folder_dataset(tmp_path, max_pixels=500), 1, tmp_path / "m.parquet").to_pylist()[0]
    assert row["error"] is None


def test_zero_size_header_is_an_error_row(tmp_path, monkeypatch):
    save_image(tmp_path / "a.png", (4, 4))
    monkeypatch.setattr(manifest, "image_size", lambda path: (0, 7))
    row = manifest.run(folder_dataset(tmp_path), 1, tmp_path / "m.parquet").to_pylist()[0]
    assert row["error"] == "image has zero size 0 x 7"


def test_size_disagreeing_with_ground_truth_is_an_error_row(tmp_path):
    """Masks have the file's size; annotations of another size could not be compared with them (the
    evaluator would stop): an error row naming both sizes, not a warning."""
    (tmp_path / "imgs").mkdir()
    save_image(tmp_path / "imgs" / "a.png", (12, 9))
    save_image(tmp_path / "imgs" / "b.png", (5, 5))
    cfg = instances_dataset(tmp_path, [{"id": 5, "file_name": "a.png", "width": 9, "height": 12},
                                       {"id": 6, "file_name": "b.png", "width": 5, "height": 5}])
    rows = manifest.run(cfg, 1, tmp_path / "m.parquet").to_pylist()
    assert rows[0]["error"] == (f"image is 12 x 9 pixels in its file but 9 x 12 in {cfg.instances}: its masks "
                                "would not fit its annotations")
    assert (rows[0]["width"], rows[0]["height"]) == (12, 9)
    assert rows[1]["error"] is None


def test_exif_rotated_image_is_measured_as_stored(tmp_path):
    """EXIF orientation is not applied: the stored 40 x 24 grid is the image's size, which ground
    truth must declare; ground truth declaring the displayed 24 x 40 gets an error row saying why."""
    (tmp_path / "imgs").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "imgs" / "r.jpg", exif=exif)
    stored = instances_dataset(tmp_path, [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 24}])
    row = manifest.run(stored, 1, tmp_path / "m.parquet").to_pylist()[0]
    assert row["error"] is None and (row["width"], row["height"]) == (40, 24)
    displayed = instances_dataset(tmp_path, [{"id": 1, "file_name": "r.jpg", "width": 24, "height": 40}])
    row = manifest.run(displayed, 1, tmp_path / "m.parquet").to_pylist()[0]
    assert "its EXIF orientation 6 shows it turned to 24 x 40, but the pipeline uses the stored pixel grid" \
        in row["error"]


def test_unusable_ground_truth_gives_one_error_row_per_image_id(tmp_path):
    """An image id listed twice, an annotation without segmentation: that image's error row names the
    file and the reason; the other images are measured as usual."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        save_image(tmp_path / "imgs" / name, (4, 3))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": i, "file_name": name, "width": 4, "height": 3}
                   for i, name in ((1, "a.png"), (2, "b.png"), (2, "c.png"), (3, "d.png"))],
        "annotations": [{"id": 9, "image_id": 3, "category_id": 1},
                        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2]]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    cfg = DatasetConfig(name="coco", task="instance_seg", images=str(tmp_path / "imgs"), instances=str(instances))
    rows = {r["image_id"]: r for r in manifest.run(cfg, 2, tmp_path / "m.parquet").to_pylist()}
    assert list(rows) == ["1", "2", "3"] and [r["shard"] for r in rows.values()] == [0, 1, 0]
    assert rows["1"]["error"] is None and rows["1"]["width"] == 4
    assert rows["2"]["error"] == (f"ground truth {instances}: image id 2 is listed 2 times in the ground truth "
                                  "(images[1] 'b.png', images[2] 'c.png'): its annotations cannot be told apart")
    assert rows["3"]["error"] == (f"ground truth {instances}: annotations[0] (id 9) of this image has no "
                                  "segmentation: no ground-truth mask to evaluate against")


def test_files_sharing_an_id_in_a_folder_are_one_error_row(tmp_path):
    save_image(tmp_path / "x.png", (4, 3))
    save_image(tmp_path / "x.jpg", (4, 3))
    save_image(tmp_path / "y.png", (4, 3))
    rows = manifest.run(folder_dataset(tmp_path), 1, tmp_path / "m.parquet").to_pylist()
    assert [(r["image_id"], r["error"]) for r in rows] == [
        ("x", f"2 files of {tmp_path} would have image id 'x' (x.jpg, x.png): rename all but one"), ("y", None)]


def test_written_file_is_a_manifest(tmp_path):
    save_image(tmp_path / "a.png", (3, 2))
    manifest.run(folder_dataset(tmp_path), 2, tmp_path / "out" / "manifest.parquet")
    table = read_arrow(tmp_path / "out" / "manifest.parquet", "manifest")
    assert table.schema.equals(MANIFEST)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_cli_uses_config_dataset_and_shards(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    for name in "abc":
        save_image(tmp_path / "imgs" / f"{name}.png", (4, 3))
    config = {"shards": 2, "datasets": {"plain": {"task": "images", "images": "imgs"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    manifest.main(["--config", "config.yaml", "--dataset", "plain", "--out", "m.parquet"])
    table = read_table(tmp_path / "m.parquet", "manifest")
    assert list(table["shard"]) == [0, 1, 0]
    assert list(table["file"]) == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    with pytest.raises(SystemExit, match="'other' is not in config.yaml"):
        manifest.main(["--config", "config.yaml", "--dataset", "other", "--out", "m.parquet"])


def test_a_10000_px_square_image_gets_an_error_row_by_default(tmp_path):
    Image.new("L", (10000, 10000), 128).save(tmp_path / "huge.png", compress_level=1)
    save_image(tmp_path / "small.png", (8, 6))
    rows = {r["image_id"]: r for r in manifest.run(folder_dataset(tmp_path), 1, tmp_path / "m.parquet").to_pylist()}
    assert rows["huge"]["error"] == "image has 10000 x 10000 = 100000000 pixels, above max_pixels=50000000"
    assert rows["small"]["error"] is None


def test_referring_and_narrative_samples_share_their_image(tmp_path, monkeypatch):
    """One row per sample: a RefCOCO sentence carries its expression, a narrative its forced answer; the
    samples of one image share its size, read from the header once."""
    import dataclasses

    from test_refer_png_datasets import png_config, res_config

    reads = []
    real_image_size = manifest.image_size
    monkeypatch.setattr(manifest, "image_size", lambda file: reads.append(file) or real_image_size(file))
    res = res_config(tmp_path)
    res = dataclasses.replace(res, images=str(tmp_path / "train2014"))
    (tmp_path / "train2014").mkdir()
    save_image(tmp_path / "train2014" / "COCO_train2014_000000581857.jpg", (8, 6))
    save_image(tmp_path / "train2014" / "COCO_train2014_000000000002.jpg", (5, 4))
    table = manifest.run(res, 2, tmp_path / "res.parquet").to_pylist()
    good = [row for row in table if row["error"] is None]
    assert [(row["sample_id"], row["image_id"], row["expression"], row["width"]) for row in good[:3]] == [
        ("100-7", "581857", "left man", 8), ("100-3", "581857", "man on left", 8), ("5-9", "2", "big cat", 5)]
    assert [row["shard"] for row in table[:3]] == [0, 1, 0] and all(row["forced_answer"] is None for row in table)
    assert len(reads) == 2                        # two images, eight samples

    png = dataclasses.replace(png_config(tmp_path), images=str(tmp_path / "val2017"))
    (tmp_path / "val2017").mkdir()
    save_image(tmp_path / "val2017" / "000000000139.jpg", (6, 4))
    save_image(tmp_path / "val2017" / "000000000285.jpg", (5, 3))
    rows = {row["sample_id"]: row for row in manifest.run(png, 1, tmp_path / "png.parquet").to_pylist()}
    assert rows["139-0"]["forced_answer"] == ["A man", " stands under", "the sky", "."]
    assert rows["139-1"]["forced_answer"] == ["Two people"] and rows["139-1"]["height"] == 4
    assert rows["139-0"]["expression"] is None and "no annotation in the panoptic file" in rows["632-0"]["error"]
