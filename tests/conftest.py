"""Fixtures shared by test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """A work directory in which the default DAG (FAST toy training, 2 shards, run locally with 2 cores)
    has run and `snakemake --report report.html` has built the report; run once per session for the
    tests that use it (the report and rerun tests of test_workflow.py, the Slurm test's reference).
    `first_summary.json` beside it keeps the run's results/summary.json as it first came out (the rerun
    test changes the work directory)."""
    from test_workflow import snakemake, write_config

    workdir = tmp_path_factory.mktemp("default_run")
    write_config(workdir, shards=2)
    snakemake(workdir, "--cores", "2")
    snakemake(workdir, "--report", "report.html")
    shutil.copyfile(workdir / "results" / "summary.json", workdir / "first_summary.json")
    return workdir
