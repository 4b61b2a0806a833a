"""What an artifact is and what produced it: ``python -m stages.inspect PATH [--json]``.

``PATH`` is a Parquet table (manifest, generations, phrases, masks), an attention store (a ``.zarr``
folder) or a metrics file (``metrics/<task>.json``). Prints its artifact name, schema version and
provenance record (:data:`schemas.artifacts.PROVENANCE_FIELDS`: stage, code version, config sections
and their hash, models, upstream artifacts, library versions) for a reader, or with ``--json`` as one
JSON object ``{"path", "artifact", "schema_version", "rows", "provenance"}`` (``rows``: a table's row
count, else null; ``provenance``: null for an artifact written without one). Anything else (no such
path, another file, a file of this kind that is not an artifact of the pipeline, an unreadable one)
exits with status 2 and a message saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from schemas.artifacts import ARTIFACT_KEY, METRIC_TASKS, METRICS_PROVENANCE_FIELD, VERSION_KEY
from stages.io.attention import attention_attrs
from stages.io.tables import ArtifactError, read_metadata, read_provenance, unreadable

EXPECTED = "a .parquet table, a .zarr attention store folder or a metrics .json file of the pipeline"


class NotAnArtifact(ValueError):
    """The path is no artifact of the pipeline (or cannot be read as one); the message says why."""


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "artifact", "schema_version", "rows", "provenance"}`` of the artifact at ``path``;
    :class:`NotAnArtifact` when it is none."""
    path = Path(path)
    if not path.exists():
        raise NotAnArtifact(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return _describe_store(path)
        if path.suffix == ".parquet":
            return _describe_table(path)
        if path.suffix == ".json":
            return _describe_metrics(path)
    except (ArtifactError, OSError) as exc:           # unreadable: truncated, corrupt, no permission
        raise NotAnArtifact(str(exc)) from None
    raise NotAnArtifact(f"{path} is not {EXPECTED}")


def _describe_table(path: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    if ARTIFACT_KEY not in meta:
        raise NotAnArtifact(f"{path} is a Parquet file without the metadata {ARTIFACT_KEY.decode()}: not a table "
                            "of the pipeline")
    return {"path": str(path), "artifact": meta[ARTIFACT_KEY].decode(),
            "schema_version": meta.get(VERSION_KEY, b"").decode() or None,
            "rows": pq.ParquetFile(path).metadata.num_rows, "provenance": read_provenance(path)}


def _describe_store(path: Path) -> dict[str, Any]:
    if not (path / "zarr.json").is_file():
        raise NotAnArtifact(f"{path} is a folder but no Zarr store (no zarr.json); expected {EXPECTED}")
    try:
        attrs = attention_attrs(path)
    except Exception as exc:                          # zarr.json that does not parse
        raise unreadable(path, "attention", exc) from exc
    if "artifact" not in attrs:
        raise NotAnArtifact(f"{path} is a Zarr store without the attribute `artifact`: not a store of the "
                            "pipeline")
    return {"path": str(path), "artifact": attrs["artifact"], "schema_version": attrs.get("schema_version"),
            "rows": None, "provenance": attrs.get("provenance")}


def _describe_metrics(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnArtifact(f"{path} is not JSON ({exc})") from None
    if not isinstance(content, dict) or not any(task in content for task in METRIC_TASKS):
        raise NotAnArtifact(f"{path} is JSON but no metrics file ({{task: {{metric: value}}, ...}} with task one "
                            f"of {list(METRIC_TASKS)})")
    record = content.get(METRICS_PROVENANCE_FIELD)
    return {"path": str(path), "artifact": "metrics",
            "schema_version": record.get("schema_version") if record else None, "rows": None,
            "provenance": record}


def format_text(info: Mapping[str, Any]) -> str:
    """The description :func:`describe` returns, as lines for a reader."""
    rows = f", {info['rows']} rows" if info["rows"] is not None else ""
    lines = [str(info["path"]), f"artifact        {info['artifact']} (schema version {info['schema_version']}{rows})"]
    record = info["provenance"]
    if record is None:
        lines.append("provenance      none recorded (written before artifacts recorded it, or not by a stage)")
        return "\n".join(lines)
    lines.append(f"stage           {record['stage']} (code {record['code_version']})")
    lines.append(f"config          sha256 {record['config_sha256']}")
    lines += [f"  {key} = {json.dumps(value)}" for key, value in _flat(record["config"])] or ["  (no section)"]
    lines.append("models" if record["models"] else "models          none")
    for entry in record["models"]:
        if entry["revision"] is None and entry["sha256"] is None:
            identity = "revision unknown (the local hub cache names no commit for it)"
        else:
            identity = "  ".join(f"{key} {entry[key]}" for key in ("revision", "sha256") if entry[key] is not None)
        lines.append(f"  {entry['role']:<16} {entry['path']}  {identity}")
    lines.append("upstream" if record["upstream"] else "upstream        none")
    lines += [f"  {entry['artifact']:<16} {entry['stage']} (code {entry['code_version']}), config sha256 "
              f"{entry['config_sha256']}" for entry in record["upstream"]]
    lines.append("libraries       " + ", ".join(f"{name} {version or '(not installed)'}"
                                               for name, version in record["libraries"].items()))
    return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of nested mappings; lists are leaves."""
    if isinstance(value, Mapping) and value:
        return [pair for key, item in value.items() for pair in _flat(item, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value)] if prefix else []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a .parquet table, a .zarr attention store or a metrics .json file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        info = describe(args.path)
    except NotAnArtifact as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    sys.stdout.write((json.dumps(info, indent=2) if args.json else format_text(info)) + "\n")


if __name__ == "__main__":
    main()
