"""Provenance records: what produced an artifact (:data:`schemas.artifacts.PROVENANCE_FIELDS`).

Each stage builds one record per artifact it writes (:func:`record`) and hands it to the writer, which
stores it beside the data: Parquet schema metadata ``aas.provenance``, the attention store's attribute
``provenance``, the metrics file's field ``provenance``; ``python -m stages.inspect`` prints it.

A record holds the stage and the version of its code, the config sections it ran with and their hash,
the models behind the artifact (its own and those its inputs record, so a metrics file names the LMM
and SAM its masks came from), its inputs' stages, code versions and config hashes, and the versions of
Python and of the libraries the stages compute with. It is deterministic: no time, host name or path
that the config does not give, so two runs of one config with the same code, models and libraries write
equal records.

Models (:func:`model`): a local file or folder is identified by its content hash (every file read in
full: about a second per GB; a safetensors header's keys in sorted order; the digest of a file of
:data:`DIGEST_CACHE_MIN_BYTES` or more is kept in a small on-disk cache, :func:`cached_sha256_file`, so a
model read by many jobs is hashed once per run); a hub id by the commit the local hub cache's ``main``
ref names, which is what ``from_pretrained`` loaded (null when the cache holds no such ref: the record
then says the revision is unknown); a ``python:<module>`` model by its package's version and its
folder's content hash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from schemas.artifacts import SCHEMA_VERSION
from stages.code_version import code_version, module_file
from stages.config import resolve_model_path

# Files at least this large have their digest cached on disk (:func:`cached_sha256_file`).
DIGEST_CACHE_MIN_BYTES = 64 << 20

# Distributions whose versions every record holds (besides Python's).
LIBRARIES = ("numpy", "pyarrow", "zarr", "torch", "transformers", "segment-anything", "spacy")


def record(stage: str, artifact: str, config: Mapping[str, Any], *, models: Iterable[Mapping[str, Any]] = (),
           inputs: Iterable[Mapping[str, Any] | None] = ()) -> dict[str, Any]:
    """The provenance record of ``artifact`` written by stage ``stage`` (module ``stages.<stage>``).

    ``config``: the sections the stage ran with, {section name: mapping or config dataclass}.
    ``models``: the stage's own models (:func:`model`, :func:`spacy_pipeline`). ``inputs``: the
    records of the artifacts it read (None for an input written without one); their models and
    their own upstream entries are carried over. Models and upstream entries are deduplicated and
    sorted, so the record does not depend on the order of shards or inputs.
    """
    config = jsonable(config)
    inputs = [entry for entry in inputs if entry is not None]
    upstream = [{key: entry.get(key) for key in ("artifact", "stage", "code_version", "config_sha256")}
                for entry in inputs]
    return {
        "schema_version": SCHEMA_VERSION,
        "artifact": artifact,
        "stage": stage,
        "code_version": f"stages.{stage} {code_version(module_file(f'stages.{stage}'))}",
        "config": config,
        "config_sha256": sha256_of(config),
        "models": _distinct([*jsonable(list(models)), *(m for entry in inputs for m in entry.get("models", []))]),
        "upstream": _distinct([*upstream, *(u for entry in inputs for u in entry.get("upstream", []))]),
        "libraries": library_versions(),
    }


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values: config dataclasses as mappings, tuples as lists, paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, non-ASCII characters kept."""
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(value: Any) -> str:
    """sha256 (hex) of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _distinct(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` without repeats, in the order of their canonical JSON."""
    unique = {canonical_json(entry): dict(entry) for entry in entries}
    return [unique[key] for key in sorted(unique)]


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Python's version and each of :data:`LIBRARIES`' installed version (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content: its bytes; for a ``.safetensors`` file, its JSON header as
    canonical JSON followed by its tensor data, because safetensors writes the header's metadata in
    no fixed order (two saves of equal tensors and metadata differ in bytes). A ``.safetensors`` file
    whose header does not parse is hashed by its bytes."""
    with open(path, "rb") as stream:
        if Path(path).suffix == ".safetensors":
            size = int.from_bytes(stream.read(8), "little")
            try:
                if size > os.fstat(stream.fileno()).st_size:
                    raise ValueError("header size beyond the end of the file")
                header = json.loads(stream.read(size))
            except ValueError:                      # no header (UnicodeDecodeError is a ValueError too)
                stream.seek(0)
            else:
                digest = hashlib.sha256(canonical_json(header).encode())
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                return digest.hexdigest()
        return hashlib.file_digest(stream, "sha256").hexdigest()


def digest_cache_dir() -> Path:
    """Where :func:`cached_sha256_file` keeps digests: ``$AAS_DIGEST_CACHE`` if set, else
    ``$XDG_CACHE_HOME/attend-and-segment/sha256`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    if os.environ.get("AAS_DIGEST_CACHE"):
        return Path(os.environ["AAS_DIGEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attend-and-segment" / "sha256"


def cached_sha256_file(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, remembered on disk for files of :data:`DIGEST_CACHE_MIN_BYTES` or more.

    The cache entry's name is a hash of the file's real path, size, modification time (ns) and inode,
    so replacing or rewriting the file (which changes its mtime) misses the cache and hashes it anew; a
    change that keeps size, mtime and inode (only possible by setting the mtime back on purpose) is not
    seen, as with ``make`` or ``rsync``. Entries are written atomically, so concurrent jobs may share
    the cache; an unwritable cache folder only means the file is hashed every time."""
    stat = os.stat(path)
    if stat.st_size < DIGEST_CACHE_MIN_BYTES:
        return sha256_file(path)
    key = f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"
    entry = digest_cache_dir() / hashlib.sha256(key.encode()).hexdigest()
    try:
        cached = entry.read_text().strip()
    except OSError:
        cached = ""
    if len(cached) == 64:
        return cached
    digest = sha256_file(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        temporary.write_text(digest)
        os.replace(temporary, entry)
    except OSError:
        pass
    return digest


def sha256_folder(path: str | os.PathLike) -> str:
    """sha256 (hex) of a folder's content: of one line ``<relative path>\\0<file sha256>`` per file under
    it (symbolic links followed, as in a hub snapshot), in the order of their paths."""
    root = Path(path)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{cached_sha256_file(root / name)}\n".encode())
    return digest.hexdigest()


def hub_commit(repo_id: str) -> str | None:
    """The commit the local hub cache's ``main`` ref of model ``repo_id`` names (what ``from_pretrained``
    loaded offline or last downloaded); None when the cache has no such ref."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def model(role: str, path: str) -> dict[str, Any]:
    """The identity of the model at ``path`` (a local file or folder, a hub id or ``python:<module>``)
    in the role ``role`` ("lmm", "sam", ...): {"role", "path", "revision", "sha256"} (module
    docstring)."""
    revision = sha256 = None
    if path.startswith("python:"):
        folder = resolve_model_path(path)
        package = path.removeprefix("python:").split(".")[0]
        distributions = importlib.metadata.packages_distributions().get(package, [])
        revision = importlib.metadata.version(distributions[0]) if distributions else None
        sha256 = sha256_folder(folder)
    elif Path(path).is_dir():
        sha256 = sha256_folder(path)
    elif Path(path).is_file():
        sha256 = cached_sha256_file(path)
    else:
        revision = hub_commit(path)
    return {"role": role, "path": path, "revision": revision, "sha256": sha256}


def spacy_pipeline(role: str, name: str, nlp: Any) -> dict[str, Any]:
    """The identity of the spaCy pipeline ``nlp`` loaded as ``name``: its own version as revision
    ("<lang>_<name>-<version>" from its meta), no content hash."""
    meta = nlp.meta
    return {"role": role, "path": name, "sha256": None,
            "revision": f"{meta.get('lang')}_{meta.get('name')}-{meta.get('version')}"}
