"""The toy world is a part of the code of its own: no production module imports ``stages.toy``.

``stages/toy/`` (the synthetic world, the toy LLaVA, the trainers, their diagnostics) may import
production modules; every other module under ``stages/`` must never import it, in any form. The
checker reads the source (:mod:`ast`, nothing is imported) and is itself tested on fabricated
sources, so that it can fail.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from stages.code_version import imported_modules

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
TOY = "stages.toy"
SCRIPTS = ROOT / "workflow" / "scripts"
# The scripts of the rules of workflow/rules/toy.smk.
TOY_SCRIPTS = {"synthetic_data.py", "train_lmm.py", "train_sam.py", "toy_diagnostics.py", "pretrain_toy_sd.py",
               "train_toy_difflmm.py"}
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _is_toy(name: str) -> bool:
    return name == TOY or name.startswith(TOY + ".")


def toy_imports(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """``"line N: name"`` for each way ``source`` (the module named ``module``; ``is_package``: it is a
    package's ``__init__``) reaches ``stages.toy``: ``import stages.toy[.x]``, ``from stages.toy[.x]
    import ...``, ``from stages import toy``, the relative forms of those (resolved against the
    module's package), at any depth (lazy imports inside functions too), a string constant naming a
    module of it (``importlib.import_module("stages.toy.model")``) and the attribute ``stages.toy``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module
            except (ImportError, ValueError):  # a relative import above the top-level package
                continue
            names = [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and _DOTTED_NAME.fullmatch(node.value):
            names = [node.value]
        elif isinstance(node, ast.Attribute) and node.attr == "toy" \
                and isinstance(node.value, ast.Name) and node.value.id == "stages":
            names = [TOY]
        found.extend(f"line {node.lineno}: {name}" for name in names if _is_toy(name))
    return found


def production_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file of every module under ``root``/stages/ outside stages/toy/."""
    modules = {}
    for path in sorted((root / "stages").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[:2] == ("stages", "toy"):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def offenders(root: Path = ROOT) -> dict[str, list[str]]:
    """Production module -> its imports of stages.toy (:func:`toy_imports`), for those that have any."""
    return {name: hits for name, path in production_modules(root).items()
            if (hits := toy_imports(path.read_text(), name, is_package=path.name == "__init__.py"))}


def test_no_production_module_imports_the_toy_package():
    modules = production_modules()
    # Not vacuous: the stages, the model families and the artifact I/O are all read.
    assert {"stages", "stages.generate", "stages.segment", "stages.models", "stages.models.llava",
            "stages.io.tables"} <= set(modules)
    assert not any(_is_toy(name) for name in modules)
    found = offenders()
    assert not found, f"production modules import {TOY} (only stages/toy/ may): {found}"


def test_the_toy_package_holds_the_toy_world():
    toy = {path.stem for path in (STAGES / "toy").glob("*.py")}
    assert {"__init__", "world", "model", "train_lmm", "train_sam", "diagnostics"} <= toy
    for old in ("synthetic.py", "train_lmm.py", "train_sam.py", "models/toy_lmm.py"):
        assert not (STAGES / old).exists(), old


@pytest.mark.parametrize(("source", "module"), [
    ("import stages.toy\n", "stages.generate"),
    ("import stages.toy.world as world\n", "stages.generate"),
    ("import os, stages.toy.model\n", "stages.generate"),
    ("from stages.toy import world\n", "stages.generate"),
    ("from stages.toy.model import build_toy_llava\n", "stages.models.llava"),
    ("from stages import toy\n", "stages.generate"),
    ("from stages import config, toy as t\n", "stages.generate"),
    ("from . import toy\n", "stages.generate"),
    ("from .toy.world import make_example\n", "stages.generate"),
    ("from ..toy import model\n", "stages.models.llava"),
    ("from .. import toy\n", "stages.io.tables"),
    ("def f():\n    if True:\n        from stages.toy.train_lmm import TrainLmmConfig\n", "stages.segment"),
    ("import importlib\nmodel = importlib.import_module('stages.toy.model')\n", "stages.models.registry"),
    ("import stages\nx = stages.toy.world.make_example\n", "stages.generate"),
])
def test_the_checker_flags_every_form_of_importing_the_toy_package(source, module):
    assert toy_imports(source, module), source


def test_the_checker_resolves_a_packages_relative_imports_against_itself():
    assert toy_imports("from . import toy\n", "stages", is_package=True)
    assert toy_imports("from .toy import world\n", "stages", is_package=True)
    assert not toy_imports("from . import sam\n", "stages.models", is_package=True)


@pytest.mark.parametrize(("source", "module"), [
    ("from stages import generate, segment\n", "stages.demo"),
    ("import stages.models.sam\n", "stages.segment"),
    ("from . import tools\n", "stages.generate"),
    ("from .toys import x\n", "stages.generate"),
    ("import stages.toyota\n", "stages.generate"),
    ('"""Mentions :mod:`stages.toy.model` in prose."""\n', "stages.models.llava"),
    ("from ... import toy\n", "stages.generate"),  # above the top-level package: not an import of stages.toy
])
def test_the_checker_leaves_other_imports_alone(source, module):
    assert not toy_imports(source, module), source


def test_the_scan_names_a_fabricated_production_module_that_imports_the_toy_world(tmp_path):
    """The whole scan, not just the checker, on a fabricated tree: the toy package may import
    production modules; a production module (here lazily, in a subpackage) may not."""
    files = {"stages/__init__.py": '"""Stages."""\n',
             "stages/generate.py": "from stages.config import X\n",
             "stages/models/__init__.py": "",
             "stages/models/llava.py": 'def load():\n    from ..toy.model import build\n',
             "stages/toy/__init__.py": "",
             "stages/toy/world.py": "from stages.generate import X\nfrom . import model\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert set(production_modules(tmp_path)) == {"stages", "stages.generate", "stages.models",
                                                 "stages.models.llava"}
    assert offenders(tmp_path) == {"stages.models.llava": ["line 2: stages.toy.model",
                                                           "line 2: stages.toy.model.build"]}


def test_production_rules_code_versions_do_not_follow_the_toy_world():
    """A rule's code version covers what its script imports (stages.code_version): editing the toy
    world reruns the toy rules only, and the toy LMM's trainer no longer follows the phrases and
    segment stages (its point-accuracy check is in stages.toy.diagnostics)."""
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert TOY_SCRIPTS <= {script.name for script in scripts}
    for script in scripts:
        toy = sorted(name for name in imported_modules(script) if _is_toy(name))
        assert bool(toy) == (script.name in TOY_SCRIPTS), (script.name, toy)
    trainer = imported_modules(SCRIPTS / "train_lmm.py")
    assert {"stages.toy.train_lmm", "stages.toy.model", "stages.toy.world"} <= set(trainer)
    assert not {"stages.phrases", "stages.segment", "stages.toy.diagnostics"} & set(trainer)
