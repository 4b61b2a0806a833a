"""Seed and processor spread of the embedded toy run: the default workflow once per training seed and
kernel set, and the mean and spread of every headline number.

For each seed K the toy LMM and the toy SAM are trained with seed K (``train.lmm.seed`` and
``train.sam.seed``; the toy world, its splits and everything else as in ``config.yaml``) and the whole
DAG runs into ``<out>/seed-K`` (its config overlay ``<out>/seed-K.yaml`` sits beside it). With
``--kernels``, each seed runs once per kernel set (:data:`KERNEL_SETS`): the CPU float kernels torch and
oneDNN use, which decide how the trainers' sums are rounded and so which trajectory training follows, as
another processor's kernels do. ``native`` is what this processor picks; ``avx2`` is what a processor with
AVX2 and no AVX-512 picks (on a processor that has AVX-512: run on one with AVX2 only, ``avx2`` and
``native`` give the same numbers); ``default`` torch's portable kernels and oneDNN's SSE4.1 ones. A run
of kernel set S goes into ``<out>/seed-K-S`` (``native``: ``<out>/seed-K``). The table gives, for every
run (main and controls) and headline metric, the value of each (seed, kernel set), the mean, the smallest
and largest value and the sample standard deviation over all of them, and whether the miniature's goals
(:data:`GOALS`) hold in every one; it is printed and written to ``<out>/seeds.md`` and ``<out>/seeds.json``.
Seed 0 with the native kernels is the default run.

Usage (about 5-6 min per seed and kernel set on 2 CPU cores)::

    .venv/bin/python bench/toy_seeds.py --seeds 0 1 2 [--kernels native avx2 default] [--out results/seeds] \\
        [--cores 2] [--overlay config/toy-val.yaml]

``--overlay``: a config overlay applied before each seed's, e.g. config/toy-val.yaml to measure the
spread on val, or config/toy-towers.yaml to train and evaluate the toy DiffLMM with every seed too (its
``out`` and paths are replaced by the seed's folder; the toy Stable Diffusion is trained with the seed as
well, ``train.sd.seed``). With config/toy-towers.yaml a seed takes about 25 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.toy.world import toy_dataset_files  # noqa: E402 (after the repository is on the path)

# Headline numbers of each task, as the summary names them: (task, metric key in summary.json).
HEADLINES = (("instance_seg", "point_accuracy"), ("instance_seg", "point_chance"), ("instance_seg", "AP50"),
             ("instance_seg", "AP"),
             ("gcg", "AP50"), ("gcg", "mIoU"), ("gcg", "recall"), ("gcg", "METEOR"), ("res", "gIoU"),
             ("png", "AA"))
# The miniature's goals: (run, task, metric) -> the least value every seed and kernel set must reach.
GOALS = {("main", "instance_seg", "point_accuracy"): 0.70, ("main", "instance_seg", "AP50"): 0.30,
         ("main", "gcg", "recall"): 0.30}
# Kernel set -> the environment that selects it (torch's ATen CPU capability, oneDNN's highest ISA).
KERNEL_SETS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41"},
}


def run_label(seed: int, kernels: str) -> str:
    """A run's name in the table and its folder's suffix: "seed 2", "seed 2 avx2"."""
    return f"seed {seed}" if kernels == "native" else f"seed {seed} {kernels}"


def kernel_capability(kernels: str) -> str:
    """The CPU capability torch reports under ``kernels``' environment (e.g. "AVX512", "AVX2", "DEFAULT")."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env={**os.environ, **KERNEL_SETS[kernels]}).stdout.strip()


def seed_overlay(seed: int, folder: str, split: str, variants: dict[str, dict]) -> dict:
    """Config overlay that trains every toy model with ``seed`` and puts every artifact under ``folder``.

    ``variants``: the run's variants (``config.yaml``'s and its overlays'); each whose LMM is one the workflow
    builds (a path under ``results/``) reads the seed's own build of it instead.
    """
    synthetic = f"{folder}/synthetic"
    seeded_variants = {name: {"lmm": {"path": folder + variant["lmm"]["path"].removeprefix("results")}}
                       for name, variant in variants.items()
                       if str((variant.get("lmm") or {}).get("path", "")).startswith("results/")}
    return {
        "out": folder,
        "train": {"lmm": {"seed": seed}, "sam": {"seed": seed}, "sd": {"seed": seed}},
        "datasets": toy_dataset_files(synthetic, split),
        "variants": seeded_variants,
        "lmm": {"path": f"{folder}/models/toy-llava"},
        "sam": {"checkpoint": f"{folder}/models/toy-sam.safetensors"},
    }


def run_seed(seed: int, out: Path, cores: int, overlays: list[Path], kernels: str = "native") -> list[dict]:
    """Run the workflow for ``seed`` with the kernel set ``kernels``; return its summary rows."""
    split = "test"
    variants = dict(yaml.safe_load((ROOT / "config.yaml").read_text())["variants"])
    for overlay in overlays:
        config = yaml.safe_load(overlay.read_text()) or {}
        split = config.get("synthetic", {}).get("split", split)
        for name, variant in (config.get("variants") or {}).items():
            variants[name] = {**variants.get(name, {}), **variant}
    name = f"seed-{seed}" if kernels == "native" else f"seed-{seed}-{kernels}"
    folder = out / name
    overlay_path = out / f"{name}.yaml"
    overlay_path.write_text(yaml.safe_dump(seed_overlay(seed, str(folder), split, variants), sort_keys=False))
    command = [str(Path(sys.executable).parent / "snakemake"), "--cores", str(cores), "--profile",
               "workflow/profiles/local", "--configfile", "config.yaml", *map(str, overlays), str(overlay_path)]
    label = run_label(seed, kernels)
    print(f"{label}: {' '.join(f'{k}={v}' for k, v in KERNEL_SETS[kernels].items())} {' '.join(command)}",
          flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, **KERNEL_SETS[kernels]})
    print(f"{label}: workflow finished in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((folder / "summary.json").read_text())


def spread_rows(summaries: dict[str, list[dict]]) -> list[dict]:
    """Per run and headline metric: values per seed (and kernel set: ``summaries`` maps each run label to
    its summary rows), mean, min, max and sample standard deviation."""
    rows = []
    runs = dict.fromkeys(row["run"] for rows_ in summaries.values() for row in rows_)
    for run in runs:
        for task, metric in HEADLINES:
            values = {seed: row[metric] for seed, rows_ in summaries.items() for row in rows_
                      if row["run"] == run and row["task"] == task and row.get(metric) is not None}
            if len(values) != len(summaries):
                continue
            numbers = list(values.values())
            rows.append({"run": run, "task": task, "metric": metric, "values": values,
                         "mean": statistics.fmean(numbers), "min": min(numbers), "max": max(numbers),
                         "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0})
    return rows


def goal_misses(rows: list[dict]) -> list[str]:
    """Each (seed, kernel set) whose headline number is under its goal (:data:`GOALS`), as text."""
    misses = []
    for row in rows:
        least = GOALS.get((row["run"], row["task"], row["metric"]))
        misses += [f"{label}: {row['run']} {row['task']} {row['metric']} {value:.3f} < {least}"
                   for label, value in row["values"].items() if least is not None and value < least]
    return misses


def markdown(rows: list[dict]) -> str:
    seeds = list(rows[0]["values"]) if rows else []
    lines = ["| run | task | metric | " + " | ".join(str(s) for s in seeds) + " | mean | min-max | std |",
             "|---|---|---|" + "---|" * (len(seeds) + 3)]
    for row in rows:
        values = " | ".join(f"{row['values'][s]:.3f}" for s in seeds)
        lines.append(f"| {row['run']} | {row['task']} | {row['metric']} | {values} | {row['mean']:.3f} | "
                     f"{row['min']:.3f}-{row['max']:.3f} | {row['std']:.3f} |")
    misses = goal_misses(rows)
    goals = ", ".join(f"{run} {task} {metric} >= {least}" for (run, task, metric), least in GOALS.items())
    lines += ["", f"Goals ({goals}): " + ("held in every run." if not misses else "missed: " + "; ".join(misses))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNEL_SETS), default=["native"],
                        help="kernel sets to run each seed with (default: native)")
    parser.add_argument("--out", type=Path, default=Path("results/seeds"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="config overlay applied before each seed's (e.g. config/toy-val.yaml)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    capabilities = {kernels: kernel_capability(kernels) for kernels in args.kernels}
    summaries = {run_label(seed, kernels): run_seed(seed, args.out, args.cores, args.overlay, kernels)
                 for kernels in args.kernels for seed in args.seeds}
    rows = spread_rows(summaries)
    (args.out / "seeds.json").write_text(json.dumps({"torch_cpu_capability": capabilities, "rows": rows},
                                                    indent=1))
    (args.out / "seeds.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
