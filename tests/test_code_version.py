"""Stale code: the version of each rule's code (stages.code_version) and the reruns it triggers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_workflow import ROOT, write_config

from stages.code_version import code_version, imported_modules

SCRIPTS = ROOT / "workflow" / "scripts"
CODE = ("Snakefile", "workflow", "stages", "schemas")


def test_a_rule_depends_on_its_stage_lazy_imports_and_registry_modules_only():
    segment = imported_modules(SCRIPTS / "segment.py")
    assert {"stages.segment", "stages.config", "stages.io.tables", "schemas.artifacts", "stages.runner",
            "stages.models", "stages.models.sam"} <= set(segment)  # models.sam: imported inside a function
    assert "stages.generate" not in segment and "stages.models.llava" not in segment
    assert segment["stages.segment"] == ROOT / "stages" / "segment.py"
    generate = imported_modules(SCRIPTS / "generate.py")
    # Families are imported by name (importlib.import_module("stages.models.llava")) from the registry.
    assert {"stages.models.registry", "stages.models.llava", "stages.models.qwen2_5_vl"} <= set(generate)
    assert "stages.segment" not in generate
    # Its provenance records hold its code version: code_version.py is code the stage runs.
    assert {"stages.provenance", "stages.code_version"} <= set(generate)


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `cvpkg` (a imports b relatively; c is imported by nobody) and a script importing a."""
    root = tmp_path / "cvpkg"
    root.mkdir()
    (root / "__init__.py").write_text('"""The package."""\n')
    (root / "a.py").write_text('"""Module a."""\nfrom . import b\n\n\ndef f():\n    return b.g() + 1\n')
    (root / "b.py").write_text('"""Module b."""\n\n\ndef g():\n    """Two."""\n    return 2  # the answer\n')
    (root / "c.py").write_text("X = 1\n")
    (tmp_path / "script.py").write_text("from cvpkg.a import f\n\nprint(f())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_version_follows_code_not_comments_docstrings_or_unimported_modules(package):
    script, packages = package / "script.py", ("cvpkg",)
    assert set(imported_modules(script, packages)) == {"cvpkg", "cvpkg.a", "cvpkg.b"}
    version = code_version(script, packages)
    assert re.fullmatch(r"[0-9a-f]{12}", version)

    b = package / "cvpkg" / "b.py"
    b.write_text('"""Module b, documented at length."""\n\n\ndef g():\n    """Two, always."""\n\n'
                 '    return 2  # the answer, commented again\n')
    (package / "cvpkg" / "c.py").write_text("X = 2\n")
    assert code_version(script, packages) == version
    b.write_text(b.read_text().replace("return 2", "return 3"))
    assert code_version(script, packages) != version


def test_parses_are_kept_on_disk_by_content(package, tmp_path, monkeypatch):
    """Every Snakemake process computes the versions again: a file parsed once (by any process) is read from
    the cache folder after; a changed file, a damaged entry and an unwritable folder are parsed anew."""
    from stages import code_version as module

    cache = tmp_path / "cache"
    monkeypatch.setenv("AAS_CODE_VERSION_CACHE", str(cache))
    script, packages = package / "script.py", ("cvpkg",)
    module._parse_cached.cache_clear()
    version = code_version(script, packages)
    entries = sorted(cache.iterdir())
    assert len(entries) == 4                        # the script, the package, a and b

    parses = []
    parse = module._Parsed.parse
    monkeypatch.setattr(module._Parsed, "parse", classmethod(lambda cls, *args: parses.append(args) or
                                                               parse(*args)))
    module._parse_cached.cache_clear()              # a new process: only the disk cache is left
    assert code_version(script, packages) == version and parses == []

    b = package / "cvpkg" / "b.py"
    b.write_text(b.read_text().replace("return 2", "return 3"))
    module._parse_cached.cache_clear()
    assert code_version(script, packages) != version and len(parses) == 1

    for entry in entries:
        entry.write_text("{not json")
    module._parse_cached.cache_clear()
    changed = code_version(script, packages)
    assert len(parses) == 1 + 3                     # b's new parse was cached; the damaged three parsed again

    monkeypatch.setenv("AAS_CODE_VERSION_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    module._parse_cached.cache_clear()
    assert code_version(script, packages) == changed


# ---- The workflow: a dry run after a code change plans the rules that run that code, and what follows.

def snakemake(code: Path, workdir: Path, *args: str) -> str:
    """Run the copy of the workflow in `code` with the stages/schemas packages of that copy (from `code`:
    `python -m` puts the current folder first on the module path)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(code / "Snakefile"),
                             "--directory", str(workdir), "--cores", "1", *args], capture_output=True,
                            text=True, check=False, cwd=code,
                            env={**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, \
        f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def planned(code: Path, workdir: Path) -> dict[str, int]:
    """Rule -> jobs the dry run plans (rule all left out)."""
    table = snakemake(code, workdir, "--dry-run").partition("Job stats:")[2]
    rows = re.finditer(r"^([A-Za-z_]\w*)\s+(\d+)\s*$", table, re.MULTILINE)
    jobs = {match[1]: int(match[2]) for match in rows}
    return {rule: count for rule, count in jobs.items() if rule not in ("total", "all")}


@pytest.fixture(scope="module")
def up_to_date_run(tmp_path_factory):
    """A copy of the workflow's code and a working folder where the whole toy DAG (one shard, no
    variants) is up to date with metadata recorded for the code as it is: every output made empty,
    then `--touch --forceall` records each job as run (the jobs' outputs matter not, their params do)."""
    base = tmp_path_factory.mktemp("up_to_date")
    code, work = base / "code", base / "work"
    code.mkdir()
    for name in CODE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, code / name)
    write_config(work, shards=1, variants={})
    for outputs in re.findall(r"^\s+output: (.+)$", snakemake(code, work, "--dry-run"), re.MULTILINE):
        for output in map(Path, outputs.split(", ")):
            # directory() outputs: the model folders, the image folder, Zarr stores, visualisations.
            if output.suffix in ("", ".zarr"):
                (work / output).mkdir(parents=True, exist_ok=True)
            else:
                (work / output).parent.mkdir(parents=True, exist_ok=True)
                (work / output).touch()
    snakemake(code, work, "--touch", "--forceall")
    assert planned(code, work) == {}
    return base


def changed_copy(up_to_date_run: Path, tmp_path: Path, module: str) -> tuple[Path, Path]:
    """A copy of the up-to-date run whose code has one statement added to `module` (a path in stages/)."""
    copy = tmp_path / "copy"
    shutil.copytree(up_to_date_run, copy, symlinks=True)
    with open(copy / "code" / module, "a") as source:
        source.write("\nCODE_CHANGED = True\n")
    return copy / "code", copy / "work"


def test_changing_a_stage_reruns_it_and_everything_downstream_but_nothing_upstream(up_to_date_run, tmp_path):
    code, work = changed_copy(up_to_date_run, tmp_path, "stages/manifest.py")
    dry_run = snakemake(code, work, "--dry-run")
    assert re.search(r"Params have changed since last execution: .*before: 'manifest\.py \w+' "
                     r"now: 'manifest\.py \w+'", dry_run), dry_run
    assert planned(code, work) == {"manifest": 2, "generate": 2, "phrases": 2, "segment": 2, "visualize": 2,
                                   "evaluate_instance_seg": 1, "evaluate_gcg": 1, "summary": 1}


def test_changing_a_module_of_one_stage_reruns_that_stage_chain_only(up_to_date_run, tmp_path):
    """stages/evaluate_coco.py is the instance-segmentation evaluator's alone: the GCG evaluator, which
    shares stages/evaluation.py with it, does not rerun."""
    code, work = changed_copy(up_to_date_run, tmp_path, "stages/evaluate_coco.py")
    assert planned(code, work) == {"evaluate_instance_seg": 1, "summary": 1}


def test_a_change_to_the_artifact_schemas_reruns_every_stage_that_reads_or_writes_artifacts(
        up_to_date_run, tmp_path):
    """schemas/artifacts.py is read through stages.io by every stage but the toy world's and toy SAM's
    (the toy LMM's trainer, for both the trained model and its untrained twin, imports the generate
    stage; the toy diagnostics run the generate and phrases stages)."""
    code, work = changed_copy(up_to_date_run, tmp_path, "schemas/artifacts.py")
    assert planned(code, work) == {"train_lmm": 1, "random_lmm": 1, "toy_diagnostics": 1, "manifest": 2,
                                   "generate": 2, "phrases": 2,
                                   "segment": 2, "visualize": 2, "evaluate_instance_seg": 1,
                                   "evaluate_gcg": 1, "summary": 1}
