"""Image reading (stages/io/images.py): every mode to 8-bit RGB, stored orientation, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.io.images import ImageError, image_size, load_rgb_array, load_rgb_image, to_8_bit


def test_16_bit_png_is_scaled_over_its_full_range_not_clipped_nor_stretched(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    array = load_rgb_array(tmp_path / "g16.png")
    assert array.shape == (1, 5, 3) and array.dtype == np.uint8
    assert array[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit image whose values stay below 1000 is dark (below 4/255), as a viewer shows it; it is
    not stretched to the full range by its own maximum."""
    Image.fromarray(np.full((4, 4), 999, dtype=np.uint16)).save(tmp_path / "dark.png")
    assert load_rgb_array(tmp_path / "dark.png").max() == 4


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [[0, 65535]], [[0, 255]]),                    # 16-bit values read as 32-bit integers
    ("I", [[-100, 100]], [[0, 255]]),                   # outside 0..65535: its own range
    ("F", [[0.0, 0.5, 1.0]], [[0, 128, 255]]),
    ("F", [[3.0, 3.0]], [[0, 0]]),                      # constant
])
def test_high_depth_modes_become_8_bit(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array(values, dtype=dtype), mode=mode)
    assert np.asarray(to_8_bit(image)).tolist() == expected


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "RGB"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).convert(mode).save(
        tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    image = load_rgb_image(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    assert image.mode == "RGB" and image.size == (9, 7)


def test_exif_orientation_is_not_applied(tmp_path):
    """The stored pixel grid, as COCO's annotations use it: a JPEG stored 40 x 24 with orientation 6
    (viewers turn it to 24 x 40) is read 40 x 24, by its header and by its pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255                                  # left half white as stored
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert image_size(tmp_path / "rotated.jpg") == (40, 24)
    array = load_rgb_array(tmp_path / "rotated.jpg")
    assert array.shape == (24, 40, 3)
    assert array[:, :18].min() > 200 and array[:, 22:].max() < 50


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file_is_an_error_not_grey_pixels(tmp_path, suffix):
    path = tmp_path / f"cut.{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert image_size(path) == (64, 64)                  # the header is intact
    with pytest.raises(ImageError, match=f"unreadable image .*cut.{suffix}.*truncated"):
        load_rgb_image(path)


@pytest.mark.parametrize("content", [b"", b"plain text, not an image\n"])
def test_empty_and_text_files_are_unreadable(tmp_path, content):
    (tmp_path / "x.jpg").write_bytes(content)
    for read in (image_size, load_rgb_image):
        with pytest.raises(ImageError, match="unreadable image .*x.jpg"):
            read(tmp_path / "x.jpg")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="image file not found"):
        load_rgb_image(tmp_path / "absent.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match="unreadable image .*folder.png"):
        image_size(tmp_path / "folder.png")
