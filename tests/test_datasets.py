"""Data set configs, ground-truth loaders (valid and broken files) and image listings."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from stages.config import ConfigError
from stages.datasets import (
    DatasetConfig,
    DatasetError,
    dataset_config,
    dataset_configs,
    gt_categories,
    list_image_folder,
    list_samples,
    load_coco_instances,
    load_gcg,
    unusable_images,
)

REPO = Path(__file__).resolve().parents[1]
RLE = {"size": [4, 5], "counts": "03000"}


def coco_instances() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "ten.jpg", "width": 5, "height": 4},
            {"id": 2, "file_name": "two.jpg", "width": 6, "height": 3},
            {"id": 1, "file_name": "one.png", "width": 7, "height": 2},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 3]]},
            {"id": 2, "image_id": 10, "category_id": 1, "segmentation": RLE},
            {"id": 3, "image_id": 10, "category_id": 3, "segmentation": RLE},
            {"id": 4, "image_id": 2, "category_id": 1, "segmentation": RLE},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }


def gcg_mask_gt() -> dict:
    return {
        "images": [{"id": "b_img", "width": 5, "height": 4}, {"id": "a_img", "width": 8, "height": 6}],
        "annotations": [
            {"id": 1, "image_id": "a_img", "category_id": 1, "segmentation": RLE},
            {"id": 2, "image_id": "b_img", "category_id": 1, "segmentation": RLE},
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


def gcg_caption_gt() -> dict:
    return {"annotations": [
        {"image_id": "a_img", "caption": "A dog runs.", "labels": ["A dog"]},
        {"image_id": "b_img", "caption": "A cat sleeps.", "labels": ["A cat"]},
    ]}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _drop(key, *path):
    """Mutation removing field ``key`` from the entry at ``path`` (e.g. ("images", 0))."""
    def mutate(data):
        target = data
        for step in path:
            target = target[step]
        del target[key]
    return mutate


def _set(value, key, *path):
    def mutate(data):
        target = data
        for step in path:
            target = target[step]
        target[key] = value
    return mutate


INSTANCE_CASES = [
    (_drop("images"), "missing top-level field 'images'"),
    (_drop("categories"), "missing top-level field 'categories'"),
    (_set({"a": 1}, "images"), "field 'images' must be a list"),
    (_set("x", 1, "images"), "images[1] must be an object"),
    (_drop("file_name", "images", 1), "images[1] has no field 'file_name'"),
    (_drop("width", "images", 0), "images[0] has no field 'width'"),
    (_drop("height", "images", 2), "images[2] has no field 'height'"),
    (_set(0, "width", "images", 0), "images[0].width must be a positive integer"),
    (_set("5", "height", "images", 0), "images[0].height must be a positive integer"),
    (_set(True, "width", "images", 1), "images[1].width must be a positive integer, got True"),
    (_set([10], "id", "images", 0), "images[0].id must be a number or a string, got [10]"),
    (_set(1, "id", "categories", 1), "categories[1] repeats id 1"),
    (_set("x", "annotations"), "field 'annotations' must be a list, found str"),
    (_set(None, 0, "annotations"), "annotations[0] must be an object, found NoneType"),
    (_drop("id", "categories", 0), "categories[0] has no field 'id'"),
    (_drop("image_id", "annotations", 2), "annotations[2] has no field 'image_id'"),
    (_drop("category_id", "annotations", 0), "annotations[0] has no field 'category_id'"),
    (_drop("name", "categories", 1), "categories[1] has no field 'name'"),
    (_set(99, "image_id", "annotations", 1), "annotations[1].image_id 99 is not in images"),
    (_set([10], "image_id", "annotations", 1), "annotations[1].image_id [10] is not in images"),
    (_set(7, "category_id", "annotations", 1), "annotations[1].category_id 7 is not in categories"),
    (_set("polygon", "segmentation", "annotations", 0), "annotations[0].segmentation must be a polygon list"),
    (_set({"size": [4, 5]}, "segmentation", "annotations", 1),
     "annotations[1].segmentation (RLE) has no field 'counts'"),
    (_set({"counts": "03000"}, "segmentation", "annotations", 2),
     "annotations[2].segmentation (RLE) has no field 'size'"),
]


@pytest.mark.parametrize(("mutate", "message"), INSTANCE_CASES)
def test_coco_instances_errors_name_file_and_field(tmp_path, mutate, message):
    data = coco_instances()
    mutate(data)
    path = write_json(tmp_path / "instances.json", data)
    with pytest.raises(DatasetError) as info:
        load_coco_instances(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, "ground-truth file not found"),
    ("folder", "ground-truth file not found"),
    (b"{not json", "is not valid JSON"),
    (b'{"images": "\xff"}', "is not valid JSON"),
    (b"[1, 2]", "expected a JSON object at the top level, found list"),
])
def test_unparsable_ground_truth_is_a_dataset_error(tmp_path, content, message):
    """``content``: the file's bytes; None: no file; "folder": a folder in its place."""
    path = tmp_path / "instances.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_coco_instances(path)


GCG_CASES = [
    ("mask", _drop("images"), "missing top-level field 'images'"),
    ("mask", _drop("width", "images", 1), "images[1] has no field 'width'"),
    ("mask", _set(3, "id", "images", 0), "images[0].id must be a string"),
    ("mask", _drop("segmentation", "annotations", 0), "annotations[0] has no field 'segmentation'"),
    ("mask", _drop("category_id", "annotations", 1), "annotations[1] has no field 'category_id'"),
    ("mask", _set(2, "category_id", "annotations", 1), "annotations[1].category_id must be 1"),
    ("mask", _set("zzz", "image_id", "annotations", 0), "annotations[0].image_id 'zzz' is not in images"),
    ("mask", _set("b_img", "id", "images", 1), "images[1] repeats id 'b_img'"),
    ("mask", _set(0, "height", "images", 1), "images[1].height must be a positive integer, got 0"),
    ("mask", _set(None, "segmentation", "annotations", 1),
     "annotations[1].segmentation must be a polygon list or an RLE object, found NoneType"),
    ("caption", _set(["a_img"], 0, "annotations"), "annotations[0] must be an object, found list"),
    ("caption", _drop("annotations"), "missing top-level field 'annotations'"),
    ("caption", _drop("labels", "annotations", 1), "annotations[1] has no field 'labels'"),
    ("caption", _drop("caption", "annotations", 0), "annotations[0] has no field 'caption'"),
    ("caption", _drop("image_id", "annotations", 0), "annotations[0] has no field 'image_id'"),
    ("caption", _set("A dog", "labels", "annotations", 0), "annotations[0].labels must be a list of strings"),
    ("caption", _set(["A dog", 3], "labels", "annotations", 0),
     "annotations[0].labels must be a list of strings"),
    ("caption", _set(None, "caption", "annotations", 1), "annotations[1].caption must be a string"),
    ("caption", _set("c_img", "image_id", "annotations", 1),
     "annotations[1].image_id 'c_img' is not in the images of"),
]


@pytest.mark.parametrize(("which", "mutate", "message"), GCG_CASES)
def test_gcg_errors_name_file_and_field(tmp_path, which, mutate, message):
    mask, caption = gcg_mask_gt(), gcg_caption_gt()
    mutate(mask if which == "mask" else caption)
    mask_path = write_json(tmp_path / "val_gcg_coco_mask_gt.json", mask)
    caption_path = write_json(tmp_path / "val_gcg_coco_caption_gt.json", caption)
    with pytest.raises(DatasetError) as info:
        load_gcg(mask_path, caption_path)
    assert str(mask_path if which == "mask" else caption_path) in str(info.value)
    assert message in str(info.value)


def test_valid_files_load_unchanged(tmp_path):
    data = coco_instances()
    data["annotations"][1]["id"] = 1  # annotation ids are not read here (only the evaluators need them)
    del data["annotations"][2]["id"]
    coco = load_coco_instances(write_json(tmp_path / "i.json", data))
    assert (coco.images, coco.annotations, coco.categories) == (data["images"], data["annotations"],
                                                                data["categories"])
    gcg = load_gcg(write_json(tmp_path / "m.json", gcg_mask_gt()),
                   write_json(tmp_path / "c.json", gcg_caption_gt()))
    assert [c["labels"] for c in gcg.captions] == [["A dog"], ["A cat"]]
    assert len(gcg.annotations) == 2


def test_instance_listing_sorted_by_integer_id_with_declared_sizes(tmp_path):
    cfg = DatasetConfig("coco", "instance_seg", images=str(tmp_path / "imgs"),
                        instances=str(write_json(tmp_path / "i.json", coco_instances())))
    entries = list_samples(cfg)
    assert [e.image_id for e in entries] == ["1", "2", "10"]
    assert [e.file for e in entries] == [tmp_path / "imgs" / n for n in ("one.png", "two.jpg", "ten.jpg")]
    assert [(e.width, e.height) for e in entries] == [(7, 2), (6, 3), (5, 4)]


def test_repeated_image_id_is_one_entry_with_an_error_naming_it(tmp_path):
    """An image id listed twice is one image of the listing (the first entry's file), with an error
    naming the id and both entries: its annotations cannot be told apart. The other images are
    listed as usual."""
    data = coco_instances()
    data["images"].append({"id": 2, "file_name": "two_again.jpg", "width": 6, "height": 3})
    cfg = DatasetConfig("coco", "instance_seg", images="imgs",
                        instances=str(write_json(tmp_path / "i.json", data)))
    entries = {e.image_id: e for e in list_samples(cfg)}
    assert list(entries) == ["1", "2", "10"]
    assert entries["2"].file == Path("imgs/two.jpg")
    assert entries["2"].error == ("image id 2 is listed 2 times in the ground truth (images[1] 'two.jpg', "
                                  "images[3] 'two_again.jpg'): its annotations cannot be told apart")
    assert entries["1"].error is None and entries["10"].error is None


@pytest.mark.parametrize("segmentation", ["missing", None])
def test_annotation_without_segmentation_makes_its_image_an_error(tmp_path, segmentation):
    data = coco_instances()
    if segmentation == "missing":
        del data["annotations"][3]["segmentation"]
    else:
        data["annotations"][3]["segmentation"] = None
    cfg = DatasetConfig("coco", "instance_seg", images="imgs",
                        instances=str(write_json(tmp_path / "i.json", data)))
    errors = {e.image_id: e.error for e in list_samples(cfg)}
    assert errors == {"1": None, "2": "annotations[3] (id 4) of this image has no segmentation: no "
                                       "ground-truth mask to evaluate against", "10": None}


def test_unusable_images_compares_ids_as_text():
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": "7", "file_name": "b.jpg"}, {"id": 8, "file_name": "c.jpg"}]
    annotations = [{"id": 1, "image_id": 8, "segmentation": [[0, 0, 1, 0, 1, 1]]}]
    assert list(unusable_images(images, annotations)) == ["7"]


def test_gcg_listing_uses_id_dot_jpg(tmp_path):
    cfg = DatasetConfig("g", "gcg", images="data/imgs",
                        mask_gt=str(write_json(tmp_path / "m.json", gcg_mask_gt())),
                        caption_gt=str(write_json(tmp_path / "c.json", gcg_caption_gt())))
    entries = list_samples(cfg)
    assert [e.image_id for e in entries] == ["a_img", "b_img"]
    assert [str(e.file) for e in entries] == ["data/imgs/a_img.jpg", "data/imgs/b_img.jpg"]
    assert [(e.width, e.height) for e in entries] == [(8, 6), (5, 4)]


def test_image_folder_listing(tmp_path):
    for name in ["b.JPG", "a.png", "c.tiff", "d.webp", "e.jpeg", "f.bmp", "g.tif", "notes.txt", "h.gif"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    entries = list_samples(DatasetConfig("f", "images", images=str(tmp_path)))
    assert [e.image_id for e in entries] == ["a", "b", "c", "d", "e", "f", "g"]
    assert entries[1].file == tmp_path / "b.JPG"
    assert all(e.width is None and e.height is None for e in entries)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="image folder not found"):
        list_image_folder(tmp_path / "absent")
    for name in ("x.jpg", "x.png", "y.png"):
        (tmp_path / name).write_bytes(b"")
    entries = list_image_folder(tmp_path)
    assert [(e.image_id, e.file.name) for e in entries] == [("x", "x.jpg"), ("y", "y.png")]
    assert entries[0].error == f"2 files of {tmp_path} would have image id 'x' (x.jpg, x.png): rename all but one"
    assert entries[1].error is None


def test_gt_categories_per_image(tmp_path):
    cfg = DatasetConfig("coco", "instance_seg", images="imgs",
                        instances=str(write_json(tmp_path / "i.json", coco_instances())))
    assert gt_categories(cfg) == {"10": [(1, "person"), (3, "car")], "2": [(1, "person")], "1": []}
    with pytest.raises(DatasetError, match="only for instance_seg"):
        gt_categories(DatasetConfig("f", "images", images="imgs"))


def test_config_yaml_datasets_build():
    section = yaml.safe_load((REPO / "config.yaml").read_text())["datasets"]
    configs = dataset_configs(section)
    assert set(configs) == set(section)
    for name, cfg in configs.items():
        assert cfg.name == name and cfg.max_pixels == 50_000_000
    assert configs["toy_gcg"].question == section["toy_gcg"]["question"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"task": "detection", "images": "x"}, "task is 'detection'"),
    ({"task": "instance_seg", "images": "x"}, "needs the key 'instances'"),
    ({"task": "gcg", "images": "x", "mask_gt": "m"}, "needs the key 'caption_gt'"),
    ({"task": "images", "images": "x", "instances": "i"}, "instances is not used by task 'images'"),
    ({"task": "images", "images": "x", "max_pixels": 0}, "max_pixels must be a positive integer"),
    ({"task": "images", "images": "x", "colour": "red"}, "unknown key(s) ['colour']"),
    ({"task": "images"}, "missing 1 required positional argument: 'images'"),
    ({"task": "images", "images": "x", "name": "other"}, "'name' is not allowed"),
])
def test_bad_dataset_entries(entry, message):
    with pytest.raises(ConfigError) as info:
        dataset_config("d", copy.deepcopy(entry))
    assert message in str(info.value)
    assert "datasets.d" in str(info.value)
