"""The real DAG on the embedded default (tiny random models): dry runs, a full run, a partial rerun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


# The shipped config with its toy training cut to a few steps (the workflow, not the models, is tested).
FAST = {"synthetic": {"num_images": 6, "seed": 0, "image_size": [96, 160], "split": "test"},
        "train": {"lmm": {"num_train_images": 32, "steps": 4, "batch_size": 4, "lr": 0.003, "seed": 0},
                  "sam": {"num_train_images": 8, "steps": 2, "batch_size": 4, "lr": 0.005, "seed": 0}}}


def write_config(workdir: Path, **overrides) -> dict:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config.update(FAST)
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Rule -> number of jobs a dry run would execute now."""
    out = snakemake(workdir, "--cores", "2", "--dry-run").stdout
    table = out.split("Job stats:", 1)[1] if "Job stats:" in out else ""
    jobs = {}
    for line in table.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s+(\d+)\s*", line)
        if match and match.group(1) not in ("job", "total"):
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def planned_gpus(workdir: Path) -> dict[tuple[str, str], set[int]]:
    """(rule, run) -> the `gpu` resource values its jobs request in a dry run (0: none requested)."""
    out = snakemake(workdir, "--cores", "2", "--dry-run").stdout
    requests: dict[tuple[str, str], set[int]] = {}
    for block in re.split(r"^rule ", out, flags=re.MULTILINE)[1:]:
        rule = block.split(":", 1)[0]
        run = re.search(r"^\s+wildcards:.*\brun=([\w-]+)", block, flags=re.MULTILINE)
        gpu = re.search(r"^\s+resources:.*\bgpu=(\d+)", block, flags=re.MULTILINE)
        requests.setdefault((rule, run.group(1) if run else ""), set()).add(int(gpu.group(1)) if gpu else 0)
    return requests


def test_dry_run_plans_every_stage_per_shard(tmp_path):
    config = write_config(tmp_path, shards=3)
    jobs = planned_jobs(tmp_path)
    datasets, runs = 2, 1 + len(config["variants"])
    assert runs == 3
    assert jobs["generate"] == jobs["phrases"] == jobs["segment"] == 3 * datasets * runs
    assert jobs["manifest"] == datasets
    assert jobs["evaluate_instance_seg"] == jobs["evaluate_gcg"] == runs
    assert jobs["synthetic_data"] == jobs["train_lmm"] == jobs["random_lmm"] == jobs["train_sam"] == 1


def test_each_variant_runs_every_data_set_again(tmp_path):
    write_config(tmp_path, shards=2, variants={"max_pool": {"segment": {"pool": "max"}}})
    jobs = planned_jobs(tmp_path)
    assert jobs["generate"] == jobs["segment"] == 2 * 2 * 2
    assert jobs["manifest"] == 2 and jobs["summary"] == 1
    # Without the random_lmm variant the untrained twin is built for the toy diagnostics only.
    assert jobs["random_lmm"] == jobs["toy_diagnostics"] == 1


def test_generate_jobs_ask_for_their_runs_lmm_gpus(tmp_path):
    """A variant with lmm.gpus 2 (a model larger than one GPU) asks gpu=2 for its generate jobs only;
    the main run keeps the default 1, segment always 1, CPU rules none."""
    write_config(tmp_path, variants={"big": {"lmm": {"gpus": 2}}})
    requests = planned_gpus(tmp_path)
    assert requests[("generate", "big")] == {2}
    assert requests[("generate", "main")] == {1}
    assert requests[("segment", "big")] == requests[("segment", "main")] == {1}
    assert requests[("phrases", "big")] == {0} and requests[("manifest", "")] == {0}


@pytest.mark.parametrize("override, named", [
    ({"segment": {"pooling": "max"}}, "variants.bad.segment"),
    ({"segment": {"pool": "median"}}, "variants.bad.segment.pool"),
    ({"training": {}}, "training"),
    ({"lmm": {"gpus": 0}}, "variants.bad.lmm.gpus"),
])
def test_bad_variant_override_is_named(tmp_path, override, named):
    write_config(tmp_path, variants={"bad": override})
    result = snakemake(tmp_path, "--cores", "1", "--dry-run", check=False)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr


def test_bad_data_set_override_is_named(tmp_path):
    datasets = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]
    datasets["toy_gcg"]["segment"] = {"pool": "median"}
    write_config(tmp_path, datasets=datasets)
    result = snakemake(tmp_path, "--cores", "1", "--dry-run", check=False)
    assert result.returncode != 0
    assert "datasets.toy_gcg.segment.pool" in result.stdout + result.stderr


def test_lint_finds_nothing_but_the_missing_conda_envs(tmp_path):
    """The only lint is "Specify a conda environment or container": software comes from pyproject.toml."""
    write_config(tmp_path)
    result = snakemake(tmp_path, "--lint", check=False)
    lints = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("    * ")}
    assert lints <= {"* Specify a conda environment or container for each rule.:"}, lints


def test_bad_config_stops_with_the_key_named(tmp_path):
    config = write_config(tmp_path)
    config["segment"]["pooling"] = "mean"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--cores", "1", "--dry-run", check=False)
    assert result.returncode != 0
    assert "pooling" in result.stdout + result.stderr


def test_slurm_profile_dry_run_asks_a_gpu_for_gpu_rules_only(tmp_path):
    write_config(tmp_path)
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    result = snakemake(tmp_path, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--dry-run",
                       "--printshellcmds")
    assert "generate" in result.stdout and "segment" in result.stdout
    # The GPU request lives on the rules themselves: gpu=1 for segment, the run's lmm.gpus for generate.
    for rule_file, gpu in [("generate.smk", "gpu=generate_gpus"), ("segment.smk", "gpu=1"),
                           ("phrases.smk", None), ("evaluate.smk", None), ("manifest.smk", None)]:
        text = (ROOT / "workflow" / "rules" / rule_file).read_text()
        assert ("gpu=" in text) == (gpu is not None) and (gpu is None or gpu in text), rule_file


@pytest.mark.slow
def test_default_dag_runs_and_reruns_only_the_deleted_shard(tmp_path):
    write_config(tmp_path, shards=2)
    snakemake(tmp_path, "--cores", "2")
    out = tmp_path / "results"
    run = out / "main"
    for dataset, task in [("toy_instances", "instance_seg"), ("toy_gcg", "gcg")]:
        metrics = json.loads((run / dataset / "metrics" / f"{task}.json").read_text())
        assert task in metrics
        assert metrics[task]["num_images"] > 0
        for shard in (0, 1):
            assert (run / dataset / "masks" / f"shard-{shard}.parquet").exists()
            assert (run / dataset / "attention" / f"shard-{shard}.zarr").is_dir()
        assert list((run / dataset / "visualize").glob("*_overlay.png"))
    assert "point_accuracy" in (out / "summary.md").read_text()
    for rule in ("generate", "phrases", "segment"):
        assert list((out / "logs" / rule).rglob("*.log")) and list((out / "benchmarks" / rule).rglob("*.tsv"))
    assert planned_jobs(tmp_path) == {}
    snakemake(tmp_path, "--report", "report.html")
    report = (tmp_path / "report.html").read_text(errors="replace")
    assert "toy_test_000000_overlay.png" in report and "instance_seg.json" in report
    summary = json.loads((out / "summary.json").read_text())
    assert {row["run"] for row in summary} == {"main", "random_lmm", "attention_only"}

    deleted = run / "toy_instances" / "masks" / "shard-1.parquet"
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if p != deleted}
    deleted.unlink()
    jobs = planned_jobs(tmp_path)
    assert jobs.pop("segment") == 1
    assert set(jobs) <= {"evaluate_instance_seg", "visualize", "summary", "all"}, jobs
    assert "evaluate_instance_seg" in jobs
    snakemake(tmp_path, "--cores", "2")
    assert deleted.exists()
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"

    # Changing one stage's section reruns that stage and what follows, nothing before.
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["segment"]["pool"] = "max"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(tmp_path)
    runs = 1 + len(config["variants"])
    assert jobs.get("segment") == 2 * 2 * runs and "generate" not in jobs and "phrases" not in jobs, jobs


@pytest.mark.slow
def test_data_sets_run_with_their_own_settings_and_rerun_alone(tmp_path):
    """One workflow, two data sets with different segment settings (instance segmentation keeps SAM's
    three masks and mean-pools, GCG keeps one and max-pools: the release's two settings). Changing one
    data set's settings reruns that data set's jobs and nothing of the other's."""
    datasets = yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]
    datasets["toy_instances"]["segment"] = {"more_masks": True}
    # The toy LMM is barely trained here: keep every phrase whatever category it is closest to.
    datasets["toy_instances"]["phrases"] = {"category_thresh": -1.0}
    datasets["toy_gcg"]["segment"] = {"pool": "max"}
    write_config(tmp_path, shards=1, variants={}, datasets=datasets)
    snakemake(tmp_path, "--cores", "2")
    run = tmp_path / "results" / "main"
    for dataset, expected in [("toy_instances", [0, 1, 2]), ("toy_gcg", [2])]:
        masks = pd.read_parquet(run / dataset / "masks" / "shard-0.parquet")
        masks = masks[masks["error"].isna()]
        per_phrase = masks.groupby(["image_id", "phrase_index"])["mask_index"].apply(sorted)
        assert len(per_phrase) and all(indices == expected for indices in per_phrase), (dataset, per_phrase)
    assert planned_jobs(tmp_path) == {}

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["datasets"]["toy_gcg"]["segment"]["pool"] = "mean"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry_run = snakemake(tmp_path, "--cores", "1", "--dry-run").stdout
    assert re.search(r"params have changed since last execution:\s+segment\s", dry_run), dry_run
    assert "output: results/main/toy_gcg/masks/shard-0.parquet" in dry_run
    assert "output: results/main/toy_instances/masks/shard-0.parquet" not in dry_run
    jobs = planned_jobs(tmp_path)
    assert jobs.pop("segment") == 1 and jobs.pop("evaluate_gcg") == 1 and jobs.pop("visualize") == 1, jobs
    assert set(jobs) <= {"summary", "all"}, jobs
