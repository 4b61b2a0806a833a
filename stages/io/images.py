"""Image reading shared by every stage: any PIL mode in, RGB uint8 out, clear errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Large images are legitimate here; the dataset's `max_pixels` decides what is too large.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image cannot be used; the message is the reason stored in error rows."""


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"unreadable image {path}: {exc}") from None


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` into an RGB PIL image (grayscale, palette, RGBA, CMYK, 16-bit converted).

    RGBA/LA/palette-with-transparency images are composited on white; the pixel grid is the file's
    stored grid (no EXIF rotation, matching COCO's annotation convention).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)
                    peak = arr.max() if arr.size and arr.max() > 0 else 1.0
                    im = Image.fromarray((arr * (255.0 / peak)).astype(np.uint8), mode="L")
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
