"""Parquet tables of the pipeline (manifest, generations, phrases, masks).

Every table is written with the pyarrow schema declared in :mod:`schemas.artifacts`, which carries
the schema version, with the provenance record the stage gives (schema metadata ``aas.provenance``,
JSON; :func:`read_provenance`) and with a CRC checksum per page; readers check the artifact name and
the version before returning a DataFrame. A file that cannot be read back (truncated by a crash or a
full disk, a page that fails its checksum) raises :class:`CorruptArtifactError` naming the file and the rule that
rewrites it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.artifacts import ARTIFACT_KEY, PROVENANCE_KEY, SCHEMA_VERSION, TABLES, VERSION_KEY, WRITTEN_BY
from stages.io.atomic import NOT_WRITABLE, atomic_path


class ArtifactError(ValueError):
    """An artifact is missing, of another schema version, or not the artifact it claims to be."""


class CorruptArtifactError(ArtifactError):
    """An artifact's bytes cannot be read back (a truncated or corrupt file). Stages let it propagate:
    the job fails with a message naming the file and the rule that rewrites it."""


def rule_writing(artifact: str) -> str:
    """The workflow rule that writes ``artifact`` (:data:`schemas.artifacts.WRITTEN_BY`)."""
    return WRITTEN_BY.get(artifact, "that wrote it")


def unreadable(path: str | os.PathLike, artifact: str, exc: BaseException) -> CorruptArtifactError:
    """The error for an ``artifact`` file at ``path`` whose bytes failed to read with ``exc``."""
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CorruptArtifactError(f"{path} is unreadable (truncated or corrupt: {detail}): delete it and rerun "
                                f"rule {rule_writing(artifact)}")


def schema_of(artifact: str) -> pa.Schema:
    try:
        return TABLES[artifact]
    except KeyError:
        raise ArtifactError(f"unknown artifact {artifact!r}; known: {sorted(TABLES)}") from None


def to_arrow(rows: Iterable[Mapping[str, Any]], artifact: str) -> pa.Table:
    """Build a table of ``artifact``'s schema from dict rows (missing keys become null, except that a row
    without a ``sample_id`` key takes its ``image_id``: the sample of a data set with one sample per
    image, :data:`schemas.artifacts.SCHEMA_VERSION` 3)."""
    schema = schema_of(artifact)
    return pa.Table.from_pylist([_with_sample_id(r) for r in rows], schema=schema)


def _with_sample_id(row: Mapping[str, Any]) -> dict[str, Any]:
    row = dict(row)
    if "sample_id" not in row and "image_id" in row:
        row["sample_id"] = row["image_id"]
    return row


def write_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table, path: str | os.PathLike,
                artifact: str, provenance: Mapping[str, Any] | None = None) -> pa.Table:
    """Write ``rows`` as ``artifact`` to ``path`` atomically and return the table written; ``provenance``
    (:func:`stages.provenance.record`) goes into the schema metadata as JSON."""
    schema = schema_of(artifact)
    if isinstance(rows, pa.Table):
        table = rows.select(schema.names).cast(schema)
    elif isinstance(rows, pd.DataFrame):
        if "sample_id" not in rows.columns and "image_id" in rows.columns:
            rows = rows.assign(sample_id=rows["image_id"])    # one sample per image (see to_arrow)
        table = pa.Table.from_pandas(rows[schema.names], schema=schema, preserve_index=False)
    else:
        table = to_arrow(rows, artifact)
    if provenance is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    return table


def read_arrow(path: str | os.PathLike, artifact: str) -> pa.Table:
    """Read ``artifact`` from ``path``, checking its name and schema version; CorruptArtifactError when
    the file is truncated or corrupt."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{artifact} file not found: {path}")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in NOT_WRITABLE:
            raise                                   # not readable by this user: not a corrupt file
        raise unreadable(path, artifact, exc) from exc
    meta = table.schema.metadata or {}
    found = meta.get(ARTIFACT_KEY, b"").decode()
    version = meta.get(VERSION_KEY, b"").decode()
    if found != artifact:
        raise ArtifactError(f"{path} holds artifact {found or '(none)'!r}, expected {artifact!r}")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version or '(none)'}, this code reads version {SCHEMA_VERSION}; "
            f"rerun rule {rule_writing(artifact)} to rewrite it")
    return table.cast(schema_of(artifact))


def read_metadata(path: str | os.PathLike) -> dict[bytes, bytes]:
    """The schema metadata of the Parquet file at ``path`` (only its footer is read); ArtifactError when
    there is no such file, CorruptArtifactError when it is no readable Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Parquet file not found: {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in NOT_WRITABLE:
            raise
        raise unreadable(path, "table", exc) from exc
    return dict(schema.metadata or {})


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance record of the table at ``path``; None for a table written without one."""
    raw = read_metadata(path).get(PROVENANCE_KEY)
    return None if raw is None else json.loads(raw)


def read_table(path: str | os.PathLike, artifact: str) -> pd.DataFrame:
    """Read ``artifact`` from ``path`` into a DataFrame (list columns become numpy arrays)."""
    return read_arrow(path, artifact).to_pandas()


def read_tables(paths: Iterable[str | os.PathLike], artifact: str) -> pd.DataFrame:
    """Concatenate ``artifact`` tables from several shards, in the order given."""
    tables = [read_arrow(p, artifact) for p in paths]
    if not tables:
        return schema_of(artifact).empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()
