"""The real DAG on the embedded default (toy models, FAST training): dry runs, a full run and its report in
headless Chromium, a second run that writes the same artifacts, a partial rerun."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import Browser, chromium_executable
from conftest import copy_run
from PIL import Image

from stages.io.attention import attention_attrs, open_attention
from stages.io.tables import read_metadata

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], check=False, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


# The shipped config with its toy training cut to a few steps (the workflow, not the models, is tested).
FAST = {"synthetic": {"num_images": 6, "seed": 0, "image_size": [96, 160], "split": "test"},
        "train": {"lmm": {"num_train_images": 32, "steps": 4, "batch_size": 4, "lr": 0.003, "seed": 0},
                  "sam": {"num_train_images": 8, "steps": 2, "batch_size": 4, "lr": 0.005, "seed": 0}}}


# The shipped config's referring-expression and narrative data sets. The default DAG of the tests leaves them
# out: they add about 40 jobs to each run of it (two minutes of the suite in each of the two shared runs) and
# no case of the workflow the other data sets do not exercise; their own test runs them on a copy of the
# default run (test_referring_and_narrative_data_sets_run_on_the_default_models), and the presets' end-to-end
# test runs RES and PNG through the workflow on fabricated checkpoints.
REFERRING_DATASETS = ("toy_res", "toy_png")


def write_config(workdir: Path, referring: bool = False, **overrides) -> dict:
    """The shipped config with FAST toy training and ``overrides``, without :data:`REFERRING_DATASETS` unless
    ``referring``, written to ``workdir/config.yaml``."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    if not referring:
        config["datasets"] = {name: entry for name, entry in config["datasets"].items()
                              if name not in REFERRING_DATASETS}
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


def test_towers_overlay_plans_the_toy_difflmm_beside_the_default_runs(tmp_path):
    """config/toy-towers.yaml adds the unet_tower run: the toy SD and the toy DiffLMM are trained for it
    alone (the default run trains neither)."""
    from snakemake.utils import update_config

    write_config(tmp_path / "default")
    assert "pretrain_toy_sd" not in planned_jobs(tmp_path / "default")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config" / "toy-towers.yaml").read_text()))
    write_config(tmp_path, variants=config["variants"])
    jobs = planned_jobs(tmp_path)
    assert config["variants"]["unet_tower"]["lmm"] == {"family": "difflmm", "path": "results/models/toy-difflmm"}
    assert jobs["pretrain_toy_sd"] == jobs["train_toy_difflmm"] == jobs["train_lmm"] == 1
    # Two data sets, main + random_lmm + unet_tower (attention_only reads main's answers and phrases).
    assert jobs["generate"] == jobs["phrases"] == 2 * 3 and jobs["segment"] == 2 * 4


def test_dry_run_plans_every_stage_per_shard(tmp_path):
    config = write_config(tmp_path, shards=3)
    jobs = planned_jobs(tmp_path)
    datasets, runs = 2, 1 + len(config["variants"])
    assert runs == 3
    assert jobs["segment"] == 3 * datasets * runs
    # attention_only changes only how masks are made: it reads main's answers, attention and phrases.
    assert jobs["generate"] == jobs["phrases"] == 3 * datasets * (runs - 1)
    assert jobs["manifest"] == datasets
    assert jobs["evaluate_instance_seg"] == jobs["evaluate_gcg"] == runs
    assert jobs["synthetic_data"] == jobs["train_lmm"] == jobs["random_lmm"] == jobs["train_sam"] == 1


def test_each_variant_runs_every_data_set_again_from_its_first_changed_stage(tmp_path):
    """A variant computes again what its settings change and reads the rest from main: one that changes
    the segment section only segments again, one that changes the phrases section extracts phrases again
    from main's answers, one that changes the question generates again."""
    write_config(tmp_path, shards=2, variants={"max_pool": {"segment": {"pool": "max"}}})
    jobs = planned_jobs(tmp_path)
    assert jobs["segment"] == 2 * 2 * 2 and jobs["generate"] == jobs["phrases"] == 2 * 2
    assert jobs["manifest"] == 2 and jobs["summary"] == 1
    # Without the random_lmm variant the untrained twin is built for the toy diagnostics only.
    assert jobs["random_lmm"] == jobs["toy_diagnostics"] == 1

    write_config(tmp_path, shards=2, variants={"chunk": {"phrases": {"token_match": "chunk"}},
                                               "ask": {"generate": {"question": "What is there?"}}})
    jobs = planned_jobs(tmp_path)
    # generate: main and ask; phrases: those and chunk; segment: every run (two data sets, two shards).
    assert (jobs["generate"], jobs["phrases"], jobs["segment"]) == (2 * 2 * 2, 2 * 2 * 3, 2 * 2 * 3)


def test_generate_jobs_ask_for_their_runs_lmm_gpus(tmp_path):
    """A variant with lmm.gpus 2 (a model larger than one GPU) asks gpu=2 for its generate jobs only;
    the main run keeps the default 1, segment always 1, CPU rules none. (A variant that changed lmm.gpus
    alone would generate nothing: where the model runs does not change its answers, so it reads main's.)"""
    write_config(tmp_path, variants={"big": {"lmm": {"gpus": 2, "path": "results/models/toy-llava-random"}}})
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


def planned_resources(out: str) -> dict[str, list[dict[str, str]]]:
    """Rule -> the resources of each of its jobs in a dry run's output (name -> value as printed)."""
    planned: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"^rule ", out, flags=re.MULTILINE)[1:]:
        resources = re.search(r"^\s+resources: (.*)$", block, flags=re.MULTILINE)
        pairs = re.findall(r"(\w+)=([^,]*)", resources.group(1)) if resources else []
        planned.setdefault(block.split(":", 1)[0], []).append(dict(pairs))
    return planned


def test_slurm_profile_dry_run_asks_a_gpu_for_gpu_rules_only(tmp_path):
    write_config(tmp_path)
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    result = snakemake(tmp_path, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--dry-run",
                       "--printshellcmds")
    assert "generate" in result.stdout and "segment" in result.stdout
    # The GPU request lives on the rules themselves: gpu=1 for segment, the run's lmm.gpus for generate.
    for rule_file, gpu in [("generate.smk", "gpu=generate_gpus"), ("segment.smk", "gpu=gpus(1)"),
                           ("phrases.smk", None), ("evaluate.smk", None), ("manifest.smk", None)]:
        text = (ROOT / "workflow" / "rules" / rule_file).read_text()
        assert ("gpu=" in text) == (gpu is not None) and (gpu is None or gpu in text), rule_file
    planned = planned_resources(result.stdout)
    assert {int(job["gpu"]) for rule in ("generate", "segment") for job in planned[rule]} == {1}
    assert all("gpu" not in job for rule, jobs in planned.items() if rule not in ("generate", "segment")
               for job in jobs)


def test_slurm_partitions_and_gpu_requests_come_from_the_config(tmp_path):
    """The profile names no partition: every job's slurm_partition is the config's (cluster section), GPU
    rules' the GPU partition; with cluster.request_gpus false the GPU rules ask for no GPU."""
    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert "slurm_partition" not in profile["default-resources"]
    assert not any("slurm_partition" in resources for resources in profile["set-resources"].values())
    write_config(tmp_path, cluster={"cpu_partition": "short-cpu", "gpu_partition": "a100-nodes",
                                    "request_gpus": False})
    out = snakemake(tmp_path, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--dry-run").stdout
    planned = planned_resources(out)
    assert {"generate", "segment", "phrases", "train_lmm", "summary"} <= set(planned)
    for rule, jobs in planned.items():
        if rule == "all":               # the target rule runs nothing
            continue
        gpu_rule = rule in ("generate", "segment")
        for job in jobs:
            assert job.get("slurm_partition") == ("a100-nodes" if gpu_rule else "short-cpu"), (rule, job)
            assert job.get("gpu") == ("0" if gpu_rule else None), (rule, job)


# Driving the report's single-page app (Snakemake's React report: a menu of categories, a table of
# results per subcategory, an eye button that shows a result, images in an <img>, HTML in an <iframe>).
REPORT_HELPERS = """
window.__links = (text) => [...document.querySelectorAll('#app nav a')].filter(a => a.innerText.trim() === text);
window.__row = (label) => {
  const rows = [...document.querySelectorAll('#app nav table tbody tr')]
    .filter(tr => tr.cells[0].innerText.trim() === label);
  if (rows.length !== 1) throw new Error(`${rows.length} result rows "${label}"`);
  return rows[0];
};
window.__rowLabels = () => [...document.querySelectorAll('#app nav table tbody tr')]
  .map(tr => tr.cells[0].innerText.trim());
window.__view = (label) => { __row(label).querySelector('a[iconname=eye]').click(); return true; };
window.__shown = () => {          // the image the content pane shows, once it has loaded
  const img = document.querySelector('#app img[src^="data:image/png"]');
  if (!img || !img.complete || img.naturalWidth === 0 || img.src !== results[app.state.resultPath].data_uri)
    return null;
  const box = img.getBoundingClientRect();
  return {path: app.state.resultPath, natural: [img.naturalWidth, img.naturalHeight],
          box: [box.left, box.top, box.width, box.height]};
};
true
"""

# Every embedded figure, decoded by the browser: path -> natural [width, height].
DECODE_FIGURES = """
Promise.all(Object.entries(results).filter(([path, result]) => result.mime_type === 'image/png')
  .map(async ([path, result]) => {
    const img = new Image();
    img.src = result.data_uri;
    await img.decode();
    return [path, [img.naturalWidth, img.naturalHeight]];
  })).then(Object.fromEntries)
"""

# In the iframe of an HTML result: its tables, header cells, first-column cells and rendered size.
TABLES = """
[...document.querySelectorAll('table')].map(table => {
  const box = table.getBoundingClientRect();
  return {headers: [...table.querySelectorAll('th')].map(th => th.innerText.trim()),
          first_column: [...table.querySelectorAll('tbody tr')].map(tr => tr.cells[0].innerText.trim()),
          size: [box.width, box.height]};
})
"""


def assert_painted(png: bytes, box, name: str, *, min_colours: int) -> None:
    """The region ``box`` (left, top, width, height in CSS pixels) of a screenshot is no blank area: it
    holds at least ``min_colours`` distinct colours and no colour covers 95% of it."""
    left, top, width, height = (round(v) for v in box)
    assert width > 20 and height > 20, (name, box)
    region = Image.open(io.BytesIO(png)).convert("RGB").crop((left, top, left + width, top + height))
    colours = sorted(region.getcolors(maxcolors=1 << 24), reverse=True)
    assert len(colours) >= min_colours, f"{name}: {len(colours)} colours"
    assert colours[0][0] < 0.95 * region.width * region.height, f"{name}: one colour covers the region"


def chromium_or_skip() -> str:
    """Chromium's path; without one the test is skipped, except in CI (CI set), where it fails: .ci/run
    installs it."""
    executable = chromium_executable()
    if executable is None:
        message = "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI", "") not in ("", "0", "false"):
            pytest.fail(f"CI: {message}")
        pytest.skip(message)
    return executable


def test_without_chromium_the_report_test_skips_except_in_ci(monkeypatch):
    monkeypatch.setenv("CHROMIUM", "no-such-browser-aas")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        chromium_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: no chromium"):
        chromium_or_skip()


@pytest.mark.slow
def test_report_opens_in_chromium_with_its_figures_and_tables(request, tmp_path):
    """The default DAG's report in headless Chromium, clicked through as a reader would: every embedded
    figure decodes at its PNG's size; each image's overlay and attention grid show, with their captions;
    the summary and the toy diagnostics are rendered tables with the metrics' names and every run; the
    runtime statistics are drawn. Screenshots (kept in the test's folder) are not blank."""
    executable = chromium_or_skip()
    workdir = request.getfixturevalue("default_run")
    out = workdir / "results"
    shots = tmp_path / "report-screenshots"
    shots.mkdir()
    pngs = {str(path.relative_to(workdir)): path for path in out.glob("*/*/visualize/*.png")}
    assert pngs

    with Browser(executable, width=1400, height=1000) as browser:
        def click(text: str) -> None:
            browser.wait_for(f"__links({text!r}).length === 1")
            browser.evaluate(f"__links({text!r})[0].click()")

        def screenshot(name: str) -> bytes:
            png = browser.screenshot()
            (shots / f"{name}.png").write_bytes(png)
            return png

        browser.open((workdir / "report.html").as_uri())
        browser.wait_for("typeof app !== 'undefined' && document.querySelectorAll('#app nav a').length > 0")
        browser.evaluate(REPORT_HELPERS)
        page = browser.evaluate("document.body.innerText")
        for entry in ("Workflow", "Statistics", "Summary", "Overlays", "Metrics", "Attend-and-segment"):
            assert entry in page, entry
        # The front page names the run's own folders (workflow/report/workflow.rst renders the config's out).
        assert "results/logs/" in page and "results/benchmarks/" in page and "{out}" not in page, page

        # Every figure of every run and data set is in the report and decodes at its PNG's size.
        decoded = browser.evaluate(DECODE_FIGURES)
        assert set(decoded) == set(pngs)
        for path, size in decoded.items():
            assert tuple(size) == Image.open(pngs[path]).size, path

        # Overlays -> main: toy_gcg: each image's masks and points, then (toggle) its attention grid.
        click("Overlays")
        click("main: toy_gcg")
        images = browser.wait_for("__rowLabels().length > 0 && __rowLabels()")
        assert images == sorted({Path(p).name.rsplit("_", 1)[0] for p in pngs if "/main/toy_gcg/" in p})
        for figure, suffix, described in (("masks and points", "overlay", "the masks"),
                                          ("per-token attention", "attention", "the attention grid")):
            browser.evaluate(f"document.getElementById('toggle-figure-{figure}').click()")
            for image in images:
                browser.evaluate(f"__view({image!r})")
                shown = browser.wait_for("(() => { const s = __shown(); "
                                         f"return s && s.path.endsWith('/{image}_{suffix}.png') && s; }})()")
                assert shown["box"][2] > 0 and shown["box"][3] > 0, shown
                caption = browser.evaluate("results[app.state.resultPath].caption")
                assert described in caption and "run <tt" in caption, caption
            assert_painted(screenshot(f"{suffix}-{image}"), shown["box"], f"{suffix} of {image}", min_colours=50)
            # The information button shows the caption in the menu pane; the breadcrumb leads back.
            browser.evaluate(f"__row({image!r}).querySelector('a[iconname=information-circle]').click()")
            browser.wait_for(f"document.querySelector('#app nav').innerText.includes({described!r})")
            assert f"{image} of data set toy_gcg, run main" in browser.evaluate(
                "document.querySelector('#app nav').innerText")
            click("main: toy_gcg")

        # Summary: the metrics of every run, one table per task; the toy diagnostics.
        summary = json.loads((out / "summary.json").read_text())
        expected = {   # label -> (file, header cells, first-column cells, number of rows)
            "metrics of every run and data set": (
                "summary.html", {"point_accuracy", "AP50", "AR100", "METEOR", "CIDEr", "mIoU", "recall"},
                {row["run"] for row in summary}, len(summary)),
            "toy LMM diagnostics (val split)": (
                "toy_diagnostics.html", {"point accuracy", "shape given colour"}, {"trained", "untrained"}, 2),
        }
        click("Results")
        click("Summary")
        for label, (name, headers, first_column, rows) in expected.items():
            browser.wait_for(f"__rowLabels().includes({label!r})")
            browser.evaluate(f"__view({label!r})")
            uri = browser.wait_for(
                "(() => { const f = document.querySelector('#app iframe'); "
                f"return f && app.state.resultPath.endsWith('/{name}') && f.src === results[app.state.resultPath]"
                ".data_uri && f.getBoundingClientRect().width > 0 && f.src; })()")
            frame = browser.wait_for_frame(uri)
            browser.wait_for("document.readyState === 'complete' && document.querySelector('table') !== null",
                             frame=frame)
            tables = browser.evaluate(TABLES, frame=frame)
            assert tables and all(t["size"][0] > 0 and t["size"][1] > 0 for t in tables), tables
            assert headers <= {h for t in tables for h in t["headers"]}, tables
            assert first_column == {c for t in tables for c in t["first_column"]}, tables
            assert sum(len(t["first_column"]) for t in tables) == rows, tables
            box = browser.evaluate("(b => [b.left, b.top, b.width, b.height])"
                                   "(document.querySelector('#app iframe').getBoundingClientRect())")
            assert_painted(screenshot(name.removesuffix(".html")), box, label, min_colours=10)

        # Statistics: the jobs' runtimes by rule, drawn by Vega.
        click("Results")
        click("Statistics")
        box = browser.wait_for("(() => { const c = document.querySelector('#runtimes canvas, #runtimes svg'); "
                               "const b = c && c.getBoundingClientRect(); "
                               "return b && b.width > 0 && b.height > 0 && [b.left, b.top, b.width, b.height]; })()")
        rules = set(browser.evaluate("runtimes_spec.data.values.map(value => value.rule)"))
        assert {"train_lmm", "generate", "phrases", "segment", "visualize", "summary"} <= rules, rules
        assert_painted(screenshot("statistics"), box, "runtimes", min_colours=10)


@pytest.mark.slow
def test_a_second_run_from_scratch_writes_the_same_artifacts_and_metrics(second_run, default_run):
    """Two runs of the default config give equal tables (content and metadata, the provenance record
    included), attention stores and metrics. The second (conftest.py, `second_run`: on the single-node Slurm
    where the machine has one, else locally) runs the main run again in a fresh work directory: it draws
    the world, trains both toy models and runs every stage again. The records being equal also says both
    runs trained bit-identical models (their content hashes)."""
    tasks = {"toy_instances": "instance_seg", "toy_gcg": "gcg"}
    first, second = default_run / "results", second_run.workdir / "results"
    tables = sorted(path.relative_to(second) for path in second.rglob("*.parquet"))
    assert len(tables) == len(tasks) * (1 + 2 * 3), tables    # a manifest, 2 shards of 3 tables each
    for table in tables:
        assert pd.read_parquet(second / table).equals(pd.read_parquet(first / table)), table
        assert read_metadata(second / table) == read_metadata(first / table), table
    stores = sorted(path.relative_to(second) for path in second.rglob("*.zarr"))
    assert len(stores) == len(tasks) * 2, stores
    for store in stores:
        assert attention_attrs(second / store) == attention_attrs(first / store), store
        assert np.array_equal(open_attention(second / store)[:], open_attention(first / store)[:]), store
    for dataset, task in tasks.items():
        metrics = [json.loads((out / "main" / dataset / "metrics" / f"{task}.json").read_text())
                   for out in (first, second)]
        assert metrics[0] == metrics[1] and metrics[0]["provenance"]["models"], dataset
    for name in ("toy_diagnostics.json", "summary.json"):
        assert (second / name).is_file(), name
    assert json.loads((second / "toy_diagnostics.json").read_text()) == \
        json.loads((first / "toy_diagnostics.json").read_text())


@pytest.mark.slow
def test_referring_and_narrative_data_sets_run_on_the_default_models(default_run, tmp_path):
    """The shipped toy_res and toy_png data sets, added to a copy of the default run (its models and synthetic
    data, one shard): RES asks about every object by its expression and grounds its head noun; PNG forces each
    true caption with own-position rows, and each point picks one of the world's own segments. (The controls
    take the same stages; prompt attention over a proposals data set: tests/test_proposals.py.)"""
    from stages.io.attention import attention_attrs

    workdir = copy_run(default_run, tmp_path / "run")
    write_config(workdir, referring=True, shards=1)
    out = workdir / "results"
    targets = ["results/main/toy_res/metrics/res.json", "results/main/toy_png/metrics/png.json"]
    snakemake(workdir, *targets, "--cores", "2")
    synthetic = out / "synthetic"
    instances = json.loads((synthetic / "instances.json").read_text())
    narratives = json.loads((synthetic / "png_coco_test.json").read_text())
    phrases = sum(bool(segment["segment_ids"]) for narrative in narratives
                  for segment in narrative["segments"])
    res = json.loads((out / "main" / "toy_res" / "metrics" / "res.json").read_text())["res"]
    assert res["num_samples"] == len(instances["annotations"])
    png = json.loads((out / "main" / "toy_png" / "metrics" / "png.json").read_text())["png"]
    assert png["num_phrases"] == phrases
    generations = pd.read_parquet(out / "main" / "toy_res" / "generations" / "shard-0.parquet")
    expressions = pd.read_parquet(out / "manifests" / "toy_res.parquet").set_index("sample_id")["expression"]
    assert all(f'Describe the "{expressions[g.sample_id]}".' in g.prompt for g in generations.itertuples())
    forced = pd.read_parquet(out / "main" / "toy_png" / "generations" / "shard-0.parquet")
    assert (forced["finish_reason"] == "forced").all()
    assert attention_attrs(out / "main" / "toy_png" / "attention" / "shard-0.zarr")["forced_rows"] == "own"
    segment_areas = {(str(a["image_id"]), s["area"]) for a in json.loads((synthetic / "panoptic_test.json")
                     .read_text())["annotations"] for s in a["segments_info"]}
    picked = pd.read_parquet(out / "main" / "toy_png" / "masks" / "shard-0.parquet")
    picked = picked[picked["error"].isna()]
    assert len(picked) and all((row.image_id, row.area) in segment_areas for row in picked.itertuples())
    assert not (out / "random_lmm" / "toy_res").exists()


@pytest.mark.slow
def test_default_dag_runs_and_reruns_only_the_deleted_shard(default_run, tmp_path):
    workdir = copy_run(default_run, tmp_path / "run")
    out = workdir / "results"
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
    assert planned_jobs(workdir) == {}
    report = (workdir / "report.html").read_text(errors="replace")
    assert "toy_test_000000_overlay.png" in report and "instance_seg.json" in report
    assert "summary.html" in report and "toy_diagnostics.html" in report
    summary = json.loads((out / "summary.json").read_text())
    assert {row["run"] for row in summary} == {"main", "random_lmm", "attention_only"}

    deleted = run / "toy_instances" / "masks" / "shard-1.parquet"
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if p != deleted}
    deleted.unlink()
    jobs = planned_jobs(workdir)
    assert jobs.pop("segment") == 1
    assert set(jobs) <= {"evaluate_instance_seg", "visualize", "summary", "all"}, jobs
    assert "evaluate_instance_seg" in jobs
    snakemake(workdir, "--cores", "2")
    assert deleted.exists()
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"

    # Changing one stage's section reruns that stage and what follows, nothing before.
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["segment"]["pool"] = "max"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(workdir)
    runs = 1 + len(config["variants"])
    assert jobs.get("segment") == 2 * 2 * runs and "generate" not in jobs and "phrases" not in jobs, jobs
