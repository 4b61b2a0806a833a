"""The version of a rule's code: a short hash of its script and of every module of the project's
packages (``stages``, ``schemas``) that the script imports, directly or transitively.

Snakemake reruns a job whose params changed since its outputs were made; a rule that carries
``code_version(script)`` among its params therefore reruns, and everything downstream of it, when the
code it runs changes. (Snakemake's own ``code`` trigger sees only the script, a thin adapter.)

Which modules count, found statically in the source (:mod:`ast`, nothing is imported): every ``import``
at any depth, the lazy imports inside functions included, each with its parent packages'
``__init__``; and every string constant that is the dotted name of a module of those packages (what
``importlib.import_module`` is given, as in the LMM family registry). Modules are looked up where the
running interpreter imports them from (``sys.path``), so the version is that of the code the jobs run.

What a module's hash covers: its syntax tree without docstrings, so editing comments, formatting or
docstrings changes nothing, and any other edit changes the version, whether or not it changes what the
rule writes. Not covered: third-party packages and data files (the schema's defaults reach the rules
through their config params).

Every Snakemake process computes these versions when it reads the workflow (a run, a dry run, and on a
cluster every job again), so each file's parse is kept on disk (:func:`parse_cache_dir`), under a hash of
its content: a file seen before costs a read and a hash instead of a parse.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

TRACKED_PACKAGES = ("stages", "schemas")
VERSION_LENGTH = 12
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def code_version(script: str | os.PathLike, packages: tuple[str, ...] = TRACKED_PACKAGES) -> str:
    """Hex digest (:data:`VERSION_LENGTH` characters) of ``script`` and of every module of ``packages``
    it imports transitively (:func:`imported_modules`)."""
    digest = hashlib.sha256(_parsed(Path(script), None).digest.encode())
    for name, path in sorted(imported_modules(script, packages).items()):
        digest.update(f"\0{name}\0{_parsed(path, _package_of(name, path)).digest}".encode())
    return digest.hexdigest()[:VERSION_LENGTH]


def imported_modules(script: str | os.PathLike,
                     packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, Path]:
    """Module name -> source file of every module of ``packages`` that ``script`` imports, directly or
    through the modules it imports (see the module docstring for what counts as an import)."""
    found: dict[str, Path] = {}
    pending = list(_parsed(Path(script), None).references)
    while pending:
        name = pending.pop()
        if name in found or name.split(".")[0] not in packages:
            continue
        path = module_file(name)
        if path is None:  # an attribute imported from a module (``from stages.config import ConfigError``)
            continue
        found[name] = path
        pending.extend(name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1))
        pending.extend(_parsed(path, _package_of(name, path)).references)
    return found


def module_file(name: str) -> Path | None:
    """Source file of the module ``name`` (a package's ``__init__.py``) where the running interpreter
    imports it from, found without importing anything but its top-level package's location; None when
    there is no such module."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for candidate in (base / "__init__.py", base.with_name(base.name + ".py")):
        if candidate.is_file():
            return candidate
    return None


def _package_of(name: str, path: Path) -> str:
    """The package a module's relative imports start from: itself for a package, else its parent."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


class _Parsed:
    """One source file's digest (its syntax tree without docstrings) and the absolute names of the
    modules it may import: the targets of its import statements (for ``from X import a``: X and X.a,
    which may be a module; relative imports resolved against ``package``) and its string constants that
    look like dotted module names. One walk over the tree does both."""

    def __init__(self, digest: str, references: frozenset[str]):
        self.digest = digest
        self.references = references

    @classmethod
    def parse(cls, source: str, package: str | None) -> _Parsed:
        tree = ast.parse(source)
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                node.body = [statement for k, statement in enumerate(node.body)
                             if k or not _is_docstring(statement)]
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level and package is None:
                    continue
                base = (importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                        if node.level else node.module)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _DOTTED_NAME.fullmatch(node.value):
                names.add(node.value)
        return cls(hashlib.sha256(ast.dump(tree).encode()).hexdigest(), frozenset(names))


def _parsed(path: Path, package: str | None) -> _Parsed:
    """The parse of ``path``, cached per process for as long as the file keeps its size and mtime."""
    stat = path.stat()
    return _parse_cached(str(path.resolve()), package, (stat.st_mtime_ns, stat.st_size))


@functools.cache
def _parse_cached(path: str, package: str | None, file_stamp: tuple[int, int]) -> _Parsed:
    """``file_stamp`` (mtime, size) is part of the cache key only: an edited file is parsed again."""
    source = Path(path).read_bytes()
    # The syntax tree's dump depends on the Python version: a parse is reused by the same version only.
    key = hashlib.sha256(b"\0".join([f"{sys.version_info[0]}.{sys.version_info[1]}".encode(),
                                     (package or "").encode(), source])).hexdigest()
    entry = parse_cache_dir() / key
    try:
        cached = json.loads(entry.read_text())
        return _Parsed(cached["digest"], frozenset(cached["references"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    parsed = _Parsed.parse(source.decode(), package)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"digest": parsed.digest, "references": sorted(parsed.references)}))
        os.replace(temporary, entry)
    except OSError:
        pass
    return parsed


def parse_cache_dir() -> Path:
    """Where parses are kept: ``$AAS_CODE_VERSION_CACHE`` if set, else
    ``$XDG_CACHE_HOME/attend-and-segment/code-version`` (``~/.cache/...`` when XDG_CACHE_HOME is unset).
    Entries are written atomically, so concurrent processes may share it; an unwritable folder only means
    every file is parsed each time."""
    if os.environ.get("AAS_CODE_VERSION_CACHE"):
        return Path(os.environ["AAS_CODE_VERSION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attend-and-segment" / "code-version"


def _is_docstring(statement: ast.stmt) -> bool:
    """Whether ``statement`` is a bare string (a docstring when it opens a body)."""
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))
