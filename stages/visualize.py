"""Stage `visualize`: pictures of what the pipeline did for the first samples of a data set.

For each of the first ``num_images`` rows of the manifest (samples, in manifest order, all shards;
one sample per image for instance segmentation and GCG) it writes:

- ``<sample_id>_overlay.png``: the image with every mask blended in its own colour and outlined, the
  SAM point prompt as a marker and the phrase (with SAM's score) as a label; error reasons of the
  image's generation, phrase and mask rows are listed under the picture;
- ``<sample_id>_attention.png``: a thumbnail of the image, then one tile per generated token (the
  first ``MAX_TOKENS_SHOWN``), each the size of the thumbnail: the token's attention map, coloured
  from its own minimum (dark) to its own maximum (bright), laid on the image's pixels the way the
  segment stage lays it (:func:`stages.segment.grid_frame` of the upsample mode: the config's
  ``segment.upsample``, with "auto" the one matching the attention store's ``grid_covers``), each
  grid cell a sharp rectangle (nearest neighbour), blended over a greyscale copy of the image; so
  the segment stage's point prompt (the argmax of the bicubic map) falls in or next to the hottest
  visible cell. Pixels the model never saw (outside the centre square with ``crop``) are the
  washed-out greyscale image, hatched; the padding of ``pad`` lies outside the image and is not drawn
  (its cells still count in the map's min..max). Each tile is captioned with the token's text;
  tiles of tokens that ground a phrase are framed in that phrase's colour.

A sample whose manifest row has an error, whose image cannot be read, or whose artifacts are
inconsistent gets PNGs showing the reason instead; one sample never stops the stage.

CLI::

    python -m stages.visualize --manifest M --generations G0 G1 --attention A0 A1 --phrases P0 P1 \\
        --masks K0 K1 --out DIR [--num-images N] [--upsample auto|pad|crop|original]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from stages.config import ConfigError, schema_default
from stages.io.atomic import atomic_path
from stages.io.attention import open_attention, read_rows
from stages.io.images import ImageError, load_rgb_array
from stages.io.tables import CorruptArtifactError, read_table, read_tables
from stages.segment import UPSAMPLES, grid_frame, resolve_upsample

# Distinct, colour-blind-tolerant colours (matplotlib's tab10), chosen by phrase index.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
# Dark-to-bright colour map anchors (close to matplotlib's "inferno"), RGB.
HEATMAP_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
                           dtype=float)
# Attention tiles: weight of the heat-map colour over the greyscale image.
HEAT_WEIGHT = 0.7
# Pixels the model never saw: the greyscale image washed towards white by UNSEEN_WASH, with diagonal
# lines of UNSEEN_HATCH on every pixel (column x, row y) with (x + y) % HATCH_PERIOD == 0.
UNSEEN_WASH = 0.6
UNSEEN_HATCH = (100, 100, 100)
HATCH_PERIOD = 5
MAX_TOKENS_SHOWN = 48
TILE = 96
GRID_COLUMNS = 8
PADDING = 6
OVERLAY_MIN_LONG_SIDE = 512
OVERLAY_MAX_LONG_SIDE = 1024
ERROR_WIDTH = 480
TEXT_COLOUR = (20, 20, 20)
ERROR_COLOUR = (180, 20, 20)


@dataclass(frozen=True)
class VisualizeConfig:
    """The config's ``visualize`` section: pictures for the first ``num_images`` images."""

    num_images: int = schema_default("visualize", "num_images")

    def __post_init__(self) -> None:
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 0:
            raise ConfigError(f"visualize.num_images must be a non-negative integer, got {self.num_images!r}")


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _present(value: Any) -> bool:
    """False for a null cell of a table (None, or NaN as pandas shows null numbers and strings)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (long words are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _text_block(lines: Sequence[str], width: int, *, colour=TEXT_COLOUR, size: int = 13) -> Image.Image:
    """White panel ``width`` pixels wide holding ``lines`` (each wrapped to the width)."""
    font = _font(size)
    wrapped = [part for line in lines for part in _wrap(line, font, width - 2 * PADDING)]
    line_height = size + 4
    panel = Image.new("RGB", (width, 2 * PADDING + line_height * len(wrapped)), "white")
    draw = ImageDraw.Draw(panel)
    for index, line in enumerate(wrapped):
        draw.text((PADDING, PADDING + index * line_height), line, fill=colour, font=font)
    return panel


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    return canvas


def render_error(sample_id: str, message: str) -> Image.Image:
    """A white picture naming ``sample_id`` and stating ``message`` (why nothing else is shown)."""
    title = _text_block([f"sample {sample_id}"], ERROR_WIDTH, size=15)
    return _stack(title, _text_block([message], ERROR_WIDTH, colour=ERROR_COLOUR))


def decode_mask(row: Mapping[str, Any]) -> np.ndarray:
    """The mask of a masks-table row (COCO compressed RLE), bool (height, width)."""
    rle = {"size": [int(row["height"]), int(row["width"])], "counts": str(row["rle_counts"]).encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _mask_colour(row: Mapping[str, Any], position: int) -> tuple[int, int, int]:
    """The colour of a mask: by its phrase index when it has one, else by its position."""
    key = int(row["phrase_index"]) if _present(row.get("phrase_index")) else position
    return PALETTE[key % len(PALETTE)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (bool (H, W)) with at least one 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _display_scale(width: int, height: int) -> float:
    """Factor that brings the long side into [OVERLAY_MIN_LONG_SIDE, OVERLAY_MAX_LONG_SIDE], so that
    labels stay legible on tiny images and files stay small for huge ones; small images are enlarged
    by a whole factor (every pixel becomes a square block)."""
    long_side = max(width, height)
    if long_side > OVERLAY_MAX_LONG_SIDE:
        return OVERLAY_MAX_LONG_SIDE / long_side
    return float(math.ceil(OVERLAY_MIN_LONG_SIDE / long_side)) if long_side < OVERLAY_MIN_LONG_SIDE else 1.0


def render_overlay(image_rgb: np.ndarray, masks: Iterable[Mapping[str, Any]], *,
                   alpha: float = 0.45) -> Image.Image:
    """Draw masks, point prompts and phrase labels over an image.

    ``image_rgb``: uint8 (H, W, 3). ``masks``: rows of the masks table (mappings, e.g. a DataFrame's
    ``to_dict("records")``) with ``rle_counts``, ``height``, ``width`` and, when present,
    ``point_x``/``point_y`` (the prompt pixel's column and row, see :mod:`schemas.artifacts`),
    ``text``, ``score`` and ``phrase_index``; rows with an ``error`` or no mask are
    skipped. Each mask is blended with weight ``alpha`` in its colour (by phrase index) and outlined.
    The result is rescaled so that its long side is in [512, 1024] pixels (whole factors upwards).
    Raises ValueError when a mask's size differs from the image's.
    """
    height, width = image_rgb.shape[:2]
    blended = image_rgb.astype(np.float32)
    annotations = []
    for position, row in enumerate(masks):
        if _present(row.get("error")) or not _present(row.get("rle_counts")):
            continue
        mask = decode_mask(row)
        if mask.shape != (height, width):
            raise ValueError(f"mask of {row.get('text')!r} is {mask.shape[1]} x {mask.shape[0]} pixels, "
                             f"the image is {width} x {height}")
        colour = _mask_colour(row, position)
        blended[mask] = (1 - alpha) * blended[mask] + alpha * np.array(colour, dtype=np.float32)
        blended[_outline(mask)] = colour
        annotations.append((row, colour))

    scale = _display_scale(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    canvas = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)).resize(size, resample)
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    for row, colour in annotations:
        if not (_present(row.get("point_x")) and _present(row.get("point_y"))):
            continue
        # Centre of the prompt pixel (column x, row y) on the rescaled canvas, where PIL puts the
        # centre of canvas pixel (i, j) at (i, j).
        x = (float(row["point_x"]) + 0.5) * scale - 0.5
        y = (float(row["point_y"]) + 0.5) * scale - 0.5
        draw.ellipse((x - 6, y - 6, x + 6, y + 6), fill=colour, outline="white", width=2)
        draw.ellipse((x - 8, y - 8, x + 8, y + 8), outline="black", width=1)
        label = str(row["text"]) if _present(row.get("text")) else "?"
        if _present(row.get("score")):
            label += f" {float(row['score']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        box_w, box_h = right - left + 6, bottom - top + 6
        bx = min(max(0.0, x + 10), canvas.width - box_w)
        by = min(max(0.0, y - 10 - box_h), canvas.height - box_h)
        draw.rectangle((bx, by, bx + box_w, by + box_h), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((bx + 3 - left, by + 3 - top), label, font=font,
                  fill="black" if luminance > 140 else "white")
    return canvas


def heatmap(values: np.ndarray) -> np.ndarray:
    """Colour a float (h, w) map from its minimum (dark) to its maximum (bright): uint8 (h, w, 3).
    A constant map is all dark."""
    values = np.asarray(values, dtype=np.float64)
    low, span = values.min(), np.ptp(values)
    scaled = (values - low) / span if span > 0 else np.zeros_like(values)
    position = scaled * (len(HEATMAP_ANCHORS) - 1)
    anchors = np.arange(len(HEATMAP_ANCHORS))
    channels = [np.interp(position, anchors, HEATMAP_ANCHORS[:, c]) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def token_label(generation: Mapping[str, Any], index: int) -> str:
    """Display text of generated token ``index``: its span of the answer (surrounding spaces
    dropped; a blank token shown quoted), or ``<id>`` for a special token."""
    if bool(generation["token_special"][index]):
        return f"<{int(generation['token_ids'][index])}>"
    start, end = int(generation["token_starts"][index]), int(generation["token_ends"][index])
    text = str(generation["answer"])[start:end]
    return text.strip() or repr(text)


def _tile_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the thumbnail and of each attention tile: the image's aspect ratio, long
    side TILE pixels."""
    if width >= height:
        return TILE, max(1, round(TILE * height / width))
    return max(1, round(TILE * width / height)), TILE


def grid_cells(height: int, width: int, grid: tuple[int, int], mode: str,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The feature-grid cell drawn at each pixel of a tile showing a ``height x width`` image.

    The tile is ``size = (tile_w, tile_h)`` pixels; its pixel (column ``x``, row ``y``) shows the
    image point at column ``(x + 0.5) * width / tile_w``, row ``(y + 0.5) * height / tile_h``
    (continuous image coordinates, pixel ``(c, r)`` spanning ``[c, c + 1) x [r, r + 1)``). The
    ``grid = (grid_h, grid_w)`` cells tile the frame :func:`stages.segment.grid_frame` gives for
    ``mode`` evenly, and a point is drawn with the cell it lies in (nearest neighbour). Cells are
    separable, so this returns ``(rows, columns)``: int64 ``(tile_h,)``, the grid row drawn on each
    tile row, and int64 ``(tile_w,)``, the grid column drawn on each tile column; -1 where the point
    lies outside the frame (pixels the model never saw).
    """
    grid_h, grid_w = grid
    tile_w, tile_h = size
    top, left, frame_h, frame_w = grid_frame(height, width, mode)
    points_y = (np.arange(tile_h) + 0.5) * height / tile_h
    points_x = (np.arange(tile_w) + 0.5) * width / tile_w
    rows = np.floor((points_y - top) * grid_h / frame_h).astype(np.int64)
    columns = np.floor((points_x - left) * grid_w / frame_w).astype(np.int64)
    rows[(rows < 0) | (rows >= grid_h)] = -1
    columns[(columns < 0) | (columns >= grid_w)] = -1
    return rows, columns


def _thumbnail(image_rgb: np.ndarray) -> Image.Image:
    """The image at :func:`_tile_size` (enlarged by repeating pixels, reduced with Lanczos)."""
    height, width = image_rgb.shape[:2]
    size = _tile_size(height, width)
    resample = Image.Resampling.NEAREST if size[0] >= width else Image.Resampling.LANCZOS
    return Image.fromarray(image_rgb).resize(size, resample)


def attention_tiles(image_rgb: np.ndarray, rows: np.ndarray, mode: str) -> np.ndarray:
    """Each token's attention map drawn on the image, uint8 ``(n, tile_h, tile_w, 3)``.

    ``image_rgb``: uint8 ``(H, W, 3)``. ``rows``: float ``(n, grid_h, grid_w)``, the maps. ``mode``:
    the upsample mode ("pad", "crop" or "original") placing the grid on the image. The tile is the
    image's :func:`_tile_size`; at each tile pixel whose point of the image the model saw, the
    :func:`heatmap` colour (of the whole map, min..max) of the cell :func:`grid_cells` puts there,
    weighted HEAT_WEIGHT, is blended with the pixel of a greyscale thumbnail of the image; the other
    pixels are that greyscale washed towards white (UNSEEN_WASH) and hatched (UNSEEN_HATCH).
    """
    thumbnail = _thumbnail(image_rgb)
    grey = np.asarray(thumbnail.convert("L"), dtype=np.float64)[..., None]
    cell_rows, cell_columns = grid_cells(image_rgb.shape[0], image_rgb.shape[1], rows.shape[1:], mode,
                                         thumbnail.size)
    seen = (cell_rows[:, None] >= 0) & (cell_columns[None, :] >= 0)
    unseen = np.broadcast_to((1 - UNSEEN_WASH) * grey + UNSEEN_WASH * 255, (*seen.shape, 3)).copy()
    ys, xs = np.indices(seen.shape)
    unseen[(xs + ys) % HATCH_PERIOD == 0] = UNSEEN_HATCH
    tiles = np.empty((len(rows), *seen.shape, 3), dtype=np.uint8)
    for index, values in enumerate(rows):
        heat = heatmap(values)[np.maximum(cell_rows, 0)[:, None], np.maximum(cell_columns, 0)[None, :]]
        blended = HEAT_WEIGHT * heat + (1 - HEAT_WEIGHT) * grey
        tiles[index] = np.clip(np.rint(np.where(seen[..., None], blended, unseen)), 0, 255)
    return tiles


def render_attention_grid(image_rgb: np.ndarray, generation: Mapping[str, Any], rows: np.ndarray,
                          mode: str, *,
                          token_colours: Mapping[int, tuple[int, int, int]] | None = None) -> Image.Image:
    """A grid of per-token attention maps under a header with the answer.

    ``image_rgb``: uint8 (H, W, 3), shown as the first tile. ``generation``: a generations-table row
    (``answer``, ``token_ids``, ``token_starts``, ``token_ends``, ``token_special``, ``num_tokens``).
    ``rows``: float (n, grid_h, grid_w), the attention rows of the first n generated tokens, drawn
    on the image by :func:`attention_tiles` with upsample ``mode`` ("pad", "crop" or "original").
    ``token_colours``: token index -> frame colour (tokens that ground a phrase).
    """
    token_colours = token_colours or {}
    count = len(rows)
    caption_h = 16
    cell_w, cell_h = TILE + 2 * PADDING, TILE + caption_h + 2 * PADDING
    columns = min(GRID_COLUMNS, count + 1)
    grid_rows = math.ceil((count + 1) / columns)
    body = Image.new("RGB", (columns * cell_w, grid_rows * cell_h), "white")
    draw = ImageDraw.Draw(body)
    font = _font(11)

    tiles = [(_thumbnail(image_rgb), "image", None)]
    for index, tile in enumerate(attention_tiles(image_rgb, rows, mode)):
        tiles.append((Image.fromarray(tile), f"{index}: {token_label(generation, index)}",
                      token_colours.get(index)))
    for position, (tile, caption, frame) in enumerate(tiles):
        x0 = (position % columns) * cell_w + PADDING
        y0 = (position // columns) * cell_h + PADDING
        tx, ty = x0 + (TILE - tile.width) // 2, y0 + (TILE - tile.height) // 2
        body.paste(tile, (tx, ty))
        if frame is not None:
            draw.rectangle((tx - 3, ty - 3, tx + tile.width + 2, ty + tile.height + 2),
                           outline=frame, width=3)
        while caption and font.getlength(caption) > TILE:
            caption = caption[:-1]
        draw.text((x0, y0 + TILE + 2), caption, fill=TEXT_COLOUR, font=font)

    total = int(generation["num_tokens"])
    unseen = "; hatched: pixels the model never saw" if mode == "crop" else ""
    header = [(f"answer ({total} tokens; showing {count}; each map scaled to its own min..max and laid on the "
               f"image with upsample {mode}{unseen}):"), str(generation["answer"])]
    return _stack(_text_block(header, body.width), body)


def _error_lines(stage: str, frame: pd.DataFrame) -> list[str]:
    return [f"{stage}: {reason}" for reason in frame["error"] if _present(reason)]


def _save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


class _AttentionStores:
    """Attention stores opened once each, by path, and the upsample mode of each."""

    def __init__(self, upsample: str) -> None:
        self._upsample = upsample
        self._open: dict[str, zarr.Array] = {}
        self._modes: dict[str, str] = {}

    def rows(self, path: str, offset: int, count: int, grid: tuple[int, int]) -> np.ndarray:
        """``count`` maps (count, *grid) float32 from element ``offset`` of the store at ``path``;
        ArtifactError (a ValueError) when they lie outside it."""
        if path not in self._open:
            self._open[path] = open_attention(path)
        return read_rows(self._open[path], offset, count, grid)

    def mode(self, path: str) -> str:
        """The upsample mode of the maps of the store at ``path`` (call :meth:`rows` on it first,
        which checks its attributes): the configured one, "auto" resolved from its ``grid_covers``."""
        if path not in self._modes:
            self._modes[path] = resolve_upsample(self._upsample, path)
        return self._modes[path]


def _phrase_token_colours(phrases: pd.DataFrame) -> dict[int, tuple[int, int, int]]:
    colours: dict[int, tuple[int, int, int]] = {}
    for row in phrases.to_dict("records"):
        if _present(row.get("phrase_index")) and row.get("token_indices") is not None:
            for token in row["token_indices"]:
                colours.setdefault(int(token), PALETTE[int(row["phrase_index"]) % len(PALETTE)])
    return colours


def _overlay_picture(image_rgb: np.ndarray, generation: Mapping[str, Any] | None, phrases: pd.DataFrame,
                     masks: pd.DataFrame) -> Image.Image:
    """:func:`render_overlay` of the image's masks, with the error reasons of its rows listed below."""
    notes = _error_lines("phrases", phrases) + _error_lines("segment", masks)
    if generation is not None and _present(generation.get("error")):
        notes.insert(0, f"generate: {generation['error']}")
    overlay = render_overlay(image_rgb, masks.to_dict("records"))
    if notes:
        overlay = _stack(overlay, _text_block(notes, overlay.width, colour=ERROR_COLOUR))
    return overlay


def _attention_picture(sample_id: str, image_rgb: np.ndarray, generation: Mapping[str, Any] | None,
                       attention_path: str | None, phrases: pd.DataFrame,
                       stores: _AttentionStores) -> Image.Image:
    """:func:`render_attention_grid` of the image's generation, or the reason there is none."""
    if generation is None:
        return render_error(sample_id, "no generation row for this sample")
    if _present(generation.get("error")):
        return render_error(sample_id, f"generate: {generation['error']}")
    if int(generation["num_tokens"]) == 0:
        return render_error(sample_id, "the answer has no tokens")
    count = min(int(generation["num_tokens"]), MAX_TOKENS_SHOWN)
    grid = (int(generation["grid_h"]), int(generation["grid_w"]))
    rows = stores.rows(attention_path, int(generation["attention_offset"]), count, grid)
    return render_attention_grid(image_rgb, generation, rows, stores.mode(attention_path),
                                 token_colours=_phrase_token_colours(phrases))


def _picture_or_error(sample_id: str, draw: Callable[[], Image.Image]) -> Image.Image:
    """``draw()``, or a picture of the reason when the sample's artifacts cannot be drawn."""
    try:
        return draw()
    except CorruptArtifactError:
        raise                       # a damaged artifact fails the job, naming the rule to rerun
    except (ImageError, ValueError) as exc:
        return render_error(sample_id, str(exc))


def _pictures(manifest_row: Mapping[str, Any], generation: Mapping[str, Any] | None,
              attention_path: str | None, phrases: pd.DataFrame, masks: pd.DataFrame,
              stores: _AttentionStores) -> tuple[Image.Image, Image.Image]:
    """(overlay, attention grid) of one sample; each shows the reason instead when it cannot be drawn."""
    sample_id = manifest_row["sample_id"]
    if _present(manifest_row.get("error")):
        failed = render_error(sample_id, f"manifest: {manifest_row['error']}")
        return failed, failed
    try:
        image_rgb = load_rgb_array(manifest_row["file"])
    except ImageError as exc:
        failed = render_error(sample_id, str(exc))
        return failed, failed
    overlay = _picture_or_error(sample_id, functools.partial(
        _overlay_picture, image_rgb, generation, phrases, masks))
    grid = _picture_or_error(sample_id, functools.partial(
        _attention_picture, sample_id, image_rgb, generation, attention_path, phrases, stores))
    return overlay, grid


def run(cfg: VisualizeConfig, manifest_path: str | os.PathLike,
        generations_paths: Sequence[str | os.PathLike], attention_paths: Sequence[str | os.PathLike],
        phrases_paths: Sequence[str | os.PathLike], masks_paths: Sequence[str | os.PathLike],
        out_dir: str | os.PathLike, upsample: str = schema_default("segment", "upsample")) -> list[Path]:
    """Write ``<sample_id>_overlay.png`` and ``<sample_id>_attention.png`` under ``out_dir`` for the
    first ``cfg.num_images`` manifest rows and return the paths written.

    ``generations_paths[k]`` and ``attention_paths[k]`` are the same shard's generations table and
    attention store; phrases and masks tables may come in any shard order. ``upsample``: the run's
    ``segment.upsample`` (one of :data:`stages.segment.UPSAMPLES`), how the attention maps are laid
    on the image; "auto" follows each store's ``grid_covers``, as the segment stage does.
    """
    if upsample not in UPSAMPLES:
        raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
    if len(generations_paths) != len(attention_paths):
        raise ValueError(f"{len(generations_paths)} generations tables but {len(attention_paths)} attention "
                         "stores; give one store per generations shard, in the same order")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = read_table(manifest_path, "manifest").head(cfg.num_images)
    wanted = set(selected["sample_id"])

    generations: dict[str, tuple[dict[str, Any], str]] = {}
    for generations_path, attention_path in zip(generations_paths, attention_paths):
        table = read_table(generations_path, "generations")
        for row in table[table["sample_id"].isin(wanted)].to_dict("records"):
            generations[row["sample_id"]] = (row, str(attention_path))
    phrases = read_tables(phrases_paths, "phrases")
    phrases = phrases[phrases["sample_id"].isin(wanted)]
    masks = read_tables(masks_paths, "masks")
    masks = masks[masks["sample_id"].isin(wanted)]

    stores = _AttentionStores(upsample)
    written: list[Path] = []
    for manifest_row in selected.to_dict("records"):
        sample_id = manifest_row["sample_id"]
        generation, attention_path = generations.get(sample_id, (None, None))
        overlay, grid = _pictures(manifest_row, generation, attention_path,
                                  phrases[phrases["sample_id"] == sample_id],
                                  masks[masks["sample_id"] == sample_id], stores)
        written.append(_save_png(overlay, out_dir / f"{sample_id}_overlay.png"))
        written.append(_save_png(grid, out_dir / f"{sample_id}_attention.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.visualize", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--generations", required=True, nargs="+", type=Path,
                        help="generations tables, by shard")
    parser.add_argument("--attention", required=True, nargs="+", type=Path,
                        help="attention stores, in the order of --generations")
    parser.add_argument("--phrases", required=True, nargs="+", type=Path)
    parser.add_argument("--masks", required=True, nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--num-images", type=int, default=VisualizeConfig.num_images)
    parser.add_argument("--upsample", choices=UPSAMPLES, default=schema_default("segment", "upsample"),
                        help="how maps are laid on the image: the run's segment.upsample (default: auto)")
    args = parser.parse_args(argv)
    run(VisualizeConfig(num_images=args.num_images), args.manifest, args.generations, args.attention,
        args.phrases, args.masks, args.out, args.upsample)


if __name__ == "__main__":
    main()
