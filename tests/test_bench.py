"""Benchmarks and bench tools: the capture benchmark runs and prints its ratios (a smoke run; timings
themselves are not checked); the toy seed sweep's overlays and spread table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_capture_benchmark_quick_run_prints_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_capture.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "capture/plain" in result.stdout and "eager/plain" in result.stdout


def _toy_seeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_seeds", ROOT / "bench" / "toy_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_seed_overlay_moves_every_artifact_into_the_seed_folder_and_is_valid():
    import yaml
    from snakemake.utils import validate

    from stages.config import read_sections

    config = read_sections(ROOT / "config.yaml")
    overlay = _toy_seeds().seed_overlay(3, "results/seeds/seed-3", "test", config["variants"])
    for key, value in overlay.items():          # the deep merge Snakemake does for --configfile overlays
        if isinstance(value, dict):
            for name, item in value.items():
                config[key][name] = {**config[key].get(name, {}), **item} if isinstance(item, dict) else item
        else:
            config[key] = value
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    assert config["train"]["lmm"]["seed"] == config["train"]["sam"]["seed"] == config["train"]["sd"]["seed"] == 3
    paths = yaml.safe_dump({"datasets": config["datasets"], "variants": config["variants"], "lmm": config["lmm"],
                            "sam": config["sam"]})
    assert "results/synthetic" not in paths and "results/models" not in paths
    assert config["datasets"]["toy_gcg"]["mask_gt"] == "results/seeds/seed-3/synthetic/test_gcg_coco_mask_gt.json"


def test_toy_seed_spread_rows_give_mean_range_and_sample_std():
    toy_seeds = _toy_seeds()
    labels = [toy_seeds.run_label(0, "native"), toy_seeds.run_label(1, "native"), toy_seeds.run_label(0, "avx2")]
    assert labels == ["seed 0", "seed 1", "seed 0 avx2"]
    summaries = {label: [{"run": "main", "task": "gcg", "recall": value, "AP50": None}]
                 for label, value in zip(labels, (0.3, 0.5, 0.4))}
    (row,) = toy_seeds.spread_rows(summaries)      # AP50 is missing in a run: left out, not averaged
    assert row["metric"] == "recall" and row["values"] == {"seed 0": 0.3, "seed 1": 0.5, "seed 0 avx2": 0.4}
    assert row["mean"] == pytest.approx(0.4) and (row["min"], row["max"]) == (0.3, 0.5)
    assert row["std"] == pytest.approx(0.1)
    table = toy_seeds.markdown([row])
    assert "| run | task | metric | seed 0 | seed 1 | seed 0 avx2 | mean | min-max | std |" in table
    assert "| main | gcg | recall | 0.300 | 0.500 | 0.400 | 0.400 | 0.300-0.500 | 0.100 |" in table
    assert "held in every run" in table


def test_toy_seed_goals_name_every_run_that_misses_one():
    toy_seeds = _toy_seeds()
    summaries = {"seed 0": [{"run": "main", "task": "instance_seg", "point_accuracy": 0.80, "AP50": 0.29}],
                 "seed 0 avx2": [{"run": "main", "task": "instance_seg", "point_accuracy": 0.69, "AP50": 0.31}]}
    rows = toy_seeds.spread_rows(summaries)
    assert toy_seeds.goal_misses(rows) == ["seed 0 avx2: main instance_seg point_accuracy 0.690 < 0.7",
                                           "seed 0: main instance_seg AP50 0.290 < 0.3"]
    assert "missed: seed 0 avx2" in toy_seeds.markdown(rows)


def test_toy_seed_kernel_sets_select_the_kernels_torch_reports():
    """Each kernel set's environment makes torch report its CPU capability (default: the portable kernels,
    which every x86-64 processor has)."""
    assert _toy_seeds().kernel_capability("default") == "DEFAULT"


def test_toy_seed_overlay_seeds_the_tower_comparison_variant_and_leaves_other_variants_alone():
    import yaml

    towers = yaml.safe_load((ROOT / "config" / "toy-towers.yaml").read_text())["variants"]
    variants = {**yaml.safe_load((ROOT / "config.yaml").read_text())["variants"], **towers,
                "hub_model": {"lmm": {"path": "llava-hf/llava-1.5-7b-hf"}}}
    overlay = _toy_seeds().seed_overlay(1, "results/seeds/seed-1", "test", variants)
    assert overlay["variants"] == {"random_lmm": {"lmm": {"path": "results/seeds/seed-1/models/toy-llava-random"}},
                                   "unet_tower": {"lmm": {"path": "results/seeds/seed-1/models/toy-difflmm"}}}
    assert overlay["train"]["sd"] == {"seed": 1}
