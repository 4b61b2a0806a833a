"""Fixtures shared by test files: the workflow runs that several tests read, each made once per session.

`make test` runs the tests in two processes (pytest-xdist, ``-n 2 --dist loadgroup``): each file's tests stay
in one process, so that a module's fixtures are made once (:func:`pytest_collection_modifyitems`); tests of
several files that read one run go together by their ``xdist_group`` mark; and a run that tests of two
processes read (``default_run``) is made once, by whichever process asks first, the other waiting for it
(:func:`shared`).
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without an ``xdist_group`` mark joins the group of its file (pytest-xdist's loadgroup keeps a
    group in one process; it reads the marks after this hook)."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def copy_run(workdir: Path, destination: Path) -> Path:
    """A copy of a work directory (artifacts, Snakemake's records, file times) that a test may change;
    Snakemake finds it as up to date as the original."""
    shutil.copytree(workdir, destination, symlinks=True)
    return destination


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``make`` fills, made once per test session even when the session runs in
    several processes (pytest-xdist): under a lock in the session's common temporary folder, the first
    process to ask makes it, the others wait and read it. A failure is recorded there, so that every
    process asking afterwards fails with its message instead of making it again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                          # the folder the processes' own temporary folders share
    folder, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"{name} failed in another test process:\n{failed.read_text()}")
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                make(folder)
            except BaseException:
                failed.write_text(traceback.format_exc()[-6000:])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """A work directory in which the default DAG (FAST toy training, 2 shards, both controls, run locally
    with 2 cores) has run and `snakemake --report report.html` has built the report; made once per session
    for the tests that read it (the report, rerun, killed-jobs, second-run and Slurm tests). Read-only:
    a test that changes a run works on a copy (:func:`copy_run`)."""
    from test_workflow import snakemake, write_config

    def make(workdir: Path) -> None:
        write_config(workdir, shards=2)
        snakemake(workdir, "--cores", "2")
        snakemake(workdir, "--report", "report.html")

    return shared(tmp_path_factory, "default_run", make)


@dataclass(frozen=True)
class SecondRun:
    """The default DAG's main run made again from scratch: ``workdir``; ``executor`` "slurm" or "local";
    ``jobs``: on Slurm, every job the controller ran (scontrol's fields), else None; ``seconds``: wall time."""

    workdir: Path
    executor: str
    jobs: list[dict[str, str]] | None
    seconds: float


@pytest.fixture(scope="session")
def second_run(tmp_path_factory) -> SecondRun:
    """The default DAG's main run (its config without the controls) a second time, from scratch in a fresh
    work directory: the world drawn, both toy models trained and every stage run again. Where this machine
    can start a single-node Slurm (tests/test_slurm.py: its programs and root), the run goes through
    workflow/profiles/slurm, so that one run serves both the Slurm test and the determinism test; elsewhere
    it runs locally with 2 cores, and the Slurm test skips (or fails, in CI)."""
    from test_slurm import run_on_slurm, second_run_config, slurm_available
    from test_workflow import snakemake

    workdir = tmp_path_factory.mktemp("second_run")
    second_run_config(workdir)
    if slurm_available():
        return run_on_slurm(workdir)
    started = time.monotonic()
    snakemake(workdir, "--cores", "2")
    return SecondRun(workdir, "local", None, time.monotonic() - started)
