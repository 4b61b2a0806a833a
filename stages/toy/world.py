"""The embedded toy data set: coloured shapes on textured backgrounds, with masks and captions.

Everything follows from ``SyntheticConfig.seed``: image ``i`` of split ``s`` (train, val or test) is
drawn from the random generator :func:`scene_rng` = ``numpy.random.default_rng([seed, SPLITS.index(s), i])``,
so an image does not depend on how many images are made, and the splits never share a scene stream.
Three steps per image, each usable on its own:

1. :func:`generate_scene` draws a :class:`Scene` (size, background, 1-3 objects of distinct
   shape/colour pairs, in painter's order: later objects are drawn over earlier ones);
2. :func:`render_scene` rasterises it into an RGB image and one *visible* mask per object (what is
   left of the object after the objects drawn later cover it); each category (shape) has its own
   surface pattern (:data:`PATTERNS`), drawn in the object's colour and a light tone;
3. :func:`describe_scene` writes a caption naming every object once, with its attributes and some
   relations, and returns the phrase of each object exactly as it appears in the caption.

:func:`run` writes the data set in the ground-truth layouts the pipeline reads::

    out_dir/images/<id>.jpg                   id = "toy_<split>_000000", "toy_<split>_000001", ...
    out_dir/instances.json                    COCO instances: integer image ids 1.., file_name "<id>.jpg",
                                              one category per shape
    out_dir/<split>_gcg_coco_mask_gt.json     GranD-f mask file: string image ids, category_id 1
    out_dir/<split>_gcg_coco_caption_gt.json  GranD-f caption file: {image_id, caption, labels}
    out_dir/refs(unc).p                       RefCOCO refs (pickle protocol 2) over instances.json: one ref
                                              per object, its phrase without the article as the sentence
    out_dir/png_coco_<split>.json             PNG narratives: the caption cut into utterances, each object's
                                              phrase (and the background's, when the caption names it) a
                                              segment with its panoptic segment id
    out_dir/panoptic_<split>.json             COCO panoptic: integer image ids 1.., segments_info per image,
    out_dir/panoptic_<split>/<id>.png         the shapes as things, the background (every pixel no object
                                              covers) as stuff; ids encoded as R + 256 G + 256^2 B

Annotations of an image are in the scene's object order in every file, and ``labels[k]`` of the
caption file is the phrase of the image's k-th mask annotation. Masks are COCO compressed RLE with
``area`` and ``bbox`` ([x, y, w, h], pixels). In the panoptic PNGs object k has segment id k + 1 and
the background :data:`PANOPTIC_BACKGROUND_ID`.

Coordinates: x to the right, y down, in pixels, the centre of the top-left pixel at (0.5, 0.5) (COCO).

CLI::

    python -m stages.toy.world --config config.yaml --out results/synthetic
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from stages.config import ConfigError, from_mapping, read_sections, schema_default
from stages.io.atomic import atomic_path

# The categories: each differs from the others in its silhouette *and* in its surface pattern, as real
# categories differ in outline and in texture (fur, stripes, print). At the toy model's input
# resolution (96 px, 12 px patches) a silhouette alone spans only a few patches and a 2-layer ViT
# trained on captions barely learns it; a pattern shows in every patch of the object.
SHAPES = ("circle", "square", "triangle", "cross")
# Surface of each category: stripes or checks alternating the object's colour with PATTERN_LIGHT in
# bands of PATTERN_PERIOD pixels (anchored at the object's centre), or solid colour.
PATTERNS: dict[str, str] = {"circle": "horizontal stripes", "square": "vertical stripes",
                            "triangle": "checks", "cross": "solid"}
PATTERN_PERIOD = 8
PATTERN_LIGHT = (245, 245, 245)
# Saturated object colours, all far from the muted background tones below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35), "green": (35, 160, 55), "blue": (30, 70, 215), "yellow": (245, 210, 25),
    "orange": (245, 125, 20), "purple": (130, 45, 170), "black": (20, 20, 20),
}
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150), "beige": (210, 198, 172), "pale blue": (172, 190, 208),
    "light grey": (196, 196, 196), "sand": (188, 172, 140),
}
BACKGROUND_KINDS = ("noise", "gradient")
NOISE_STD = 10.0
# Background clutter that no caption names: grey rectangles with the objects' kinds of pattern (stripes,
# checks), as many as CLUTTER_COUNT = [fewest, most]. Without it, an untrained model's attention peak
# (drawn to the only patterned things in the image) lands on an object most of the time.
CLUTTER_COUNT = (4, 7)
CLUTTER_HALF_SIZE = (0.08, 0.16)
CLUTTER_TONES = (105, 200)
# Radius (half the object's extent) as a fraction of the image's shorter side: the smallest object
# spans about 3 x 3 patches of the toy model's input.
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.24), "medium": (0.26, 0.30), "large": (0.32, 0.36)}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny"), "medium": ("",), "large": ("large", "big"),
}
MAX_OBJECTS = 3
# Every object keeps at least this share of its pixels, and this many pixels, visible.
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 24
PLACEMENT_TRIES = 20
ROTATION_RANGE = math.radians(20)
JPEG_QUALITY = 95
ID_PREFIX = "toy_"
SPLITS = ("train", "val", "test")
# Smallest allowed image side: there the smallest shape still covers more than MIN_VISIBLE_PIXELS,
# so the first object of a scene always fits and no scene is empty.
MIN_SIDE = 48
# Panoptic layout: object k of an image is segment k + 1, the background this id; the background's
# category follows the shapes' (ids 1..len(SHAPES)).
PANOPTIC_BACKGROUND_ID = 200
BACKGROUND_CATEGORY = "background"


@dataclass(frozen=True)
class SyntheticConfig:
    """The config's ``synthetic`` section: ``num_images`` images of split ``split`` whose sides lie
    in ``image_size`` = [smallest, largest] pixels, all drawn from ``seed``."""

    num_images: int = schema_default("synthetic", "num_images")
    seed: int = schema_default("synthetic", "seed")
    image_size: tuple[int, int] = schema_default("synthetic", "image_size")
    split: str = schema_default("synthetic", "split")

    def __post_init__(self) -> None:
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise ConfigError(f"synthetic.num_images must be a positive integer, got {self.num_images!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"synthetic.seed must be a non-negative integer, got {self.seed!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"synthetic.split must be one of {SPLITS}, got {self.split!r}")
        sizes = tuple(self.image_size)
        if (len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
                or not MIN_SIDE <= sizes[0] <= sizes[1]):
            raise ConfigError(f"synthetic.image_size must be [min_side, max_side] with "
                              f"{MIN_SIDE} <= min_side <= max_side, got {self.image_size!r}")


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of a named colour and size class, centred at (cx, cy) pixels, of radius
    ``radius`` pixels (half its extent), rotated by ``rotation`` radians (clockwise on screen)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float


@dataclass(frozen=True)
class Background:
    """``noise``: tone ``tones[0]`` plus Gaussian noise drawn from ``noise_seed``; ``gradient``: a
    linear blend from ``tones[0]`` to ``tones[1]`` along the direction ``angle`` (radians). Either
    kind carries grey patterned clutter drawn from ``noise_seed`` (:data:`CLUTTER_COUNT`)."""

    kind: str
    tones: tuple[str, str]
    angle: float
    noise_seed: int


@dataclass(frozen=True)
class Scene:
    """An image to draw: size in pixels, background, objects in painter's order (back to front)."""

    image_id: str
    width: int
    height: int
    background: Background
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`run` wrote the data set."""

    images: Path
    instances: Path
    mask_gt: Path
    caption_gt: Path
    refs: Path
    narratives: Path
    panoptic: Path
    panoptic_masks: Path


def output_paths(out_dir: str | os.PathLike, split: str = "val") -> SyntheticPaths:
    """Where :func:`run` writes split ``split`` of the data set under ``out_dir``."""
    out_dir = Path(out_dir)
    return SyntheticPaths(images=out_dir / "images", instances=out_dir / "instances.json",
                          mask_gt=out_dir / f"{split}_gcg_coco_mask_gt.json",
                          caption_gt=out_dir / f"{split}_gcg_coco_caption_gt.json",
                          refs=out_dir / "refs(unc).p", narratives=out_dir / f"png_coco_{split}.json",
                          panoptic=out_dir / f"panoptic_{split}.json",
                          panoptic_masks=out_dir / f"panoptic_{split}")


def toy_dataset_files(out_dir: str, split: str) -> dict[str, dict[str, str]]:
    """The data-set keys of the default config's toy data sets (``toy_instances``, ``toy_gcg``, ``toy_res``,
    ``toy_png``: files, folders and split) for split ``split`` of the world written under ``out_dir`` (a path
    as the config writes it, e.g. ``results/val/synthetic``); what an overlay moving the world elsewhere sets."""
    paths = output_paths(out_dir, split)
    images = str(paths.images)
    return {"toy_instances": {"images": images, "instances": str(paths.instances)},
            "toy_gcg": {"images": images, "mask_gt": str(paths.mask_gt), "caption_gt": str(paths.caption_gt)},
            "toy_res": {"images": images, "refs": str(paths.refs), "instances": str(paths.instances), "split": split},
            "toy_png": {"images": images, "narratives": str(paths.narratives), "panoptic": str(paths.panoptic),
                        "panoptic_masks": str(paths.panoptic_masks), "proposals_folder": str(paths.panoptic_masks)}}


def image_id_of(index: int, split: str = "val") -> str:
    """String id of image ``index`` of ``split``: "toy_val_000000", "toy_val_000001", ..."""
    return f"{ID_PREFIX}{split}_{index:06d}"


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image ``index`` of ``split``: everything of that image follows from it."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


@dataclass(frozen=True)
class Example:
    """One rendered image of the world: its scene, pixels uint8 (H, W, 3), one visible bool (H, W)
    mask per object (scene order), the caption and each object's phrase in it."""

    scene: Scene
    pixels: np.ndarray
    masks: list[np.ndarray]
    caption: str
    labels: list[str]

    def union_mask(self, *, shape: str | None = None, colour: str | None = None) -> np.ndarray:
        """Union of the visible masks of the objects of ``shape`` and/or ``colour`` (None: any),
        bool (H, W); all False when no object matches."""
        union = np.zeros((self.scene.height, self.scene.width), dtype=bool)
        for obj, mask in zip(self.scene.objects, self.masks):
            if shape in (None, obj.shape) and colour in (None, obj.colour):
                union |= mask
        return union


def make_example(seed: int, split: str, index: int, image_size: tuple[int, int]) -> Example:
    """Image ``index`` of ``split``, exactly as :func:`run` writes it (training code draws its
    examples here, in memory, from the train split)."""
    rng = scene_rng(seed, split, index)
    scene = generate_scene(rng, image_id_of(index, split), *image_size)
    pixels, masks = render_scene(scene)
    caption, labels = describe_scene(scene, rng)
    return Example(scene, pixels, masks, caption, labels)


def _unit_outline(shape: str) -> np.ndarray:
    """Outline of ``shape`` of radius 1 centred at the origin, (n, 2) float (x, y), y down."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        t = np.radians([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "cross":
        a, b = 0.3, 0.9
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                         [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_polygon(obj: ShapeObject) -> np.ndarray:
    """The object's outline in image pixels, (n, 2) float (x, y), COCO pixel convention."""
    cos, sin = math.cos(obj.rotation), math.sin(obj.rotation)
    rotation = np.array([[cos, sin], [-sin, cos]])
    return _unit_outline(obj.shape) @ rotation * obj.radius + np.array([obj.cx, obj.cy])


def shape_mask(obj: ShapeObject, width: int, height: int) -> np.ndarray:
    """The object's full (unoccluded) mask, bool (height, width)."""
    canvas = Image.new("L", (width, height), 0)
    # PIL puts pixel centres at integer coordinates; COCO at +0.5.
    vertices = [(float(x) - 0.5, float(y) - 0.5) for x, y in shape_polygon(obj)]
    ImageDraw.Draw(canvas).polygon(vertices, fill=1)
    return np.asarray(canvas, dtype=bool)


def visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when drawn in list order (later masks cover earlier ones)."""
    if not full_masks:
        return []
    owner = np.full(full_masks[0].shape, -1, dtype=np.int16)
    for index, mask in enumerate(full_masks):
        owner[mask] = index
    return [owner == index for index in range(len(full_masks))]


def _visible_enough(full_masks: list[np.ndarray]) -> bool:
    for full, visible in zip(full_masks, visible_masks(full_masks)):
        shown = int(visible.sum())
        if shown < MIN_VISIBLE_PIXELS or shown < MIN_VISIBLE_FRACTION * int(full.sum()):
            return False
    return True


def generate_scene(rng: np.random.Generator, image_id: str, min_side: int, max_side: int) -> Scene:
    """Draw a scene: sides in [min_side, max_side] (not square when min_side < max_side), a noise
    or gradient background, and 1-3 objects of distinct (shape, colour) pairs, each at least
    half visible."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    if width == height and min_side < max_side:
        height = height - 1 if height > min_side else height + 1
    tone_names = list(BACKGROUND_TONES)
    first, second = rng.choice(len(tone_names), size=2, replace=False)
    background = Background(kind=str(rng.choice(BACKGROUND_KINDS)),
                            tones=(tone_names[first], tone_names[second]),
                            angle=float(rng.uniform(0, 2 * np.pi)),
                            noise_seed=int(rng.integers(2**32)))

    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    chosen = rng.choice(len(pairs), size=wanted, replace=False)
    short_side = min(width, height)
    objects: list[ShapeObject] = []
    full_masks: list[np.ndarray] = []
    for pair_index in chosen:
        shape, colour = pairs[pair_index]
        size = str(rng.choice(list(SIZES)))
        low, high = SIZES[size]
        radius = float(rng.uniform(low, high)) * short_side
        rotation = 0.0 if shape == "circle" else float(rng.uniform(-ROTATION_RANGE, ROTATION_RANGE))
        for _ in range(PLACEMENT_TRIES):
            obj = ShapeObject(shape, colour, size, cx=float(rng.uniform(radius, width - radius)),
                              cy=float(rng.uniform(radius, height - radius)), radius=radius,
                              rotation=rotation)
            mask = shape_mask(obj, width, height)
            if _visible_enough(full_masks + [mask]):
                objects.append(obj)
                full_masks.append(mask)
                break
    return Scene(image_id, width, height, background, tuple(objects))


def render_background(background: Background, width: int, height: int) -> np.ndarray:
    """The background with its clutter, uint8 (height, width, 3) RGB."""
    first = np.array(BACKGROUND_TONES[background.tones[0]], dtype=np.float32)
    if background.kind == "noise":
        noise = np.random.default_rng(background.noise_seed).normal(0.0, NOISE_STD, size=(height, width, 1))
        pixels = first + noise.astype(np.float32)
    else:
        second = np.array(BACKGROUND_TONES[background.tones[1]], dtype=np.float32)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        along = (xs - width / 2) * math.cos(background.angle) + (ys - height / 2) * math.sin(background.angle)
        span = np.ptp(along) or 1.0
        weight = ((along - along.min()) / span)[..., None]
        pixels = first * (1 - weight) + second * weight
    pixels = _draw_clutter(pixels, np.random.default_rng([background.noise_seed, 1]))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_clutter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pixels`` (float32 (H, W, 3)) with :data:`CLUTTER_COUNT` grey patterned rectangles drawn on it
    (sides :data:`CLUTTER_HALF_SIZE` x 2 of the shorter image side, centred anywhere, possibly cut
    by the border; stripes or checks of :data:`PATTERN_PERIOD` px in the two :data:`CLUTTER_TONES`)."""
    height, width = pixels.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    short_side = min(width, height)
    for _ in range(int(rng.integers(CLUTTER_COUNT[0], CLUTTER_COUNT[1] + 1))):
        half_width, half_height = rng.uniform(*CLUTTER_HALF_SIZE, size=2) * short_side
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        inside = (np.abs(xs + 0.5 - cx) <= half_width) & (np.abs(ys + 0.5 - cy) <= half_height)
        rows = np.floor((ys + 0.5 - cy) / PATTERN_PERIOD).astype(np.int64) % 2 == 0
        columns = np.floor((xs + 0.5 - cx) / PATTERN_PERIOD).astype(np.int64) % 2 == 0
        dark = (rows, columns, rows == columns)[int(rng.integers(3))]
        pixels = np.where((inside & dark)[..., None], np.float32(CLUTTER_TONES[0]), pixels)
        pixels = np.where((inside & ~dark)[..., None], np.float32(CLUTTER_TONES[1]), pixels)
    return pixels


def surface_pattern(obj: ShapeObject, width: int, height: int) -> np.ndarray:
    """Where the object's surface shows its colour (True) rather than :data:`PATTERN_LIGHT` (False),
    bool (height, width), over the whole image (callers restrict it to the object's mask). Bands are
    :data:`PATTERN_PERIOD` pixels wide and anchored at the object's centre; see :data:`PATTERNS`."""
    ys, xs = np.mgrid[0:height, 0:width]
    rows = np.floor((ys + 0.5 - obj.cy) / PATTERN_PERIOD).astype(np.int64) % 2 == 0
    columns = np.floor((xs + 0.5 - obj.cx) / PATTERN_PERIOD).astype(np.int64) % 2 == 0
    pattern = PATTERNS[obj.shape]
    if pattern == "horizontal stripes":
        return rows
    if pattern == "vertical stripes":
        return columns
    if pattern == "checks":
        return rows == columns
    return np.ones((height, width), dtype=bool)


def render_scene(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rasterise ``scene``: the RGB image, uint8 (height, width, 3), and the visible mask of each
    object in ``scene.objects`` order, bool (height, width). An object's pixels take its colour where
    its :func:`surface_pattern` is True and :data:`PATTERN_LIGHT` elsewhere."""
    image = render_background(scene.background, scene.width, scene.height)
    full_masks = [shape_mask(obj, scene.width, scene.height) for obj in scene.objects]
    for obj, mask in zip(scene.objects, full_masks):
        coloured = surface_pattern(obj, scene.width, scene.height)
        image[mask & coloured] = COLOURS[obj.colour]
        image[mask & ~coloured] = PATTERN_LIGHT
    return image, visible_masks(full_masks)


def _noun_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    """"a small red circle", "an orange square", "a big blue cross" (lower case)."""
    size_word = str(rng.choice(SIZE_WORDS[obj.size]))
    words = " ".join(w for w in (size_word, obj.colour, obj.shape) if w)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` lies relative to ``b``: "above", "below", "to the left of", "to the right of"."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _region(obj: ShapeObject, scene: Scene) -> str:
    """Rough place of ``obj`` in the frame: "the top left corner", "the middle", "the bottom edge"..."""
    column = ("left", "", "right")[min(2, int(3 * obj.cx / scene.width))]
    row = ("top", "", "bottom")[min(2, int(3 * obj.cy / scene.height))]
    if row and column:
        return f"the {row} {column} corner"
    if row or column:
        return f"the {row or column} edge"
    return "the middle"


def _background_phrase(background: Background) -> str:
    if background.kind == "noise":
        return f"a speckled {background.tones[0]} background"
    return f"a background fading from {background.tones[0]} to {background.tones[1]}"


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def describe_scene(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A caption naming every object of ``scene`` once, and the phrase of each object
    (``labels[k]`` belongs to ``scene.objects[k]``) exactly as it is written in the caption.

    Objects are described in pairs in painter's order: a pair whose later object covers part of the
    earlier one is told as an occlusion, any other pair by its spatial relation; a lone object is
    placed in the frame or on the background.
    """
    phrases = [_noun_phrase(obj, rng) for obj in scene.objects]
    labels = list(phrases)
    sentences: list[str] = []
    for first in range(0, len(scene.objects), 2):
        second = first + 1
        a = scene.objects[first]
        if second == len(scene.objects):
            templates = [
                "{A} is drawn on {bg}.",
                "There is {a} near {region}.",
                "{A} can be seen in {region}.",
            ] if len(scene.objects) > 1 else [
                "The image shows {a} on {bg}.",
                "{A} stands alone on {bg}.",
                "A single shape, {a}, sits near {region}.",
            ]
            template = str(rng.choice(templates))
            fields = {"bg": _background_phrase(scene.background), "region": _region(a, scene)}
            sentence = template.format(A=_capitalised(phrases[first]), a=phrases[first], **fields)
            labels[first] = _capitalised(phrases[first]) if template.startswith("{A}") else phrases[first]
            sentences.append(sentence)
            continue
        b = scene.objects[second]
        overlap = np.logical_and(shape_mask(a, scene.width, scene.height),
                                 shape_mask(b, scene.width, scene.height)).any()
        if overlap:
            templates = ["{A} is partly hidden behind {b}.", "{B} covers part of {a}.",
                         "{A} is tucked behind {b}."]
        else:
            templates = ["{A} sits {rel} {b}.", "{A} is {rel} {b}.", "{A} appears {rel} {b}."]
        template = str(rng.choice(templates))
        sentence = template.format(A=_capitalised(phrases[first]), a=phrases[first],
                                   B=_capitalised(phrases[second]), b=phrases[second], rel=_relation(a, b))
        if template.startswith("{A}"):
            labels[first] = _capitalised(phrases[first])
        else:
            labels[second] = _capitalised(phrases[second])
        sentences.append(sentence)
    return " ".join(sentences), labels


def _encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool (H, W) mask, with its area and bbox [x, y, w, h]."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def referring_expression(label: str) -> str:
    """An object's phrase as a RefCOCO-style expression: lower case, without its article ("A small red
    circle" -> "small red circle")."""
    words = label.lower().split(" ")
    return " ".join(words[1:] if words[0] in ("a", "an") else words)


def narrative_segments(caption: str, labels: list[str], background: Background) -> list[dict[str, Any]]:
    """The caption cut into PNG utterances (``{utterance, segment_ids, plural, noun}``, in caption
    order): each object's label is a segment with its panoptic id (object k: ``k + 1``), the
    background's phrase (when the caption names it) one with :data:`PANOPTIC_BACKGROUND_ID`, and the
    text between them (stripped; empty stretches dropped) segments without ids."""
    spans = [(caption.index(label), label, [str(k + 1)]) for k, label in enumerate(labels)]
    phrase = _background_phrase(background)
    if phrase in caption:
        spans.append((caption.index(phrase), phrase, [str(PANOPTIC_BACKGROUND_ID)]))
    segments, position = [], 0
    for start, text, ids in sorted(spans):
        for piece, piece_ids in ((caption[position:start].strip(), []), (text, ids)):
            if piece:
                segments.append({"utterance": piece, "segment_ids": piece_ids, "plural": False,
                                 "noun": bool(piece_ids)})
        position = start + len(text)
    if caption[position:].strip():
        segments.append({"utterance": caption[position:].strip(), "segment_ids": [], "plural": False,
                         "noun": False})
    return segments


def panoptic_ids(masks: list[np.ndarray]) -> np.ndarray:
    """Segment ids of an image, int64 (H, W): object k's visible pixels ``k + 1``, the rest
    :data:`PANOPTIC_BACKGROUND_ID`."""
    ids = np.full(masks[0].shape, PANOPTIC_BACKGROUND_ID, dtype=np.int64)
    for k, mask in enumerate(masks):
        ids[mask] = k + 1
    return ids


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def _write_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def run(cfg: SyntheticConfig, out_dir: str | os.PathLike) -> SyntheticPaths:
    """Generate ``cfg.num_images`` images and write them with both ground-truth layouts under
    ``out_dir`` (see the module docstring); every file appears whole or not at all."""
    paths = output_paths(out_dir, cfg.split)
    instance_images, instance_anns, gcg_images, gcg_anns, captions = [], [], [], [], []
    refs, narratives, panoptic_anns = [], [], []
    category_ids = {shape: index + 1 for index, shape in enumerate(SHAPES)}
    background_category = len(SHAPES) + 1
    with atomic_path(paths.images) as images_tmp, atomic_path(paths.panoptic_masks) as panoptic_tmp:
        images_tmp.mkdir()
        panoptic_tmp.mkdir()
        for index in range(cfg.num_images):
            example = make_example(cfg.seed, cfg.split, index, cfg.image_size)
            scene, masks, caption, labels = example.scene, example.masks, example.caption, example.labels
            image_id = scene.image_id
            pixels = example.pixels
            file_name = f"{image_id}.jpg"
            Image.fromarray(pixels).save(images_tmp / file_name, quality=JPEG_QUALITY, subsampling=0)

            size = {"width": scene.width, "height": scene.height}
            instance_images.append({"id": index + 1, "file_name": file_name, **size})
            gcg_images.append({"id": image_id, "file_name": file_name, **size})
            captions.append({"id": index + 1, "image_id": image_id, "caption": caption, "labels": labels})
            segments_info = []
            for k, (obj, mask, label) in enumerate(zip(scene.objects, masks, labels)):
                encoded = _encode_mask(mask)
                ann_id = len(instance_anns) + 1
                instance_anns.append({"id": ann_id, "image_id": index + 1,
                                      "category_id": category_ids[obj.shape], "iscrowd": 0, **encoded})
                gcg_anns.append({"id": len(gcg_anns) + 1, "image_id": image_id, "category_id": 1,
                                 "iscrowd": 0, **encoded})
                expression = referring_expression(label)
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": index + 1,
                             "category_id": category_ids[obj.shape], "split": cfg.split,
                             "file_name": f"{image_id}_{ann_id}.jpg", "sent_ids": [ann_id],
                             "sentences": [{"sent_id": ann_id, "sent": expression, "raw": expression,
                                            "tokens": expression.split(" ")}]})
                segments_info.append({"id": k + 1, "category_id": category_ids[obj.shape], "iscrowd": 0,
                                      "area": encoded["area"], "bbox": encoded["bbox"]})
            ids = panoptic_ids(masks)
            background = _encode_mask(ids == PANOPTIC_BACKGROUND_ID)
            segments_info.append({"id": PANOPTIC_BACKGROUND_ID, "category_id": background_category, "iscrowd": 0,
                                  "area": background["area"], "bbox": background["bbox"]})
            Image.fromarray(_id2rgb(ids)).save(panoptic_tmp / f"{image_id}.png")
            panoptic_anns.append({"image_id": index + 1, "file_name": f"{image_id}.png",
                                  "segments_info": segments_info})
            narratives.append({"image_id": str(index + 1), "caption": caption,
                               "segments": narrative_segments(caption, labels, scene.background)})

    categories = [{"id": cid, "name": shape, "supercategory": "shape"} for shape, cid in category_ids.items()]
    _write_json({"images": instance_images, "annotations": instance_anns, "categories": categories},
                paths.instances)
    _write_json({"images": gcg_images, "annotations": gcg_anns,
                 "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}, paths.mask_gt)
    _write_json({"images": gcg_images, "annotations": captions}, paths.caption_gt)
    with atomic_path(paths.refs) as tmp:
        tmp.write_bytes(pickle.dumps(refs, protocol=2))        # as RefCOCO's refs(unc).p
    _write_json(narratives, paths.narratives)
    _write_json({"images": instance_images, "annotations": panoptic_anns,
                 "categories": [{**category, "isthing": 1} for category in categories]
                 + [{"id": background_category, "name": BACKGROUND_CATEGORY, "supercategory": "stuff",
                     "isthing": 0}]}, paths.panoptic)
    return paths


def list_captions(out_dir: str | os.PathLike, split: str = "val") -> list[str]:
    """Every caption of split ``split`` written under ``out_dir``, in image order."""
    with output_paths(out_dir, split).caption_gt.open(encoding="utf-8") as f:
        return [ann["caption"] for ann in json.load(f)["annotations"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.toy.world", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the pipeline's config.yaml")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the data set into")
    args = parser.parse_args(argv)
    config = read_sections(args.config)
    run(from_mapping(SyntheticConfig, config.get("synthetic"), where="synthetic"), args.out)


if __name__ == "__main__":
    main()
