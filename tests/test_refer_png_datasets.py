"""Referring expression segmentation (res) and panoptic narrative grounding (png) data sets: samples,
error samples, ground-truth masks, malformed files, config keys, and the Co-DETR proposals converter.

Fixtures are written in the official layouts: a RefCOCO ``refs(unc).p`` pickled with protocol 2 and
an ``instances.json`` with polygon annotations; a PNG narratives file, a COCO panoptic file and its
RGB-encoded id PNGs."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from test_safe_pickle import py2_pickle

from stages import convert_proposals
from stages.config import ConfigError
from stages.datasets import (
    DatasetConfig,
    DatasetError,
    dataset_config,
    list_samples,
    load_png_ground_truth,
    load_refer_ground_truth,
    read_panoptic_ids,
    rgb2id,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# res fixtures. Image 581857 is 8 x 6 (width x height), image 2 is 5 x 4. pycocotools fills the
# pixels (x, y) with x0 <= x < x1, y0 <= y < y1 of an integer rectangle polygon.

RECT_A = [0, 0, 4, 0, 4, 3, 0, 3]          # columns 0-3, rows 0-2: 12 pixels
RECT_B = [5, 3, 8, 3, 8, 6, 5, 6]          # columns 5-7, rows 3-5: 9 pixels, apart from RECT_A
RECT_C = [2, 0, 6, 0, 6, 3, 2, 3]          # columns 2-5, rows 0-2: 12 pixels, 6 shared with RECT_A


def ref(ref_id, ann_id, image_id, split, *sentences):
    """A ref as the RefCOCO pickles hold it; ``sentences``: (sent_id, sent) pairs."""
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sent_ids": [sent_id for sent_id, _ in sentences],
            "sentences": [{"tokens": sent.split(), "raw": sent.capitalize(), "sent_id": sent_id, "sent": sent}
                          for sent_id, sent in sentences]}


def refer_refs():
    return [
        ref(100, 11, 581857, "val", (7, "left man"), (3, "man on left")),
        ref(101, 12, 581857, "testA", (8, "right dog")),
        ref(5, 13, 2, "val", (9, "big cat")),
        ref(102, 999, 2, "val", (10, "ghost"), (11, "no annotation")),     # ann_id not in instances
        ref(103, 14, 2, "val", (12, "no segmentation")),                   # annotation without segmentation
        ref(104, 13, 77, "val", (13, "no image")),                          # image_id not in instances
        ref(105, 11, 2, "val", (14, "wrong image")),                        # annotation of another image
        ref(106, 15, 581857, "testB", (15, "degenerate")),
    ]


def refer_instances():
    return {
        "images": [
            {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 8, "height": 6},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 5, "height": 4},
        ],
        "annotations": [
            {"id": 11, "image_id": 581857, "category_id": 1, "segmentation": [RECT_A, RECT_B],
             "bbox": [0, 0, 8, 6], "area": 21.0, "iscrowd": 0},
            {"id": 12, "image_id": 581857, "category_id": 1, "segmentation": [RECT_A, RECT_C],
             "bbox": [0, 0, 6, 3], "area": 18.0, "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 2,
             "segmentation": {"size": [4, 5], "counts": [1, 2, 2, 2, 13]}, "area": 4, "iscrowd": 1},
            {"id": 14, "image_id": 2, "category_id": 2, "segmentation": None, "area": 0, "iscrowd": 0},
            # a 2-point polygon encloses nothing (pycocotools would read a first 4-number polygon as a box)
            {"id": 15, "image_id": 581857, "category_id": 2, "segmentation": [[0, 0, 2, 0], RECT_B],
             "area": 9, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cat"}],
    }


def write_refs(path: Path, refs) -> Path:
    with path.open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    return path


def res_config(tmp_path, refs=None, instances=None, split="val") -> DatasetConfig:
    folder = tmp_path / "refcoco"
    folder.mkdir(exist_ok=True)
    return DatasetConfig(
        "refcoco_val", "res", images="coco/train2014", split=split,
        refs=str(write_refs(folder / "refs(unc).p", refer_refs() if refs is None else refs)),
        instances=str(write_json(folder / "instances.json",
                                 refer_instances() if instances is None else instances)))


def decoded(rle) -> np.ndarray:
    return mask_utils.decode(rle).astype(bool)


def test_res_samples_one_per_sentence_of_the_split_in_file_order(tmp_path):
    samples = list_samples(res_config(tmp_path))
    assert [s.sample_id for s in samples] == ["100-7", "100-3", "5-9", "102-10", "102-11", "103-12", "104-13",
                                              "105-14"]
    first = samples[0]
    assert (first.image_id, first.expression, first.forced_answer) == ("581857", "left man", None)
    # the image file is the instances.json image's, not the ref's file_name
    assert first.file == Path("coco/train2014/COCO_train2014_000000581857.jpg")
    assert (first.width, first.height, first.error) == (8, 6, None)
    assert [s.expression for s in samples[1:3]] == ["man on left", "big cat"]
    assert samples[2].file == Path("coco/train2014/COCO_train2014_000000000002.jpg")
    test_a = list_samples(res_config(tmp_path, split="testA"))
    assert [(s.sample_id, s.expression) for s in test_a] == [("101-8", "right dog")]


def test_res_refs_without_usable_ground_truth_are_error_samples(tmp_path):
    errors = {s.sample_id: s.error for s in list_samples(res_config(tmp_path))}
    assert errors["100-7"] is None and errors["5-9"] is None
    assert errors["102-10"] == errors["102-11"] == \
        "ref 102: its ann_id 999 is not among the annotations of instances.json"
    assert errors["103-12"] == ("ref 103: its annotation 14 has no segmentation: no ground-truth mask to "
                                "evaluate against")
    assert errors["104-13"] == "ref 104: its image_id 77 is not among the images of instances.json"
    assert errors["105-14"] == "ref 105: its annotation 11 belongs to image 581857, not to its image 2"
    missing_image = next(s for s in list_samples(res_config(tmp_path)) if s.sample_id == "104-13")
    assert (missing_image.image_id, missing_image.file, missing_image.width) == ("77", Path("coco/train2014"),
                                                                                 None)


def test_res_ground_truth_masks(tmp_path):
    targets = load_refer_ground_truth(res_config(tmp_path))
    assert set(targets) == {"100-7", "100-3", "5-9"}                   # the samples without error
    target = targets["100-7"]
    assert (target.image_id, target.ann_id, target.height, target.width) == ("581857", 11, 6, 8)
    rle = target.rle()
    assert rle["size"] == [6, 8] and isinstance(rle["counts"], str)
    mask = decoded(rle)
    assert mask.shape == (6, 8) and mask.sum() == 12 + 9               # both polygons, merged
    assert mask[0:3, 0:4].all() and mask[3:6, 5:8].all()
    assert mask_utils.area(rle) == 21
    assert decoded(targets["5-9"].rle()).sum() == 4                     # an uncompressed RLE, compressed
    assert decoded(targets["100-3"].rle()).sum() == 21

    overlap = load_refer_ground_truth(res_config(tmp_path, split="testA"))["101-8"]
    assert decoded(overlap.rle()).sum() == 12 + 12 - 6                  # union, not sum
    degenerate = load_refer_ground_truth(res_config(tmp_path, split="testB"))["106-15"]
    assert decoded(degenerate.rle()).sum() == 9


@pytest.mark.parametrize("polygons", [[[0, 0, 2, 0]], []])
def test_res_compressed_rle_and_empty_polygon_lists(tmp_path, polygons):
    """A compressed RLE is kept; a polygon list without a polygon of 3 points is an empty mask, an
    evaluated sample (only a missing or null segmentation makes an error sample)."""
    instances = refer_instances()
    compressed = mask_utils.encode(np.asfortranarray(np.eye(6, 8, dtype=np.uint8)))
    instances["annotations"][0]["segmentation"] = {"size": [6, 8], "counts": compressed["counts"].decode()}
    instances["annotations"][4]["segmentation"] = polygons
    targets = load_refer_ground_truth(res_config(tmp_path, instances=instances))
    assert decoded(targets["100-7"].rle()).sum() == 6
    cfg = res_config(tmp_path, instances=instances, split="testB")
    assert [s.error for s in list_samples(cfg)] == [None]
    empty = load_refer_ground_truth(cfg)["106-15"].rle()
    assert empty["size"] == [6, 8] and isinstance(empty["counts"], str) and mask_utils.area(empty) == 0


def _set_ref(i, key, value):
    def mutate(refs):
        refs[i][key] = value
        return refs
    return mutate


def _del_ref(i, key):
    def mutate(refs):
        del refs[i][key]
        return refs
    return mutate


def _set_sentence(i, j, key, value):
    def mutate(refs):
        if value is None:
            del refs[i]["sentences"][j][key]
        else:
            refs[i]["sentences"][j][key] = value
        return refs
    return mutate


REFS_CASES = [
    (lambda refs: {"refs": refs}, "expected a list of refs at the top level, found dict"),
    (lambda refs: [*refs[:2], "ref", *refs[3:]], "refs[2] must be a dict, found str"),
    (_del_ref(1, "sentences"), "refs[1] has no field 'sentences'"),
    (_del_ref(0, "split"), "refs[0] has no field 'split'"),
    (_set_ref(0, "ann_id", "11"), "refs[0].ann_id must be an integer, got '11'"),
    (_set_ref(3, "image_id", None), "refs[3].image_id must be an integer, got None"),
    (_set_ref(2, "sentences", "big cat"), "refs[2].sentences must be a list"),
    (_set_sentence(0, 1, "sent", None), "refs[0].sentences[1] has no field 'sent'"),
    (_set_sentence(0, 0, "sent_id", 7.0), "refs[0].sentences[0].sent_id must be an integer"),
    (_set_sentence(0, 1, "sent_id", 7),
     "refs[0].sentences[1] has the sample id '100-7' (ref_id-sent_id) of refs[0].sentences[0]"),
]


@pytest.mark.parametrize(("mutate", "message"), REFS_CASES)
def test_malformed_refs_name_file_and_entry(tmp_path, mutate, message):
    cfg = res_config(tmp_path, refs=mutate(refer_refs()))
    with pytest.raises(DatasetError) as info:
        list_samples(cfg)
    assert f"RefCOCO refs file {cfg.refs}" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["annotations"][0].__delitem__("id"), "annotations[0] has no field 'id'"),
    (lambda d: d["annotations"][1].update(id=11), "annotations[1] repeats id 11"),
    (lambda d: d["images"][1].update(id=581857), "images[1] repeats id 581857"),
    (lambda d: d["images"][0].update(width=0), "images[0].width must be a positive integer"),
    (lambda d: d["annotations"][0].update(segmentation=[RECT_A, [0, 0, 1]]),
     "annotations[0].segmentation[1] must be a list of numbers x0, y0, x1, y1, ... (an even count)"),
    (lambda d: d["annotations"][2].update(segmentation={"size": [5, 4], "counts": "x"}),
     "annotations[2].segmentation has size [5, 4]; its image is [4, 5]"),
])
def test_malformed_instances_name_file_and_entry(tmp_path, mutate, message):
    instances = refer_instances()
    mutate(instances)
    cfg = res_config(tmp_path, instances=instances)
    with pytest.raises(DatasetError) as info:
        list_samples(cfg)
    assert f"RefCOCO instances file {cfg.instances}" in str(info.value)
    assert message in str(info.value)


def test_res_unknown_split_lists_the_files_splits(tmp_path):
    with pytest.raises(DatasetError, match=r"no ref has split 'testa' \(datasets.refcoco_val.split\); its "
                                           r"splits: \['testA', 'testB', 'val'\]"):
        list_samples(res_config(tmp_path, split="testa"))


def test_res_refs_pickle_is_never_run(tmp_path):
    class RunsCommand:
        def __init__(self, command):
            self.command = command

        def __reduce__(self):
            return os.system, (self.command,)

    marker = tmp_path / "pwned"
    cfg = res_config(tmp_path, refs=[*refer_refs(), RunsCommand(f"touch {marker}")])
    with pytest.raises(DatasetError, match=re.escape(f"RefCOCO refs {cfg.refs}: refused to load the global "
                                                     f"{os.system.__module__}.system")):
        list_samples(cfg)
    assert not marker.exists()
    Path(cfg.refs).write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="is not a valid pickle"):
        list_samples(cfg)
    Path(cfg.refs).unlink()
    with pytest.raises(DatasetError, match="RefCOCO refs file not found"):
        list_samples(cfg)


def test_python2_refs_with_non_ascii_sentences(tmp_path):
    """A refs file as Python 2 wrote it: str fields are Python 2 str (bytes, decoded as UTF-8), a
    non-ASCII sentence may be unicode."""
    refs = [{b"ref_id": 1, b"ann_id": 11, b"image_id": 581857, b"split": b"val",
             b"sentences": [{b"sent_id": 1, b"sent": "caf\u00e9 table".encode()},
                            {b"sent_id": 2, b"sent": "na\u00efve man"}]}]
    cfg = res_config(tmp_path)
    Path(cfg.refs).write_bytes(py2_pickle(refs))
    assert [(s.sample_id, s.expression) for s in list_samples(cfg)] == [("1-1", "caf\u00e9 table"),
                                                                         ("1-2", "na\u00efve man")]


# ------------------------------------------------------------------------------------------------
# png fixtures. Image 139 is 6 x 4 (width x height), image 285 is 5 x 3; segment ids chosen to use
# all three channels of the PNG (id = R + 256 G + 256^2 B).

PERSON_A = 3 + 256 * 2 + 256 * 256 * 1     # 66051, category 1 (thing)
SKY = 255                                   # category 2 (stuff)
PERSON_B = 256 * 256 * 5                    # 327680, category 1
GRASS = 7
IDS_139 = np.array([[PERSON_A, PERSON_A, PERSON_A, SKY, SKY, SKY],
                    [PERSON_A, PERSON_A, PERSON_A, SKY, SKY, SKY],
                    [PERSON_B, PERSON_B, 0, 0, 0, 0],
                    [SKY, SKY, SKY, SKY, SKY, SKY]])           # PERSON_A 6, SKY 12, PERSON_B 2 pixels
IDS_285 = np.full((3, 5), GRASS)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 // 256], axis=-1).astype(np.uint8)


def narratives():
    def segment(utterance, ids, plural=False):
        return {"utterance": utterance, "segment_ids": ids, "plural": plural, "noun": bool(ids)}

    return [
        {"image_id": "139", "caption": "A man stands under the sky.", "annotator_id": 3,
         "segments": [segment("A man", [str(PERSON_A)]), segment(" stands under", []),
                      segment("the sky", [SKY]), segment(".", [])]},
        {"image_id": "285", "caption": "Grass.", "segments": [segment("Grass", [str(GRASS)])]},
        {"image_id": "139", "caption": "Two people.",
         "segments": [segment("Two people", [str(PERSON_A), str(PERSON_B)], plural=True)]},
        {"image_id": "632", "caption": "No panoptic annotation.", "segments": [segment("A bed", ["1"])]},
        {"image_id": "999", "caption": "No image.", "segments": [segment("A cup", ["1"])]},
        {"image_id": "139", "caption": "Nothing grounded.",
         "segments": [{"utterance": "Nothing", "segment_ids": []}]},           # no plural needed
    ]


def panoptic():
    return {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "width": 6, "height": 4},
                   {"id": 285, "file_name": "000000000285.jpg", "width": 5, "height": 3},
                   {"id": 632, "file_name": "000000000632.jpg", "width": 5, "height": 3}],
        "annotations": [
            {"image_id": 139, "file_name": "000000000139.png", "segments_info": [
                {"id": PERSON_A, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 3, 2], "area": 6},
                {"id": SKY, "category_id": 2, "iscrowd": 0, "bbox": [0, 0, 6, 4], "area": 12},
                {"id": PERSON_B, "category_id": 1, "iscrowd": 0, "bbox": [0, 2, 2, 1], "area": 2}]},
            {"image_id": 285, "file_name": "000000000285.png", "segments_info": [
                {"id": GRASS, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 5, 3], "area": 15}]},
        ],
        "categories": [{"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
                       {"id": 2, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky"},
                       {"id": 3, "name": "grass-merged", "isthing": 0, "supercategory": "plant"}],
    }


def png_config(tmp_path, narrative_data=None, panoptic_data=None) -> DatasetConfig:
    annotations = tmp_path / "annotations"
    masks = annotations / "panoptic_val2017"
    masks.mkdir(parents=True, exist_ok=True)
    for name, ids in (("000000000139.png", IDS_139), ("000000000285.png", IDS_285)):
        Image.fromarray(id2rgb(ids)).save(masks / name)
    return DatasetConfig(
        "png", "png", images="coco/val2017", panoptic_masks=str(masks),
        narratives=str(write_json(annotations / "png_coco_val2017.json",
                                  narratives() if narrative_data is None else narrative_data)),
        panoptic=str(write_json(annotations / "panoptic_val2017.json",
                                panoptic() if panoptic_data is None else panoptic_data)))


def test_png_samples_one_per_narrative_in_file_order(tmp_path):
    samples = list_samples(png_config(tmp_path))
    assert [s.sample_id for s in samples] == ["139-0", "285-0", "139-1", "632-0", "999-0", "139-2"]
    first = samples[0]
    assert first.forced_answer == ("A man", " stands under", "the sky", ".")
    assert (first.image_id, first.width, first.height) == ("139", 6, 4)
    assert first.file == Path("coco/val2017/000000000139.jpg")
    assert first.expression is None and first.error is None
    assert samples[2].forced_answer == ("Two people",)
    assert {s.sample_id: s.error for s in samples if s.error} == {
        "632-0": "narrative [3]: image 632 has no annotation in the panoptic file",
        "999-0": "narrative [4]: image 999 is not among the images of the panoptic file"}
    assert (samples[4].file, samples[4].width) == (Path("coco/val2017"), None)


def test_png_ground_truth_phrases_and_masks(tmp_path):
    cfg = png_config(tmp_path)
    targets = load_png_ground_truth(cfg)
    assert set(targets) == {"139-0", "285-0", "139-1", "139-2"}
    target = targets["139-0"]
    assert (target.image_id, target.height, target.width) == ("139", 4, 6)
    assert target.panoptic_png == Path(cfg.panoptic_masks) / "000000000139.png"
    assert [(p.phrase_index, p.utterance, p.segment_ids, p.plural, p.is_thing) for p in target.phrases] == [
        (0, "A man", (PERSON_A,), False, True), (2, "the sky", (SKY,), False, False)]
    masks = target.masks()
    assert list(masks) == [0, 2]
    assert masks[0].dtype == bool and masks[0].shape == (4, 6)
    assert masks[0].sum() == 6 and masks[0][:2, :3].all()
    assert masks[2].sum() == 12 and masks[2][3].all()
    plural = targets["139-1"]
    assert [(p.segment_ids, p.plural, p.is_thing) for p in plural.phrases] == [
        ((PERSON_A, PERSON_B), True, True)]
    assert plural.masks()[0].sum() == 6 + 2
    grass = targets["285-0"]
    assert grass.phrases[0].is_thing is False and grass.masks()[0].sum() == 15
    assert targets["139-2"].phrases == () and targets["139-2"].masks() == {}


def test_panoptic_ids_round_trip():
    np.testing.assert_array_equal(rgb2id(id2rgb(IDS_139)), IDS_139)


def test_panoptic_png_problems(tmp_path):
    cfg = png_config(tmp_path)
    target = load_png_ground_truth(cfg)["139-0"]
    png = target.panoptic_png
    Image.fromarray(id2rgb(IDS_139[:, :5])).save(png)
    with pytest.raises(DatasetError, match=f"panoptic PNG {png} is 5 x 4 pixels; the panoptic file declares "
                                           "6 x 4"):
        target.masks()
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(png)
    with pytest.raises(DatasetError, match="has mode L; expected RGB"):
        read_panoptic_ids(png, 4, 6)
    Image.fromarray(id2rgb(np.where(IDS_139 == SKY, 0, IDS_139))).save(png)
    with pytest.raises(DatasetError, match=re.escape("no pixel holds the segment ids [255] of phrase 2 "
                                                     "('the sky') of image 139")):
        target.masks()
    png.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="unreadable panoptic PNG"):
        target.masks()
    png.unlink()
    with pytest.raises(DatasetError, match="panoptic PNG not found"):
        target.masks()


def test_png_unknown_segment_id_is_named(tmp_path):
    data = narratives()
    data[2]["segments"][0]["segment_ids"].append("9")
    cfg = png_config(tmp_path, narrative_data=data)
    for load in (list_samples, load_png_ground_truth):
        with pytest.raises(DatasetError) as info:
            load(cfg)
        assert str(info.value) == (f"PNG narratives file {cfg.narratives}: [2].segments[0].segment_ids: "
                                   "segment id 9 is not among the segments_info of image 139 in "
                                   f"{cfg.panoptic}")


def _narrative(i, key, value, j=None):
    def mutate(data):
        target = data[i] if j is None else data[i]["segments"][j]
        if value is None:
            del target[key]
        else:
            target[key] = value
        return data
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda data: {"narratives": data}, "expected a JSON list at the top level, found dict"),
    (lambda data: [*data, 3], "[6] must be an object, found int"),
    (_narrative(1, "image_id", None), "[1] has no field 'image_id'"),
    (_narrative(1, "image_id", 285.0), "[1].image_id must be a string or an integer, got 285.0"),
    (_narrative(0, "segments", "A man"), "[0].segments must be a list"),
    (_narrative(0, "utterance", None, j=1), "[0].segments[1] has no field 'utterance'"),
    (_narrative(0, "segment_ids", str(PERSON_A), j=0), "[0].segments[0].segment_ids must be a list"),
    (_narrative(0, "segment_ids", ["person"], j=0), "[0].segments[0].segment_ids[0] must be a segment id"),
    (_narrative(0, "plural", None, j=2), "[0].segments[2] has no field 'plural'"),
    (_narrative(0, "plural", "no", j=2), "[0].segments[2].plural must be true or false"),
])
def test_malformed_narratives_name_file_and_entry(tmp_path, mutate, message):
    cfg = png_config(tmp_path, narrative_data=mutate(narratives()))
    with pytest.raises(DatasetError) as info:
        list_samples(cfg)
    assert f"PNG narratives file {cfg.narratives}: {message}" in str(info.value)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("categories"), "missing top-level field 'categories'"),
    (lambda d: d["categories"][1].update(isthing=2), "categories[1].isthing must be 0 or 1, got 2"),
    (lambda d: d["categories"][0].pop("isthing"), "categories[0] has no field 'isthing'"),
    (lambda d: d["annotations"][0].pop("segments_info"), "annotations[0] has no field 'segments_info'"),
    (lambda d: d["annotations"][1].update(image_id=7), "annotations[1].image_id 7 is not in images"),
    (lambda d: d["annotations"][1].update(image_id=139), "annotations[1] repeats image_id 139"),
    (lambda d: d["annotations"][0]["segments_info"][1].pop("id"),
     "annotations[0].segments_info[1] has no field 'id'"),
    (lambda d: d["annotations"][0]["segments_info"][1].update(category_id=9),
     "annotations[0].segments_info[1].category_id 9 is not in categories"),
    (lambda d: d["annotations"][0]["segments_info"][2].update(id=SKY),
     "annotations[0].segments_info[2] repeats segment id 255 of its image"),
])
def test_malformed_panoptic_names_file_and_entry(tmp_path, mutate, message):
    data = panoptic()
    mutate(data)
    cfg = png_config(tmp_path, panoptic_data=data)
    with pytest.raises(DatasetError) as info:
        list_samples(cfg)
    assert f"COCO panoptic file {cfg.panoptic}: {message}" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Config keys and schema.


@pytest.mark.parametrize(("entry", "message"), [
    ({"task": "res", "images": "x", "refs": "r", "instances": "i"}, "task 'res' needs the key 'split'"),
    ({"task": "res", "images": "x", "instances": "i", "split": "val"}, "task 'res' needs the key 'refs'"),
    ({"task": "res", "images": "x", "refs": "r", "instances": "i", "split": 5},
     "split must be a string, got 5"),
    ({"task": "res", "images": "x", "refs": "r", "instances": "i", "split": "val", "mask_gt": "m"},
     "mask_gt is not used by task 'res'"),
    ({"task": "png", "images": "x", "narratives": "n", "panoptic": "p"}, "needs the key 'panoptic_masks'"),
    ({"task": "png", "images": "x", "narratives": "n", "panoptic": "p", "panoptic_masks": "m",
      "split": "val"},
     "split is not used by task 'png'"),
    ({"task": "instance_seg", "images": "x", "instances": "i", "refs": "r"},
     "refs is not used by task 'instance_seg'"),
    ({"task": "images", "images": "x", "proposals": ""}, "proposals must be a non-empty string or null"),
])
def test_bad_res_and_png_entries(entry, message):
    with pytest.raises(ConfigError) as info:
        dataset_config("d", entry)
    assert message in str(info.value) and "datasets.d" in str(info.value)


RES_ENTRY = {"task": "res", "images": "coco/train2014", "refs": "refcoco/refs(unc).p",
             "instances": "refcoco/instances.json", "split": "testA"}
PNG_ENTRY = {"task": "png", "images": "coco/val2017", "narratives": "png_coco_val2017.json",
             "panoptic": "panoptic_val2017.json", "panoptic_masks": "panoptic_val2017"}


def test_ground_truth_files():
    assert dataset_config("r", RES_ENTRY).ground_truth_files() == ("refcoco/refs(unc).p",
                                                                   "refcoco/instances.json")
    assert dataset_config("p", PNG_ENTRY).ground_truth_files() == (
        "png_coco_val2017.json", "panoptic_val2017.json", "panoptic_val2017")
    assert dataset_config("f", {"task": "images", "images": "x"}).ground_truth_files() == ()
    with_proposals = dataset_config("p", {**PNG_ENTRY, "proposals_folder": "openseed", "proposals": "p.json"})
    assert (with_proposals.proposals_folder, with_proposals.proposals) == ("openseed", "p.json")
    assert with_proposals.ground_truth_files() == dataset_config("p", PNG_ENTRY).ground_truth_files()
    assert dataset_config("g", {"task": "gcg", "images": "x", "mask_gt": "m", "caption_gt": "c"}
                          ).ground_truth_files() == ("m", "c")


@pytest.mark.parametrize("entry", [RES_ENTRY, PNG_ENTRY])
def test_schema_accepts_res_and_png_entries_and_names_missing_keys(entry):
    validator = jsonschema.Draft202012Validator(SCHEMA)
    validator.validate({"datasets": {"d": entry}})
    for key in set(entry) - {"task", "images"}:
        broken = copy.deepcopy(entry)
        del broken[key]
        with pytest.raises(jsonschema.ValidationError, match=f"'{key}' is a required property"):
            validator.validate({"datasets": {"d": broken}})


# ------------------------------------------------------------------------------------------------
# The Co-DETR proposals converter.

PROPOSAL_IMAGES = {"images": [{"id": 5, "file_name": "a.jpg", "height": 4, "width": 6},
                              {"id": 3, "file_name": "b.jpg", "height": 2, "width": 3}],
                   "annotations": [], "categories": []}


def proposal_masks():
    first = np.zeros((4, 6), dtype=np.uint8)
    first[1:3, 2:5] = 1
    second = np.zeros((4, 6), dtype=np.uint8)
    second[0, :] = 1
    third = np.ones((2, 3), dtype=np.uint8)
    return [[first, second], [third]]


def encoded(mask):
    return mask_utils.encode(np.asfortranarray(mask))          # counts as bytes, as Co-DETR writes them


def write_proposals(tmp_path, entries, protocol=2):
    path = tmp_path / "co_detr_retrain_inference_results.pkl"
    path.write_bytes(pickle.dumps(entries, protocol=protocol))
    return path


def run_converter(tmp_path, entries, protocol=2):
    pkl = write_proposals(tmp_path, entries, protocol)
    images = write_json(tmp_path / "instances_refcoco_valtest.json", PROPOSAL_IMAGES)
    out = tmp_path / "proposals.json"
    convert_proposals.main(["--pickle", str(pkl), "--images", str(images), "--out", str(out)])
    return json.loads(out.read_text())


def release_entries():
    """Per image: (boxes, masks, scores) with numpy arrays, the masks RLE with bytes counts."""
    (a, b), (c,) = proposal_masks()
    return [(np.zeros((2, 5), dtype=np.float32), [encoded(a), encoded(b)],
             np.array([0.25, 0.75], dtype=np.float32)),
            (np.zeros((1, 5), dtype=np.float32), [encoded(c)], np.array([0.5], dtype=np.float32))]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_converter_writes_coco_results(tmp_path, protocol):
    results = run_converter(tmp_path, release_entries(), protocol)
    assert [(r["image_id"], r["score"], r["category_id"]) for r in results] == [
        (5, 0.25, 1), (5, 0.75, 1), (3, 0.5, 1)]
    masks = [mask for image in proposal_masks() for mask in image]
    for result, mask in zip(results, masks):
        assert isinstance(result["segmentation"]["counts"], str)
        assert result["segmentation"]["size"] == list(mask.shape)
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]), mask)


def test_converter_takes_text_counts_and_score_lists(tmp_path):
    entries = [[None, [{**rle, "counts": rle["counts"].decode()} for rle in masks],
                [float(score) for score in scores]]
               for _, masks, scores in release_entries()]
    assert run_converter(tmp_path, entries) == run_converter(tmp_path, release_entries())


def _entry(i, item, value):
    def mutate(entries):
        entry = list(entries[i])
        entry[item] = value
        entries[i] = tuple(entry)
        return entries
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda e: e[:1], "has 1 entries but .* has 2 images; entry i must hold the proposals of images\\[i\\]"),
    (lambda e: {"results": e}, "expected a list of per-image entries, found dict"),
    (lambda e: [e[0], e[1][:2]], "entry 1 \\(image 3\\) must be a sequence whose item 1 is the masks"),
    (_entry(0, 2, np.array([0.5], dtype=np.float32)), "entry 0 \\(image 5\\): 2 masks but 1 scores"),
    (_entry(0, 2, np.array([0.5, np.nan])), "entry 0 \\(image 5\\): the scores must be finite"),
    (_entry(1, 2, "high"), "entry 1 \\(image 3\\): the scores must be a numpy array or a list of numbers"),
    (_entry(1, 1, "masks"), "entry 1 \\(image 3\\): item 1 \\(the masks\\) must be a list"),
    (_entry(1, 1, [{"size": [3, 2], "counts": b"06"}]),
     r"entry 1 \(image 3\) mask 0 has size \[3, 2\]; its image is \[2, 3\]"),
    (_entry(1, 1, [{"size": [2, 3], "counts": [0, 6]}]),
     r"entry 1 \(image 3\) mask 0.counts must be compressed RLE"),
    (_entry(1, 1, [np.ones((2, 3))]), "entry 1 \\(image 3\\) mask 0 must be an RLE dict"),
])
def test_converter_errors_name_the_entry(tmp_path, mutate, message):
    with pytest.raises(SystemExit, match=message) as info:
        run_converter(tmp_path, mutate(release_entries()))
    assert "co_detr_retrain_inference_results.pkl" in str(info.value)
    assert not (tmp_path / "proposals.json").exists()


def test_converter_refuses_code(tmp_path):
    class RunsCommand:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    with pytest.raises(SystemExit, match=rf"refused to load the global {os.system.__module__}\.system"):
        run_converter(tmp_path, [*release_entries(), RunsCommand()])
    assert not (tmp_path / "pwned").exists()
