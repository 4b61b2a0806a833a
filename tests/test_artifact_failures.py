"""Failures around artifacts: a folder that cannot be written, a full disk, leftovers of a killed write,
and a truncated or corrupt artifact left by an earlier run.

Writing: every writer (a Parquet table, the attention store, a whole stage) raises an OSError naming
the artifact, its folder and the remedy (a PermissionError for a read-only folder) and leaves nothing
under the artifact's name, nor a temporary file. Reading: a damaged file raises CorruptArtifactError
naming it and the rule that rewrites it, also through the stages that read it (never error rows).
The read-only cases run in a child process: as root (this machine) without CAP_DAC_OVERRIDE, so that
file modes bind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr.storage._local as zarr_local
from test_phrases import DOG_PIECES, generation
from test_segment import rows_with_peaks, write_shard

from stages import phrases, segment
from stages.io.atomic import TMP_MARK
from stages.io.attention import AttentionWriter, open_attention, read_rows
from stages.io.tables import CorruptArtifactError, read_table, write_table
from stages.phrases import PhrasesConfig
from stages.segment import SamConfig, SegmentConfig

ROOT = Path(__file__).resolve().parents[1]
REDUCTION = {"layers": "all", "heads": "all", "statistic": "mean"}


# --- the writers: (name, artifact path under `out`, function writing it) ---------------------------------
# Each takes the artifact's path and a folder of inputs written beforehand (prepare_inputs).

def prepare_inputs(inputs: Path) -> None:
    write_table([generation("7", DOG_PIECES)], inputs / "generations.parquet", "generations")


def write_phrases_table(path: Path, inputs: Path) -> None:
    write_table([{"image_id": "7", "phrase_index": 0, "text": "A brown dog", "token_indices": [2, 3]}],
                path, "phrases")


def write_attention_store(path: Path, inputs: Path) -> None:
    """20 values with 16-value shard files: one shard file is written by append, the rest by close."""
    with AttentionWriter(path, model="m", reduction=REDUCTION, grid_covers="image", chunk_values=8,
                         chunks_per_shard=2) as writer:
        writer.append(np.full((5, 2, 2), 0.25, dtype=np.float32))


def run_phrases_stage(path: Path, inputs: Path) -> None:
    """The phrases stage on one answer."""
    phrases.run(PhrasesConfig(), inputs / "generations.parquet", path)


WRITERS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "phrases table": ("main/toy/phrases/shard-0.parquet", write_phrases_table),
    "attention store": ("main/toy/attention/shard-0.zarr", write_attention_store),
    "phrases stage": ("main/toy/phrases/shard-0.parquet", run_phrases_stage),
}


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- a read-only folder ---------------------------------------------------------------------------------

# Which folder is read-only: the artifact's own folder (it exists), or `out` (the artifact's folder
# cannot be created).
READ_ONLY = {"artifact folder": lambda out, artifact: artifact.parent, "out folder": lambda out, artifact: out}


def read_only_case(base: Path, writer: str, shape: str) -> dict:
    """Child process: make the folder read-only, run the writer, report what it raised and what is left."""
    relative, write = WRITERS[writer]
    out = base / "results"
    artifact = out / relative
    locked = READ_ONLY[shape](out, artifact)
    locked.mkdir(parents=True, exist_ok=True)
    prepare_inputs(base / "inputs")
    before = listing(out)
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.touch()
            probe.unlink()
            return {"skip": f"{locked} is writable after chmod 555 (file modes do not bind here)"}
        except PermissionError:
            pass
        try:
            write(artifact, base / "inputs")
            return {"raised": None}
        except Exception as exc:  # noqa: BLE001 (reported to the test, whatever it is)
            return {"raised": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc),
                    "artifact": str(artifact), "folder": str(locked), "before": before, "after": listing(out)}
    finally:
        locked.chmod(0o755)


@pytest.fixture(scope="module")
def read_only_results(tmp_path_factory):
    """Every (writer, read-only folder) case, run in one child process whose file modes bind: as root,
    without the capabilities that bypass them (setpriv)."""
    base = tmp_path_factory.mktemp("read-only")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot be made to bind")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*prefix, sys.executable, __file__, "read-only", str(base)], check=False,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", list(READ_ONLY))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_read_only_folder_is_a_permission_error_naming_the_artifact(read_only_results, writer, shape):
    """The error names the artifact and the folder that is not writable, and says what to do; nothing
    is left in the folder, under the artifact's name or a temporary one."""
    report = read_only_results[f"{writer} / {shape}"]
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report["raised"] == "PermissionError" and report["errno"] == errno.EACCES, report
    assert report["message"].startswith(
        f"[Errno 13] cannot write {report['artifact']}: the folder {report['folder']} is not writable "
        "(permission denied); make it writable, or set `out` to a writable folder, and rerun. "
        "Nothing was written under that name"), report["message"]
    assert report["after"] == report["before"]


# --- a full disk ----------------------------------------------------------------------------------------

@pytest.fixture
def fill_the_disk(monkeypatch):
    """A function that, once called, makes every Parquet write and every Zarr chunk write fill the disk
    half-way through: part of the file is written, then ENOSPC."""
    real_write_table = pq.write_table
    real_put = zarr_local._put

    def write_table_fills_the_disk(table, where, *args, **kwargs):
        real_write_table(table, where, *args, **kwargs)
        os.truncate(where, os.path.getsize(where) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def put_fills_the_disk(path, value, *args, **kwargs):
        if "/c/" not in Path(path).as_posix():          # metadata goes through, chunk data does not
            return real_put(path, value, *args, **kwargs)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"\0" * 7)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fill() -> None:
        monkeypatch.setattr(pq, "write_table", write_table_fills_the_disk)
        monkeypatch.setattr(zarr_local, "_put", put_fills_the_disk)
    return fill


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_is_an_error_naming_the_artifact_and_leaves_nothing(tmp_path, fill_the_disk, writer):
    relative, write = WRITERS[writer]
    out = tmp_path / "results"
    artifact = out / relative
    artifact.parent.mkdir(parents=True)
    prepare_inputs(tmp_path / "inputs")
    fill_the_disk()
    with pytest.raises(OSError) as raised:
        write(artifact, tmp_path / "inputs")
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value).startswith(
        f"[Errno 28] cannot write {artifact}: no space left on the device holding {artifact.parent} "
        "(disk full or quota exceeded); free some space and rerun. Nothing was written under that name")
    assert listing(artifact.parent) == []           # neither the artifact nor a temporary file


# --- leftovers of a killed write --------------------------------------------------------------------------

@pytest.mark.parametrize("writer", list(WRITERS))
def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path, writer):
    """A job killed mid-write leaves its temporary file or folder; the next write of the same artifact
    removes it, and leaves those of other artifacts alone."""
    relative, write = WRITERS[writer]
    artifact = tmp_path / "results" / relative
    artifact.parent.mkdir(parents=True)
    killed_file = artifact.with_name(f".{artifact.name}{TMP_MARK}0badf00d")
    killed_folder = artifact.with_name(f".{artifact.name}{TMP_MARK}deadbeef")
    other = artifact.with_name(f".shard-1{artifact.suffix}{TMP_MARK}0badf00d")
    killed_file.write_bytes(b"PAR1 half a table")
    (killed_folder / "values").mkdir(parents=True)
    other.write_bytes(b"another job's")
    prepare_inputs(tmp_path / "inputs")
    write(artifact, tmp_path / "inputs")
    assert artifact.exists() and not killed_file.exists() and not killed_folder.exists()
    assert other.exists()


# --- damaged artifacts, read back -----------------------------------------------------------------------

ROWS = {
    "manifest": [{"image_id": "7", "file": "images/7.png", "width": 4, "height": 4, "shard": 0}],
    "generations": [generation("7", DOG_PIECES)],
    "phrases": [{"image_id": "7", "phrase_index": k, "text": f"phrase number {k}", "token_indices": [k]}
                for k in range(200)],
    "masks": [{"image_id": "7", "phrase_index": 0, "mask_index": 0, "text": "a dog", "score": 0.9,
               "rle_counts": "1", "height": 4, "width": 4, "area": 16}],
}


def unreadable(path: Path, rule: str) -> str:
    return rf"^{re.escape(str(path))} is unreadable \(truncated or corrupt: .+\): delete it and rerun rule {rule}$"


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_page_byte(path: Path) -> None:
    """Flip the last byte of the `text` column's data: inside a data page, after its header."""
    parquet = pq.ParquetFile(path)
    column = parquet.metadata.row_group(0).column(parquet.schema_arrow.names.index("text"))
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + column.total_compressed_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("artifact, rule, damage", [
    ("manifest", "manifest", truncate),
    ("generations", "generate", truncate),
    ("phrases", "phrases", truncate),
    ("masks", "segment", truncate),
    ("phrases", "phrases", flip_a_page_byte),         # the page checksum catches it
    ("phrases", "phrases", lambda path: path.write_bytes(b"")),
])
def test_a_damaged_table_names_the_rule_to_rerun(tmp_path, artifact, rule, damage):
    path = tmp_path / "results" / "main" / "toy" / artifact / "shard-0.parquet"
    write_table(ROWS[artifact], path, artifact)
    assert len(read_table(path, artifact)) == len(ROWS[artifact])
    damage(path)
    with pytest.raises(CorruptArtifactError, match=unreadable(path, rule)):
        read_table(path, artifact)


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


# 10 maps of 2 x 2 = 40 values: with 8-value chunks and 2 chunks per shard file, shard files c/0, c/1, c/2.
MAPS = np.random.default_rng(1).random((10, 2, 2), dtype=np.float32)


def flip_a_stored_value(path: Path) -> None:
    """Flip one bit of a value where it is stored verbatim (random values do not compress: Zstd keeps
    them raw), in the first chunk of shard file c/1 (values 16..23). Without a checksum this reads back
    as another value, silently."""
    data = bytearray(path.read_bytes())
    at = data.find(MAPS.astype(np.float16).ravel()[16:24].tobytes())
    assert at >= 0
    data[at + 3] ^= 0x04
    path.write_bytes(bytes(data))


STORE_DAMAGE = {
    "a flipped bit in a stored value": ("values/c/1", flip_a_stored_value),
    "a chunk overwritten with garbage": ("values/c/1", garbage),
    "a truncated shard file": ("values/c/1", truncate),
    "a missing shard file": ("values/c/1", Path.unlink),
    "an empty shard file": ("values/c/2", lambda path: path.write_bytes(b"")),
    "garbage group metadata": ("zarr.json", lambda path: path.write_bytes(b"{not json")),
    "garbage array metadata": ("values/zarr.json", lambda path: path.write_bytes(b"\0\0")),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_a_damaged_attention_store_names_rule_generate(tmp_path, damage):
    """Whatever is damaged, reading the store's maps raises an error naming it and rule generate: a
    missing shard file is never read as zeros."""
    path = tmp_path / "results" / "main" / "toy" / "attention" / "shard-0.zarr"
    with AttentionWriter(path, model="m", reduction=REDUCTION, grid_covers="image", chunk_values=8,
                         chunks_per_shard=2) as writer:
        writer.append(MAPS)
    np.testing.assert_array_equal(read_rows(open_attention(path), 0, 10, (2, 2)), MAPS.astype(np.float16))
    part, damage_it = STORE_DAMAGE[damage]
    damage_it(path / part)
    with pytest.raises(CorruptArtifactError, match=unreadable(path, "generate")):
        read_rows(open_attention(path), 0, 10, (2, 2))


def test_a_corrupt_attention_chunk_stops_the_segment_stage(tmp_path):
    """Segment turns a failing image into an error row, but not a damaged store: the job fails, names
    the store and rule generate, and writes no masks."""
    rows = rows_with_peaks(3, [(1, (2, 3), 0.5)])
    paths = write_shard(tmp_path, [{"image_id": "x", "size": (30, 30), "rows": rows, "phrases": [[1]]}])
    garbage(paths["attention"] / "values" / "c" / "0")
    with pytest.raises(CorruptArtifactError, match=unreadable(paths["attention"], "generate")):
        segment.run(SegmentConfig(prompt="attention"), SamConfig(type="tiny", checkpoint="unused"),
                    paths["manifest"], paths["generations"], paths["attention"], paths["phrases"],
                    paths["masks"], device="cpu")
    assert not paths["masks"].exists()


def test_a_truncated_generations_table_stops_the_phrases_stage(tmp_path):
    generations, out = tmp_path / "generations" / "shard-0.parquet", tmp_path / "phrases" / "shard-0.parquet"
    write_table([generation("7", DOG_PIECES)], generations, "generations")
    truncate(generations)
    with pytest.raises(CorruptArtifactError, match=unreadable(generations, "generate")):
        phrases.run(PhrasesConfig(), generations, out)
    assert not out.exists()


if __name__ == "__main__" and sys.argv[1:2] == ["read-only"]:
    # The child process of read_only_results: every (writer, read-only folder) case, one JSON line.
    base = Path(sys.argv[2])
    reports = {f"{writer} / {shape}": read_only_case(base / f"{k}-{j}", writer, shape)
               for k, writer in enumerate(WRITERS) for j, shape in enumerate(READ_ONLY)}
    print(json.dumps(reports))
