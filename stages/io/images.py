"""Image reading shared by every stage: any PIL mode in, RGB uint8 out, clear errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Large images are legitimate here; the dataset's `max_pixels` decides what is too large.
Image.MAX_IMAGE_PIXELS = None
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image cannot be used; the message is the reason stored in error rows."""


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the stored pixel grid from the file header, without decoding pixels (an
    EXIF orientation is not applied, as in :func:`load_rgb_image`)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"unreadable image {path}: {exc}") from None


def to_8_bit(im: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer / float greyscale image ("I;16*", "I", "F") as 8-bit "L", scaled
    linearly, never clipped: 16-bit modes (and "I" images whose values all lie in 0..65535, as
    Pillow may read 16-bit files) map 0..65535 to 0..255 (value / 257, rounded), so an image keeps
    its brightness; other "I" and "F" images map their own minimum..maximum to 0..255 (a constant
    image becomes 0). Other modes are returned unchanged."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return im
    values = np.asarray(im, dtype=np.float64)
    if not values.size:
        return Image.new("L", im.size)
    low, high = float(values.min()), float(values.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of ``path`` (1..8; 1, the stored grid as is, when absent or
    unreadable). 5..8 turn the image by 90 degrees for display."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, TypeError):
        return 1


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` into an RGB PIL image (grayscale, palette, RGBA, CMYK, 16-bit converted).

    RGBA/LA/palette-with-transparency images are composited on white; 16-bit and other
    high-depth greyscale images are scaled to 8 bits (:func:`to_8_bit`). The pixel grid is the
    file's stored grid: an EXIF orientation tag is not applied, as in COCO, whose annotations
    (and image sizes) are in stored-pixel coordinates; every stage reads images through this
    function and :func:`image_size`, so masks, points and overlays are all in that grid. A file
    whose pixels cannot all be decoded (e.g. truncated) is an :class:`ImageError`, never an
    image with grey filling.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                im = to_8_bit(im)
                if im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")
                if im.mode in ("RGBA", "LA", "PA"):
                    rgba = im.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(background, rgba).convert("RGB")
                return im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"unreadable image {path}: {exc}") from None


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` into a (height, width, 3) uint8 RGB array."""
    return np.asarray(load_rgb_image(path), dtype=np.uint8)
