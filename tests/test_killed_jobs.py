"""Killed jobs: a crash (Snakemake and a job SIGKILLed) in the middle of a generate, a phrases and a segment
job, then the rerun the README prescribes (`snakemake --unlock`, then the same command with
`--rerun-incomplete`): it completes, nothing half-written is taken as done, and the shard's artifacts
equal those of the uninterrupted run (greedy decoding, the same models).

One workdir, to bound the time: a copy of the default DAG's run (the `default_run` fixture, conftest.py:
the uninterrupted run, the reference), whose shard's generate outputs are deleted; then the run is crashed
three times, each time further on. Each
job is held at its kill point by tests/kill_hook (a sitecustomize, active only in that rule's job), so
the kill lands mid-shard (generate: after its first image) or mid-write (phrases, segment: their table
half-written under its temporary name) however busy the machine is.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil  # a dependency of Snakemake
import pytest
from conftest import copy_run
from test_workflow import ROOT, SNAKEMAKE, snakemake

from stages.io.atomic import TMP_MARK
from stages.io.attention import attention_attrs, open_attention
from stages.io.tables import read_table

pytestmark = pytest.mark.slow

HOOK = Path(__file__).resolve().parent / "kill_hook"
SHARD = "results/main/toy_gcg/{}/shard-0.{}"
TABLES = {"generations": "generations", "phrases": "phrases", "masks": "masks"}
ATTENTION = SHARD.format("attention", "zarr")
TARGETS = [SHARD.format(kind, "parquet") for kind in TABLES] + [ATTENTION]
# What each killed job would have written.
OUTPUTS = {"generate": [SHARD.format("generations", "parquet"), ATTENTION],
           "phrases": [SHARD.format("phrases", "parquet")], "segment": [SHARD.format("masks", "parquet")]}
HOLD_TIMEOUT_S = 420


def artifacts(workdir: Path) -> dict:
    """The shard's tables (DataFrames), attention values (float16 array) and store attributes."""
    found = {kind: read_table(workdir / SHARD.format(kind, "parquet"), artifact)
             for kind, artifact in TABLES.items()}
    found["attention"] = np.asarray(open_attention(workdir / ATTENTION)[:])
    found["attention attrs"] = attention_attrs(workdir / ATTENTION)
    return found


def assert_same_artifacts(found: dict, expected: dict) -> None:
    for kind in TABLES:
        assert len(found[kind]) == len(expected[kind]) > 0, kind
        pd.testing.assert_frame_equal(found[kind], expected[kind], check_exact=True, obj=kind)
    assert found["attention"].size > 0
    np.testing.assert_array_equal(found["attention"], expected["attention"])
    assert found["attention attrs"] == expected["attention attrs"]


def crash(workdir: Path, rule: str, *args: str) -> tuple[Path, str]:
    """Run the workflow with the job of ``rule`` held at its kill point, then SIGKILL Snakemake (first,
    so that it cannot clean up: a crash), the held job and every other process of the run. Returns the
    held job's temporary output and Snakemake's output."""
    ready = workdir / f"held-{rule}"
    log_path = workdir / f"crash-{rule}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AAS_KILL_RULE": rule, "AAS_KILL_READY": str(ready),
           "PYTHONPATH": os.pathsep.join(p for p in [str(HOOK), str(ROOT), os.environ.get("PYTHONPATH")] if p)}
    with open(log_path, "w") as log:
        run = subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), "--cores", "2", *args, *TARGETS],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not ready.exists():
            if run.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the {rule} job never reached its kill point:\n{log_path.read_text()[-6000:]}")
            time.sleep(0.2)
        pid, temporary = ready.read_text().split()
        processes = psutil.Process(run.pid).children(recursive=True)
        held = psutil.Process(int(pid))
        assert held in processes and held.cmdline()[-1].endswith(f".{rule}.py"), held.cmdline()
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        held.kill()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    ready.unlink()
    return workdir / temporary, log_path.read_text()            # (a path relative to the workdir)


def test_killed_jobs_rerun_to_the_uninterrupted_runs_artifacts(default_run, tmp_path):
    workdir = copy_run(default_run, tmp_path / "run")
    reference = artifacts(workdir)
    for output in OUTPUTS["generate"]:
        path = workdir / output
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    rerun: list[str] = []
    for rule in ("generate", "phrases", "segment"):
        temporary, log = crash(workdir, rule, *rerun)
        # The killed job's outputs exist only under temporary names: nothing half-written is in place.
        assert temporary.exists() and TMP_MARK in temporary.name, log
        for output in OUTPUTS[rule]:
            assert not (workdir / output).exists(), (rule, output)
        if rule == "generate":
            # The crash left Snakemake's lock behind: a plain rerun refuses to start and says what to do.
            refused = snakemake(workdir, "--cores", "2", *TARGETS, check=False)
            assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
        snakemake(workdir, "--unlock")
        rerun = ["--rerun-incomplete"]

    done = snakemake(workdir, "--cores", "2", *rerun, *TARGETS)
    assert re.search(r"^\s*(local)?rule segment:", done.stdout + done.stderr, re.MULTILINE)
    assert_same_artifacts(artifacts(workdir), reference)
    leftovers = [p for p in (workdir / "results").rglob("*") if TMP_MARK in p.name]
    assert not leftovers, leftovers
