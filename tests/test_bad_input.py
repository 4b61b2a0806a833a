"""Bad input through the whole DAG: one table of cases (docs/failures.md, "Bad input", is this table).

The table below builds two data sets in a work directory: a plain image folder (``task: images``) and
a COCO-style instance segmentation set (``task: instance_seg``) holding, among good images, every
awkward kind of file and ground truth we know of. The real workflow runs once over both (tiny
untrained models, ``shards: 2``), then every case is checked: a good case has its rows in the
generations, phrases and masks tables and masks of the image's size as stored (no EXIF rotation);
a bad case has an error row with the expected reason in every table; no image is lost, the
evaluation and the overlays are computed. The two data sets also carry settings of their own (the
release's two tables': the COCO set keeps SAM's three masks per phrase, the folder one max-pooled mask),
so the same run shows per-data-set settings at work and rerunning alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_run
from PIL import Image
from pycocotools import mask as mask_utils
from test_workflow import planned_jobs, snakemake

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


# --- how the files are made ----------------------------------------------------------------------

def noise(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth random colours (so that JPEG keeps them) of ``height x width`` pixels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    channels = [127 + 120 * np.sin(xs / max(width, 1) * rng.uniform(2, 6) + ys / max(height, 1) * rng.uniform(2, 6)
                                   + rng.uniform(0, 6)) for _ in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def rgb(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        Image.fromarray(noise(width, height, seed)).convert(mode).save(path, format=fmt)
    return make


def palette_with_transparency(width: int, height: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        image = Image.fromarray(noise(width, height, 3)).convert("P")
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    return make


def sixteen_bit(width: int, height: int) -> Callable[[Path], None]:
    """A 16-bit greyscale PNG (Pillow mode "I;16") with values over the whole 0..65535 range."""
    def make(path: Path) -> None:
        ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
        Image.fromarray(ramp).save(path)
    return make


def exif_rotated(width: int, height: int) -> Callable[[Path], None]:
    """A JPEG stored ``width x height`` whose EXIF orientation 6 tells viewers to turn it 90 degrees
    (they show it ``height x width``)."""
    def make(path: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(noise(width, height, 5)).save(path, exif=exif)
    return make


def truncated(keep: int | None = None) -> Callable[[Path], None]:
    """A 64 x 64 image of random pixels (so that its pixel data is most of the file) cut after ``keep``
    bytes, by default half way: its header (and size) can be read, its pixels cannot."""
    def make(path: Path) -> None:
        Image.fromarray(np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[:keep or len(data) // 2])
    return make


def raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def folder(path: Path) -> None:
    path.mkdir()


def twins(path: Path) -> None:
    """``twin.jpg`` and ``twin.png``: one stem, so one image id for two files."""
    rgb(20, 20, 30)(path)
    rgb(20, 20, 31)(path.with_suffix(".png"))


# --- the table -------------------------------------------------------------------------------------

OK = "ok"


@dataclass(frozen=True)
class Case:
    """One input. ``expect`` is OK or a substring of the error reason its rows carry; ``stage`` is
    where that reason is first written (manifest, generate or phrases; every later table carries it on);
    ``stored`` is the (width, height) of the file's pixel grid, the size masks must have; ``gt`` the
    kind of ground-truth annotation (coco), None for none; ``extra["declared"]``: the (width, height)
    the ground truth declares when it is not the stored one."""

    name: str
    dataset: str                      # folder | coco
    file: str | None
    make: Callable[[Path], None] | None
    expect: str
    stage: str = ""
    stored: tuple[int, int] | None = None
    gt: str | None = None
    entries: int = 1                  # coco: how many images entries list this id
    extra: dict = field(default_factory=dict)


GOOD = rgb(64, 48, seed=1)
CASES = [
    # A plain image folder: every file with an image extension is an image, its id the file's stem.
    Case("good RGB PNG", "folder", "good.png", GOOD, OK, stored=(64, 48)),
    Case("grayscale", "folder", "gray.png", rgb(40, 40, 2, "L"), OK, stored=(40, 40)),
    Case("RGBA", "folder", "rgba.png", rgb(50, 30, 3, "RGBA"), OK, stored=(50, 30)),
    Case("palette", "folder", "palette.png", rgb(33, 45, 4, "P"), OK, stored=(33, 45)),
    Case("palette with transparency", "folder", "palette_t.png", palette_with_transparency(30, 20), OK,
         stored=(30, 20)),
    Case("CMYK JPEG", "folder", "cmyk.jpg", rgb(30, 50, 5, "CMYK"), OK, stored=(30, 50)),
    Case("16-bit grayscale PNG", "folder", "gray16.png", sixteen_bit(30, 20), OK, stored=(30, 20)),
    Case("EXIF-rotated JPEG", "folder", "exif.jpg", exif_rotated(40, 24), OK, stored=(40, 24)),
    Case("1x1 image", "folder", "one.png", rgb(1, 1, 6), OK, stored=(1, 1)),
    Case("4000x20 image", "folder", "wide.png", rgb(4000, 20, 7), OK, stored=(4000, 20)),
    Case("20x4000 image", "folder", "tall.png", rgb(20, 4000, 8), OK, stored=(20, 4000)),
    Case("4000x5 image", "folder", "thin.png", rgb(4000, 5, 14), OK, stored=(4000, 5)),
    Case("non-ASCII file name", "folder", "café 日本.png", rgb(32, 32, 9), OK, stored=(32, 32)),
    Case("upper-case extension", "folder", "upper.JPG", rgb(32, 24, 10, fmt="JPEG"), OK, stored=(32, 24)),
    Case("zero-byte file", "folder", "empty.jpg", raw(b""), "unreadable image", "manifest"),
    Case("text file named .jpg", "folder", "text.jpg", raw(b"not an image at all\n"), "unreadable image",
         "manifest"),
    Case("random bytes", "folder", "random.png", raw(np.random.default_rng(0).bytes(500)), "unreadable image",
         "manifest"),
    Case("truncated JPEG", "folder", "trunc_jpeg.jpg", truncated(), "image file is truncated", "generate"),
    Case("truncated PNG", "folder", "trunc_png.png", truncated(), "image file is truncated", "generate"),
    Case("JPEG cut inside its header", "folder", "trunc_header.jpg", truncated(300), "unreadable image",
         "manifest"),
    Case("two files, one image id", "folder", "twin.jpg", twins, "would have image id 'twin'", "manifest"),
    # A COCO instances file: images listed with their ids, sizes and annotations.
    Case("good image, polygon ground truth", "coco", "good.jpg", rgb(64, 48, 13, fmt="JPEG"), OK,
         stored=(64, 48), gt="polygon"),
    Case("compressed RLE ground truth", "coco", "rle.png", rgb(48, 40, 14), OK, stored=(48, 40), gt="rle"),
    Case("uncompressed RLE ground truth", "coco", "rle_list.png", rgb(40, 48, 15), OK, stored=(40, 48),
         gt="rle_uncompressed"),
    Case("no annotations", "coco", "unannotated.png", rgb(40, 40, 16), "image has no ground-truth category",
         "phrases", stored=(40, 40)),
    Case("grayscale", "coco", "gray.png", rgb(40, 40, 17, "L"), OK, stored=(40, 40), gt="polygon"),
    Case("RGBA", "coco", "rgba.png", rgb(50, 30, 18, "RGBA"), OK, stored=(50, 30), gt="polygon"),
    Case("palette", "coco", "palette.png", rgb(33, 45, 19, "P"), OK, stored=(33, 45), gt="polygon"),
    Case("CMYK JPEG", "coco", "cmyk.jpg", rgb(30, 50, 20, "CMYK"), OK, stored=(30, 50), gt="polygon"),
    Case("16-bit grayscale PNG", "coco", "gray16.png", sixteen_bit(30, 20), OK, stored=(30, 20), gt="polygon"),
    Case("EXIF-rotated JPEG", "coco", "exif.jpg", exif_rotated(40, 24), OK, stored=(40, 24), gt="rle"),
    Case("EXIF-rotated JPEG, ground truth in displayed size", "coco", "exif_shown.jpg", exif_rotated(40, 24),
         "its EXIF orientation 6 shows it turned to 24 x 40", "manifest", gt="polygon",
         extra={"declared": (24, 40)}),
    Case("1x1 image", "coco", "one.png", rgb(1, 1, 21), OK, stored=(1, 1), gt="polygon"),
    Case("4000x20 image", "coco", "wide.png", rgb(4000, 20, 22), OK, stored=(4000, 20), gt="polygon"),
    Case("non-ASCII file name", "coco", "ñandú/straße 写真.png", rgb(32, 32, 23), OK, stored=(32, 32),
         gt="polygon"),
    Case("missing file", "coco", "missing.png", None, "not found on disk", "manifest", gt="polygon"),
    Case("folder named like an image", "coco", "folder.png", folder, "unreadable image", "manifest"),
    Case("zero-byte file", "coco", "empty.jpg", raw(b""), "unreadable image", "manifest", gt="polygon"),
    Case("text file named .jpg", "coco", "text.jpg", raw(b"not an image at all\n"), "unreadable image",
         "manifest"),
    Case("truncated JPEG", "coco", "trunc.jpg", truncated(), "image file is truncated", "generate",
         stored=(64, 64), gt="polygon"),
    Case("duplicate image id", "coco", "dup.png", rgb(32, 32, 25), "is listed 2 times", "manifest",
         gt="polygon", entries=2),
    Case("annotation without segmentation", "coco", "noseg.png", rgb(32, 32, 26), "has no segmentation",
         "manifest", stored=(32, 32), gt="missing"),
]
FOLDER_ONLY_FILES = {"notes.txt": b"not an image extension: not an image of the folder\n"}


def case_id(case: Case, index: int) -> str:
    """The image id of ``case``: the file's stem in a folder, a COCO id (integer) otherwise."""
    return Path(case.file).stem if case.dataset == "folder" else str(100 + index)


# --- building the data sets ------------------------------------------------------------------------

def centre_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4:max(height * 3 // 4, 1), width // 4:max(width * 3 // 4, 1)] = 1
    return mask


def segmentation(kind: str, width: int, height: int) -> dict | list:
    """Ground truth of the image's centre half, in stored-pixel coordinates."""
    mask = centre_mask(width, height)
    if kind == "polygon":
        x0, y0, x1, y1 = width / 4, height / 4, max(width * 3 / 4, 1), max(height * 3 / 4, 1)
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    if kind == "rle":
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    if kind == "rle_uncompressed":
        counts, current, run = [], 0, 0      # run lengths in column-major order, zeros first
        for value in mask.flatten(order="F"):
            if value != current:
                counts.append(run)
                current, run = value, 0
            run += 1
        return {"size": [height, width], "counts": [*counts, run]}
    raise ValueError(kind)


def build_data(work: Path) -> None:
    images = work / "data" / "folder"
    images.mkdir(parents=True)
    coco_dir = work / "data" / "coco"
    coco_dir.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]}
    for index, case in enumerate(CASES):
        base = images if case.dataset == "folder" else coco_dir
        if case.make is not None:
            (base / case.file).parent.mkdir(parents=True, exist_ok=True)
            case.make(base / case.file)
        if case.dataset != "coco":
            continue
        width, height = case.extra.get("declared") or case.stored or (32, 32)
        image_id = 100 + index
        for entry in range(case.entries):
            file = case.file if entry == 0 else f"{Path(case.file).stem}_{entry}.png"
            if entry:
                shutil.copy(coco_dir / case.file, coco_dir / file)
            coco["images"].append({"id": image_id, "file_name": file, "width": width, "height": height})
        if case.gt is not None:
            annotation = {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                          "area": float(centre_mask(width, height).sum()), "iscrowd": 0,
                          "bbox": [width / 4, height / 4, width / 2, height / 2]}
            if case.gt != "missing":
                annotation["segmentation"] = segmentation(case.gt, width, height)
            coco["annotations"].append(annotation)
    for name, data in FOLDER_ONLY_FILES.items():
        (images / name).write_bytes(data)
    (work / "data" / "instances.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")


NOUNS = ["a dog", "a cat", "the bird", "a fish"]


def build_models(work: Path) -> tuple[Path, Path]:
    """A tiny untrained LLaVA whose answers are nouns only (every other token is suppressed, end of
    sequence included, so each answer has a noun phrase) and a tiny untrained SAM."""
    from stages.models.sam import build_toy_sam
    from stages.toy.model import build_toy_llava

    lmm = build_toy_llava(work / "models" / "llava", NOUNS, seed=0)
    vocab = json.loads((lmm / "tokenizer.json").read_text())["model"]["vocab"]
    nouns = {vocab[f"▁{word}"] for word in ("dog", "cat", "bird", "fish")}
    generation = json.loads((lmm / "generation_config.json").read_text())
    generation["suppress_tokens"] = sorted(set(vocab.values()) - nouns)
    (lmm / "generation_config.json").write_text(json.dumps(generation))
    sam = build_toy_sam(work / "models" / "sam.safetensors", seed=0)
    return lmm, sam


def write_config(work: Path, lmm: Path, sam: Path) -> None:
    """Both data sets with settings of their own: every phrase kept whatever category it is closest to
    (the models are untrained) and SAM's three masks per phrase for the COCO set (the release's instance
    segmentation), one mask of the max-pooled map for the folder (its GCG)."""
    config = {
        "out": "results",
        "shards": 2,
        "datasets": {
            "folder": {"task": "images", "images": "data/folder", "segment": {"pool": "max"}},
            "coco": {"task": "instance_seg", "images": "data/coco", "instances": "data/instances.json",
                     "phrases": {"category_thresh": -1.0}, "segment": {"more_masks": True}},
        },
        "variants": {},
        "lmm": {"family": "llava", "path": str(lmm.relative_to(work)), "dtype": "float32"},
        "generate": {"max_new_tokens": 4, "batch_size": 4},
        "sam": {"type": "tiny", "checkpoint": str(sam.relative_to(work))},
        "visualize": {"num_images": 100},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))


@pytest.fixture(scope="session")
def bad_input_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bad_input")
    build_data(work)
    lmm, sam = build_models(work)
    write_config(work, lmm, sam)
    start = time.monotonic()
    result = subprocess.run([*SNAKEMAKE, "--directory", str(work), "--cores", "2"], check=False,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (work / "snakemake.log").write_text(result.stdout + result.stderr)
    print(f"bad-input DAG: {time.monotonic() - start:.0f} s")
    if result.returncode != 0:
        raise AssertionError(f"the workflow failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return work


def tables(work: Path, dataset: str) -> dict[str, pd.DataFrame]:
    out = work / "results"
    found = {"manifest": pd.read_parquet(out / "manifests" / f"{dataset}.parquet")}
    for kind in ("generations", "phrases", "masks"):
        found[kind] = pd.concat([pd.read_parquet(out / "main" / dataset / kind / f"shard-{shard}.parquet")
                                 for shard in (0, 1)], ignore_index=True)
    return found


def cases_of(dataset: str) -> list[tuple[str, Case]]:
    return [(case_id(case, index), case) for index, case in enumerate(CASES) if case.dataset == dataset]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["folder", "coco"])
def test_every_case_has_its_outcome_and_no_row_is_lost(bad_input_run, dataset):
    found = tables(bad_input_run, dataset)
    manifest = found["manifest"]
    expected = dict(cases_of(dataset))
    # Every image is in the manifest once, in both shards, and nothing else is.
    assert sorted(manifest["image_id"]) == sorted(expected), manifest["image_id"].tolist()
    assert set(manifest["shard"]) == {0, 1}
    for kind in ("generations", "phrases", "masks"):
        assert set(found[kind]["image_id"]) == set(expected), kind
    assert found["generations"]["image_id"].is_unique

    problems = []
    for image_id, case in expected.items():
        rows = {kind: table[table["image_id"] == image_id] for kind, table in found.items()}
        manifest_row = rows["manifest"].iloc[0]
        generation = rows["generations"].iloc[0]
        if case.expect == OK:
            checks = {
                "manifest without error": pd.isna(manifest_row["error"]),
                "manifest size is the stored size": (manifest_row["width"], manifest_row["height"]) == case.stored,
                "generation without error": pd.isna(generation["error"]) and generation["num_tokens"] > 0,
                "a phrase without error": rows["phrases"]["error"].isna().any(),
                "a mask of the stored size": ((rows["masks"]["height"] == case.stored[1])
                                              & (rows["masks"]["width"] == case.stored[0])).any(),
                "every mask of the stored size": ((rows["masks"]["height"].isna() | (rows["masks"]["height"]
                                                   == case.stored[1]))
                                                  & (rows["masks"]["width"].isna() | (rows["masks"]["width"]
                                                     == case.stored[0]))).all(),
            }
        else:
            # The stage that finds the problem writes the reason; every later table carries it on.
            stages = ["manifest", "generations", "phrases", "masks"]
            first = stages.index({"generate": "generations"}.get(case.stage, case.stage))
            checks = {
                **{f"{kind}: no error before {case.stage}": rows[kind]["error"].isna().all()
                   for kind in stages[:first]},
                **{f"{kind}: every row an error row naming '{case.expect}'":
                   rows[kind]["error"].astype(str).str.contains(case.expect, regex=False).all()
                   for kind in stages[first:]},
            }
        problems += [f"{dataset} {case.name} ({image_id}): {check}" for check, ok in checks.items() if not ok]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_non_ascii_ids_and_files_round_trip(bad_input_run):
    folder_manifest = tables(bad_input_run, "folder")["manifest"]
    assert "café 日本" in set(folder_manifest["image_id"])
    coco_manifest = tables(bad_input_run, "coco")["manifest"]
    assert any(file.endswith("ñandú/straße 写真.png") for file in coco_manifest["file"])
    overlays = {path.name for path in (bad_input_run / "results" / "main" / "folder" / "visualize").iterdir()}
    assert "café 日本_overlay.png" in overlays


@pytest.mark.slow
def test_exif_rotated_masks_follow_the_stored_pixels_as_the_ground_truth_does(bad_input_run):
    """The pipeline uses the pixel array as stored (no EXIF rotation), as COCO's annotations do: the
    masks of the 40 x 24 JPEG that viewers show 24 x 40 are 24 rows by 40 columns, and the evaluator
    (which checks each mask's size against the ground truth's) accepted them."""
    index, case = next((i, c) for i, c in enumerate(CASES) if c.dataset == "coco" and c.file == "exif.jpg")
    with Image.open(bad_input_run / "data" / "coco" / case.file) as image:
        assert image.size == (40, 24) and image.getexif()[0x0112] == 6
    masks = tables(bad_input_run, "coco")["masks"]
    masks = masks[masks["image_id"] == case_id(case, index)]
    assert len(masks) and set(zip(masks["height"], masks["width"])) == {(24, 40)}
    predictions = json.loads((bad_input_run / "results" / "main" / "coco" / "predictions"
                              / "instance_seg.json").read_text())
    sizes = {tuple(p["segmentation"]["size"]) for p in predictions if p["image_id"] == 100 + index}
    assert sizes <= {(24, 40)}


@pytest.mark.slow
def test_metrics_are_computed_over_every_usable_image(bad_input_run):
    metrics = json.loads((bad_input_run / "results" / "main" / "coco" / "metrics"
                          / "instance_seg.json").read_text())["instance_seg"]
    coco_cases = cases_of("coco")
    excluded = [case for _, case in coco_cases if case.expect in ("is listed 2 times", "has no segmentation")]
    assert metrics["num_images_excluded"] == len(excluded) == 2
    assert metrics["num_images"] == len(coco_cases) - len(excluded)
    assert metrics["num_images_with_predictions"] > 0 and metrics["AP"] is not None
    summary = (bad_input_run / "results" / "summary.md").read_text()
    assert "coco" in summary


@pytest.mark.slow
def test_every_image_gets_its_pictures(bad_input_run):
    for dataset in ("folder", "coco"):
        pictures = {path.name for path in (bad_input_run / "results" / "main" / dataset / "visualize").iterdir()}
        for image_id, _ in cases_of(dataset):
            assert {f"{image_id}_overlay.png", f"{image_id}_attention.png"} <= pictures, (dataset, image_id)


@pytest.mark.slow
def test_data_sets_run_with_their_own_settings_and_rerun_alone(bad_input_run, tmp_path):
    """One workflow, two data sets with different segment settings (write_config): the COCO set keeps SAM's
    three masks per phrase, the folder one. Changing one data set's settings reruns that data set's jobs
    and nothing of the other's (a dry run on a copy of the run)."""
    for dataset, expected in [("coco", [0, 1, 2]), ("folder", [2])]:
        masks = tables(bad_input_run, dataset)["masks"]
        masks = masks[masks["mask_index"].notna()]      # SAM's masks, an empty one (an error row) included
        per_phrase = masks.groupby(["image_id", "phrase_index"])["mask_index"].apply(sorted)
        assert len(per_phrase) and all(indices == expected for indices in per_phrase), (dataset, per_phrase)

    work = copy_run(bad_input_run, tmp_path / "run")
    assert planned_jobs(work) == {}
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["datasets"]["folder"]["segment"]["pool"] = "mean"
    (work / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    dry_run = snakemake(work, "--cores", "1", "--dry-run").stdout
    assert re.search(r"params have changed since last execution:\s+segment\s", dry_run), dry_run
    assert "output: results/main/folder/masks/shard-0.parquet" in dry_run
    assert "output: results/main/coco/masks/" not in dry_run
    jobs = planned_jobs(work)
    assert jobs.pop("segment") == 2 and jobs.pop("visualize") == 1, jobs
    assert set(jobs) <= {"summary", "all"}, jobs


def readme_rows() -> list[list[str]]:
    """The cells of the table rows of docs/failures.md's "Bad input" section."""
    text = (ROOT / "docs" / "failures.md").read_text(encoding="utf-8")
    section = text.split("\n## Bad input\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| data set")]


def test_the_readme_table_is_this_table():
    """Every case has its row in docs/failures.md's "Bad input" table (data set, case, what happens, in
    this order), an error case's row quotes its reason, and the table has no other row."""
    rows = readme_rows()
    assert [(row[0], row[1]) for row in rows] == [(case.dataset, case.name) for case in CASES]
    for row, case in zip(rows, CASES):
        assert (case.expect == OK) == row[2].startswith("handled"), row
        if case.expect != OK:
            assert case.expect in row[2], (case.expect, row)
