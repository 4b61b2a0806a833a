"""Fixtures shared by test files: the workflow runs that several tests read, each made once per session.

`make test` runs the tests in two processes (pytest-xdist, ``-n 2 --dist loadscope``) with this file's
scheduling (:func:`pytest_xdist_make_scheduler`): a test's unit of work is its file, so that a module's
fixtures are made once, except for the tests of several files that read one shared run, which go together
(:data:`SHARED_RUN_GROUPS`), and the tests of a few files of short tests, each a unit of its own
(:data:`FILLERS`); the units that take minutes start first (:data:`FIRST`) and the short ones last, so that
the two processes finish together. A run read from both processes (``default_run``, ``second_run``) is made once,
by whichever asks first, the other waiting for it (:func:`shared`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

# Tests of several files that read one shared run: node id (a whole file, or file::test) -> group. They run
# in one process, one after the other, so that no process waits for a run another is making.
SHARED_RUN_GROUPS = {
    "tests/test_killed_jobs.py": "default_run",
    "tests/test_web.py": "default_run",
    "tests/test_chat.py::test_a_greedy_first_answer_is_the_pipelines": "default_run",
    "tests/test_chat.py::test_terminal_chat": "default_run",
    "tests/test_workflow.py::test_report_opens_in_chromium_with_its_figures_and_tables": "default_run",
    "tests/test_workflow.py::test_default_dag_runs_and_reruns_only_the_deleted_shard": "default_run",
    "tests/test_workflow.py::test_referring_and_narrative_data_sets_run_on_the_default_models": "default_run",
    "tests/test_slurm.py::test_default_dag_on_a_single_node_slurm_matches_the_local_run": "second_run",
    "tests/test_workflow.py::test_a_second_run_from_scratch_writes_the_same_artifacts_and_metrics": "second_run",
}
# Units of work that take minutes, in the order they start: the shared runs' groups, then the files with
# the longest runs of their own; every other unit after them, slow files first.
FIRST = ("second_run", "default_run", "tests/test_presets.py", "tests/test_bad_input.py")
# Files of many short tests (dry runs) and no module fixture: each test is a unit of its own, and they run
# last, so that small units keep both processes busy to the end.
FILLERS = ("tests/test_workflow.py", "tests/test_docs.py")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its shared-run group, else itself in a file of :data:`FILLERS`,
    else its file."""
    for prefix, group in SHARED_RUN_GROUPS.items():
        if nodeid == prefix or nodeid.startswith((prefix + "::", prefix + "[")):
            return group
    file = nodeid.split("::", 1)[0]
    return nodeid if file in FILLERS else file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests as their units of work start (:data:`FIRST`, then slow files, then the other files,
    then :data:`FILLERS`), and
    check that every test reading a shared run is in the group of that run (:data:`SHARED_RUN_GROUPS`)."""
    for item in items:
        for fixture in ("default_run", "second_run"):
            if fixture in getattr(item, "fixturenames", ()) and \
                    work_unit(item.nodeid) not in ("default_run", "second_run"):
                raise pytest.UsageError(f"{item.nodeid} reads the {fixture} run: add it to SHARED_RUN_GROUPS "
                                        "in tests/conftest.py")

    def rank(item: pytest.Item) -> int:
        scope = work_unit(item.nodeid)
        if scope in FIRST:
            return FIRST.index(scope)
        if item.nodeid.split("::", 1)[0] in FILLERS:
            return len(FIRST) + 2
        return len(FIRST) + (0 if any(other.get_closest_marker("slow") for other in by_scope[scope]) else 1)

    by_scope: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_scope.setdefault(work_unit(item.nodeid), []).append(item)
    items.sort(key=rank)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With ``--dist loadscope``: units of work as :func:`work_unit` makes them, started in the order of
    the collection (:func:`pytest_collection_modifyitems`). (pytest-xdist's own ``loadgroup`` marks have no
    effect under pytest 9, which no longer reads the node id they rewrite.)"""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return SharedRunScheduling(config, log)


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

    def make(folder: Path) -> None:
        workdir = folder / "work"
        second_run_config(workdir)
        if slurm_available():
            executor, jobs, seconds = "slurm", *run_on_slurm(workdir)
        else:
            started = time.monotonic()
            snakemake(workdir, "--cores", "2")
            executor, jobs, seconds = "local", None, time.monotonic() - started
        (folder / "run.json").write_text(json.dumps({"executor": executor, "jobs": jobs, "seconds": seconds}))

    folder = shared(tmp_path_factory, "second_run", make)
    return SecondRun(folder / "work", **json.loads((folder / "run.json").read_text()))
