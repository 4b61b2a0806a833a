"""Safety: no code runs from a checkpoint or a model folder, and no config value puts an output outside
the run folder."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from test_workflow import ROOT, snakemake, write_config

from stages.config import ConfigError, config_schema, run_folder

SCANNED = ("stages", "schemas", "workflow", "bench")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib"}
PICKLE_LOADERS = {"load", "loads", "Unpickler"}
# transformers' Auto* classes, which run a model folder's own code when told to trust it.
AUTO_CLASS = re.compile(r"Auto(Config|Tokenizer|Processor|ImageProcessor|FeatureExtractor|VideoProcessor"
                        r"|Model\w*)")


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    """Whether ``call`` passes ``name=value`` with ``value`` a literal."""
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for an attribute chain on a name, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def unsafe_loads(source: str) -> list[str]:
    """Line and description of every call in ``source`` that may unpickle or run a model's own code:
    torch.load without weights_only=True; pickle (and kin) loads; pandas' read_pickle; numpy's load with
    allow_pickle other than False; trust_remote_code other than False; a transformers Auto* class's or
    pipeline's from_pretrained without trust_remote_code=False (which would prompt, or follow the
    library's default)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            found += [f"line {node.lineno}: from {node.module} import {alias.name}"
                      for alias in node.names if alias.name in PICKLE_LOADERS]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        module, _, function = name.rpartition(".")
        problems = []
        if name == "torch.load" and not _keyword_is(node, "weights_only", True):
            problems.append("torch.load without weights_only=True")
        if module in PICKLE_MODULES and function in PICKLE_LOADERS:
            problems.append(f"{name} (unpickles)")
        if function == "read_pickle":
            problems.append(f"{name} (unpickles)")
        if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords) \
                and not _keyword_is(node, "allow_pickle", False):
            problems.append(f"{name} with allow_pickle")
        if any(k.arg == "trust_remote_code" for k in node.keywords) \
                and not _keyword_is(node, "trust_remote_code", False):
            problems.append(f"{name} with trust_remote_code other than False")
        elif ((function == "from_pretrained" and AUTO_CLASS.fullmatch(module.rpartition(".")[2]))
              or name in ("pipeline", "transformers.pipeline")) \
                and not _keyword_is(node, "trust_remote_code", False):
            problems.append(f"{name} without trust_remote_code=False")
        found += [f"line {node.lineno}: {problem}" for problem in problems]
    return found


@pytest.mark.parametrize("source", [
    "torch.load(path)",
    "torch.load(path, weights_only=False)",
    "torch.load(path, weights_only=flag)",
    "pickle.load(stream)",
    "pickle.loads(data)",
    "from pickle import loads",
    "joblib.load(path)",
    "pd.read_pickle(path)",
    "np.load(path, allow_pickle=True)",
    "AutoModel.from_pretrained(path, trust_remote_code=True)",
    "transformers.AutoProcessor.from_pretrained(path)",
    "AutoModelForCausalLM.from_pretrained(path, dtype=dtype)",
    "pipeline('feature-extraction', model=path)",
])
def test_the_scan_finds_every_unsafe_load(source):
    assert unsafe_loads(source), source


@pytest.mark.parametrize("source", [
    "torch.load(path, map_location='cpu', weights_only=True)",
    "np.load(path)",
    "np.load(path, allow_pickle=False)",
    "AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
    "AutoencoderKL.from_pretrained(path, subfolder='vae')",  # diffusers: runs no folder code
    "LlavaForConditionalGeneration.from_pretrained(path)",
    "error = pickle.UnpicklingError",
])
def test_the_scan_lets_safe_loads_pass(source):
    assert unsafe_loads(source) == []


def test_no_source_unpickles_or_trusts_a_models_code():
    """Python sources are scanned with ast; the Snakemake files (not plain Python) for the names."""
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)} {problem}" for problem in unsafe_loads(path.read_text())]
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle|torch\.load|trust_remote_code|np\.load", line):
                found.append(f"{path.relative_to(ROOT)} line {number}: {line.strip()}")
    assert found == [], "\n".join(found)


# ---- Checkpoints in pickle formats: what would run code is refused, and nothing runs.

class RunsCodeWhenUnpickled:
    """Unpickling this object creates the folder ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _sam_checkpoint(folder: Path, payload) -> None:
    torch.save(payload, folder / "sam_vit_b.pth")


def _read_sam(folder: Path):
    from stages.models.sam import read_state_dict

    return read_state_dict(folder / "sam_vit_b.pth")


def _llava_weights(folder: Path, payload) -> None:
    torch.save(payload, folder / "pytorch_model.bin")


def _read_llava(folder: Path):
    from stages.models.llava_v1 import read_state_dict

    return read_state_dict(folder)


def _difflmm_projector(folder: Path, payload) -> None:
    torch.save(payload, folder / "non_lora_trainables.bin")


def _read_difflmm(folder: Path):
    from stages.models.difflmm import non_lora_state

    return non_lora_state(folder)


@pytest.mark.parametrize("write, read, what", [
    (_sam_checkpoint, _read_sam, "SAM checkpoint"),
    (_llava_weights, _read_llava, "LLaVA weights"),
    (_difflmm_projector, _read_difflmm, "DiffLMM projector weights"),
])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, write, read, what):
    marker = tmp_path / "code-ran"
    write(tmp_path, {"model.mm_projector.0.weight": torch.zeros(2), "extra": RunsCodeWhenUnpickled(marker)})
    with pytest.raises(ConfigError, match=rf"{what} .* was refused: it holds more than tensors .*mkdir"):
        read(tmp_path)
    assert not marker.exists()
    # The file is live: an unrestricted load runs its code.
    torch.load(next(p for p in tmp_path.iterdir() if p.suffix in (".pth", ".bin")), weights_only=False)
    assert marker.is_dir()


def test_a_checkpoint_of_tensors_still_loads(tmp_path):
    _llava_weights(tmp_path, {"model.embed_tokens.weight": torch.ones(2, 3)})
    assert torch.equal(_read_llava(tmp_path)["model.embed_tokens.weight"], torch.ones(2, 3))


@pytest.mark.parametrize("codec", [{"filters": [{"id": "pickle"}], "compressor": None},
                                   {"filters": None, "compressor": {"id": "pickle"}}])
def test_an_attention_store_that_would_unpickle_is_refused_and_nothing_runs(tmp_path, codec):
    """Artifacts hold no pickles: a Zarr (v2 layout) store whose values go through numcodecs' pickle
    codec, with the attention store's attributes, is refused before any chunk is decoded."""
    from schemas.artifacts import ATTENTION_ARRAY, SCHEMA_VERSION
    from stages.io.attention import open_attention

    store, marker = tmp_path / "shard-0.zarr", tmp_path / "code-ran"
    (store / ATTENTION_ARRAY).mkdir(parents=True)
    (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (store / ".zattrs").write_text(json.dumps({"artifact": "attention", "schema_version": SCHEMA_VERSION,
                                               "grid_covers": "image"}))
    (store / ATTENTION_ARRAY / ".zarray").write_text(json.dumps(
        {"zarr_format": 2, "shape": [2], "chunks": [2], "dtype": "<f2", "fill_value": 0, "order": "C",
         "dimension_separator": ".", **codec}))
    (store / ATTENTION_ARRAY / "0").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ValueError, match="pickle"):
        open_attention(store)[:]
    assert not marker.exists()


# ---- Model folders whose config asks for their own code: refused with the config key named.

@pytest.fixture
def remote_code_model(tmp_path):
    """A model folder whose config, tokenizer and processor classes live in its own Python files, each of
    which creates the folder `code-ran` beside the model when imported."""
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel",
                "AutoProcessor": "custom.CustomProcessor", "AutoTokenizer": ["custom.CustomTokenizer", None]}
    (folder / "config.json").write_text(json.dumps({"model_type": "custom_remote", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    (folder / "processor_config.json").write_text(json.dumps({"auto_map": auto_map}))
    (folder / "custom.py").write_text(f"import os\nos.mkdir({str(tmp_path / 'code-ran')!r})\n")
    return folder


def _load_lmm(family: str):
    def load(path: str):
        from stages.models.registry import load_lmm

        return load_lmm(family, path, dtype=torch.float32, attn_implementation="sdpa",
                        device=torch.device("cpu"))

    return load


def _text_encoder(path: str):
    from stages.text_encoders import TransformerMeanEncoder

    return TransformerMeanEncoder(path)


def _tokenizer(path: str):
    from stages.models.llava_v1 import load_tokenizer

    return load_tokenizer(Path(path), path)


@pytest.mark.parametrize("load, named", [
    (_load_lmm("llava"), "lmm.path"),
    (_load_lmm("llava_next"), "lmm.path"),
    (_load_lmm("qwen2_5_vl"), "lmm.path"),
    (_text_encoder, "text encoder"),
    (_tokenizer, "tokenizer"),
])
def test_a_model_that_needs_its_own_code_is_refused_and_nothing_runs(remote_code_model, load, named):
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(named)}.*custom code"):
        load(str(remote_code_model))
    assert not (remote_code_model.parent / "code-ran").exists()


# ---- The run folder: no config value puts an output outside it.

@pytest.mark.parametrize("out, problem", [
    ("", "is empty"),
    ("/tmp/elsewhere", "absolute"),
    ("../elsewhere", "'..'"),
    ("results/../../elsewhere", "'..'"),
    ("results/{run}", "wildcards"),
])
def test_an_out_folder_outside_the_working_directory_is_refused(out, problem):
    with pytest.raises(ConfigError, match=rf"^out \(.*\) .*{re.escape(problem)}"):
        run_folder({"out": out})


@pytest.mark.parametrize("out, folder", [("results", "results"), ("results/", "results"),
                                         ("./runs/a", "runs/a"), ("runs/a..b", "runs/a..b")])
def test_an_out_folder_inside_the_working_directory_is_kept(out, folder):
    assert run_folder({"out": out}) == folder


def test_the_workflow_refuses_an_escaping_out_folder_naming_the_key(tmp_path):
    write_config(tmp_path, out="../outside")
    result = snakemake(tmp_path, "--cores", "1", "--dry-run", check=False)
    assert result.returncode != 0
    assert "out ('../outside') climbs out of the working directory" in result.stdout + result.stderr
    assert not (tmp_path.parent / "outside").exists()


def schema_errors(config: dict) -> list[str]:
    """Where the config breaks the schema (the paths of its failing keys)."""
    validator = jsonschema.Draft202012Validator(config_schema())
    return [error.json_path for error in validator.iter_errors(config)]


@pytest.mark.parametrize("name", ["models", "logs", "benchmarks", "manifests", "synthetic", "main", "..",
                                  "a/b", "/abs", ""])
def test_a_variant_cannot_take_a_workflow_folder_or_a_path_as_its_name(name):
    """Variant names become folders under {out}: plain names only, and none of the folders the workflow
    writes beside the runs."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["variants"] = {name: {"segment": {"pool": "max"}}}
    assert schema_errors(config) == ["$.variants"]


@pytest.mark.parametrize("name", ["..", "a/b", "/abs", "a.b", ""])
def test_a_data_set_name_cannot_be_a_path(name):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["datasets"] = {name: config["datasets"]["toy_gcg"]}
    assert schema_errors(config) == ["$.datasets"]
