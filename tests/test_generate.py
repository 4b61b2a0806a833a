"""Generate stage: prompts, padding to square, token spans, and whole shards on edge-case images."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages import generate
from stages.config import ConfigError
from stages.generate import GenerateConfig, LMMConfig, build_prompt, expand_to_square, token_char_spans
from stages.io.attention import attention_attrs, open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.models.registry import LMM_FAMILIES, load_lmm
from stages.toy.model import build_toy_llava

CAPTIONS = ["A red square sits left of a blue circle.", "Two green triangles, one small dog and a cat."]


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return build_toy_llava(tmp_path_factory.mktemp("toy") / "llava", CAPTIONS, seed=0)


@pytest.fixture(scope="module")
def toy_processor(toy_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(toy_path)


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def edge_case_manifest(tmp_path_factory):
    """A shard of good and awkward images, a missing file, a manifest error row, and another shard."""
    folder = tmp_path_factory.mktemp("images")

    def save(name: str, image: Image.Image) -> str:
        image.save(folder / name)
        return str(folder / name)

    files = {
        "good_wide": save("good_wide.png", Image.fromarray(noise(60, 100, 1))),
        "good_tall": save("good_tall.jpg", Image.fromarray(noise(90, 50, 2))),
        "missing": str(folder / "missing.png"),
        "gray": save("gray.png", Image.fromarray(noise(40, 40, 3)).convert("L")),
        "rgba": save("rgba.png", Image.fromarray(noise(40, 70, 4)).convert("RGBA")),
        "cmyk": save("cmyk.jpg", Image.fromarray(noise(50, 30, 5)).convert("CMYK")),
        "palette": save("palette.png", Image.fromarray(noise(33, 45, 6)).convert("P")),
        "one_pixel": save("one_pixel.png", Image.fromarray(noise(1, 1, 7))),
        "sixteen_bit": save("sixteen_bit.png", Image.fromarray(
            np.random.default_rng(8).integers(0, 65535, (20, 30), dtype=np.uint16))),
    }
    rows = [{"image_id": image_id, "file": path, "width": None, "height": None, "shard": 0, "error": None}
            for image_id, path in files.items()]
    rows.insert(3, {"image_id": "bad_header", "file": "x.png", "width": None, "height": None, "shard": 0,
                    "error": "unreadable image x.png"})
    rows.append({"image_id": "other_shard", "file": files["good_wide"], "width": None, "height": None,
                 "shard": 1, "error": None})
    path = folder / "manifest.parquet"
    write_table(rows, path, "manifest")
    return path


def run_shard(tmp_path, toy_path, manifest, name="run", **generate_options):
    cfg = GenerateConfig(**{"max_new_tokens": 6, "batch_size": 2, **generate_options})
    generations, attention = tmp_path / f"{name}.parquet", tmp_path / f"{name}.zarr"
    generate.run(cfg, LMMConfig(path=str(toy_path)), manifest, 0, generations, attention, device="cpu")
    return read_table(generations, "generations"), open_attention(attention), attention


# --- prompts and images -------------------------------------------------------------------------

def test_prompt_follows_the_model_chat_template(toy_processor):
    assert build_prompt(toy_processor, "Describe the image in detail.", None) == \
        "USER: <image>\nDescribe the image in detail. ASSISTANT:"
    assert build_prompt(toy_processor, "What is it?", LLAVA_V1_SYSTEM) == \
        f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"


def test_expand_to_square_centres_the_image_on_the_background():
    image = Image.fromarray(np.full((2, 5, 3), 200, dtype=np.uint8))
    square = np.asarray(expand_to_square(image, (1, 2, 3)))
    assert square.shape == (5, 5, 3)
    assert (square[1:3] == 200).all()            # offset (5 - 2) // 2 = 1, as LLaVA's expand2square
    assert (square[[0, 3, 4]] == (1, 2, 3)).all()
    assert expand_to_square(image.resize((4, 4)), (0, 0, 0)).size == (4, 4)


# --- token spans ----------------------------------------------------------------------------------

def prefix_spans(tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    """The release's O(T^2) way: the span of token j lies between the decodings of prefixes j and j+1."""
    lengths = [len(tokenizer.decode(ids[:j], skip_special_tokens=True)) for j in range(len(ids) + 1)]
    return lengths[:-1], lengths[1:]


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained offline on ASCII only: a non-ASCII character
    becomes one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def byte_fallback_tokenizer():
    """A tokenizer shaped like LLaVA-1.5's (Llama/Vicuna): BPE over "▁"-joined text with byte fallback
    (<0xE7> ...) for unknown characters, decoded by Replace + ByteFallback + Fuse + Strip(1 space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    learner.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 5, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("which", ["toy", "byte-fallback"])
def test_token_spans_agree_with_prefix_decoding(toy_processor, which):
    tokenizer = toy_processor.tokenizer if which == "toy" else byte_fallback_tokenizer()
    # Byte tokens are left out: a prefix ending inside a character decodes to U+FFFD, see below.
    candidates = [i for i, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
                  if not token.startswith("<0x")]
    rng = np.random.default_rng(0)
    for length in (1, 2, 3, 7, 40, 40, 40, 40, 40, 120):
        ids = rng.choice(candidates, length).tolist()                  # special tokens included
        answer, starts, ends, special = token_char_spans(tokenizer, ids)
        assert answer == tokenizer.decode(ids, skip_special_tokens=True)
        assert (starts, ends) == prefix_spans(tokenizer, ids)
        assert special == [i in tokenizer.all_special_ids for i in ids]
        assert "".join(answer[s:e] for s, e in zip(starts, ends, strict=True)) == answer


def test_token_spans_reconstruct_each_word(toy_processor):
    tokenizer = toy_processor.tokenizer
    caption = CAPTIONS[1]
    ids = tokenizer.encode(caption, add_special_tokens=False) + [tokenizer.eos_token_id]
    answer, starts, ends, special = token_char_spans(tokenizer, ids)
    assert answer == caption
    pieces = [answer[s:e] for s, e in zip(starts, ends, strict=True)]
    assert pieces[:4] == ["Two", " green", " triangles", ","]
    assert pieces[-1] == "" and special[-1] and starts[-1] == len(answer)


@pytest.mark.parametrize(("make_tokenizer", "byte_tokens"), [
    (byte_level_tokenizer, ("ç", "Į", "«")),
    (byte_fallback_tokenizer, ("<0xE7>", "<0x8C>", "<0xAB>")),
], ids=["byte-level", "byte-fallback"])
def test_token_spans_with_characters_split_over_byte_tokens(make_tokenizer, byte_tokens):
    tokenizer = make_tokenizer()
    text = "the cat 猫 sat on a mat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    cat_bytes = [j for j, token in enumerate(tokens) if token in byte_tokens]
    assert len(cat_bytes) == 3, "猫 must be split into its three UTF-8 bytes"

    answer, starts, ends, special = token_char_spans(tokenizer, ids + [tokenizer.eos_token_id])
    assert answer == text
    assert not any(special[:-1]) and special[-1]
    # The three byte tokens of 猫 share the span of the character they complete together.
    assert {answer[starts[j]:ends[j]] for j in cat_bytes} == {"猫"}
    assert "".join(answer[starts[j]:ends[j]] for j in range(cat_bytes[0])) == "the cat "

    # Generation stopped inside the character: the answer keeps what decoding gives (U+FFFD).
    cut = ids[:cat_bytes[1] + 1]
    answer, starts, ends, _ = token_char_spans(tokenizer, cut)
    assert answer == tokenizer.decode(cut) and answer.endswith("\ufffd")
    assert answer[starts[-1]:ends[-1]] == answer[starts[-2]:ends[-2]] != ""


# --- whole shards ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edge_case_run(tmp_path_factory, toy_path, edge_case_manifest):
    return run_shard(tmp_path_factory.mktemp("run"), toy_path, edge_case_manifest)


def test_shard_completes_with_error_rows_for_unusable_inputs(edge_case_run, edge_case_manifest):
    table, _, _ = edge_case_run
    manifest = read_table(edge_case_manifest, "manifest")
    assert table["image_id"].tolist() == manifest.loc[manifest["shard"] == 0, "image_id"].tolist()
    errors = dict(zip(table["image_id"], table["error"], strict=True))
    assert "not found" in errors.pop("missing")
    assert errors.pop("bad_header") == "manifest: unreadable image x.png"
    assert all(pd.isna(error) for error in errors.values()), errors
    failed = table[table["finish_reason"] == "error"]
    assert set(failed["image_id"]) == {"missing", "bad_header"}
    assert (failed["num_tokens"] == 0).all()


def test_generations_and_attention_store_line_up(edge_case_run, toy_processor):
    table, rows, store_path = edge_case_run
    total = int(table["num_tokens"].sum())
    assert rows.shape == (total * 12 * 12,)
    sizes = table["num_tokens"] * 144
    assert table["attention_offset"].tolist() == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    attrs = attention_attrs(store_path)
    assert attrs["grid_covers"] == "padded_square"          # the toy LLaVA-1.5 pads (pad_to_square: auto)
    assert attrs["reduction"] == {"layers": "all", "heads": "all", "statistic": "mean"}
    values = read_rows(rows, 0, total, (12, 12))
    assert (values >= 0).all() and (values.reshape(len(values), -1).sum(axis=1) <= 1 + 1e-2).all()
    for row in table[table["error"].isna()].itertuples():
        assert row.num_tokens == 6 and row.finish_reason == "length" and (row.grid_h, row.grid_w) == (12, 12)
        assert row.prompt == "USER: <image>\nDescribe the image in detail. ASSISTANT:"
        assert row.answer == toy_processor.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        assert len(row.token_starts) == len(row.token_ends) == len(row.token_special) == row.num_tokens


def test_end_of_sequence_trims_the_answer_and_its_rows(tmp_path, toy_path, edge_case_manifest, edge_case_run):
    """With a token the toy emits declared end-of-sequence, generation stops at it: it is kept as the
    last token with its own row, finish_reason is "eos", and the rows before it are unchanged."""
    table, rows, _ = edge_case_run
    first = table.iloc[0]
    stop_index = 2
    stop_id = int(first.token_ids[stop_index])
    eos_path = tmp_path / "toy-eos"
    shutil.copytree(toy_path, eos_path)
    generation_config = json.loads((eos_path / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [generation_config["eos_token_id"], stop_id]
    (eos_path / "generation_config.json").write_text(json.dumps(generation_config))

    eos_table, eos_rows, _ = run_shard(tmp_path, eos_path, edge_case_manifest, name="eos")
    trimmed = eos_table.iloc[0]
    expected_tokens = list(first.token_ids).index(stop_id) + 1
    assert trimmed.finish_reason == "eos" and trimmed.num_tokens == expected_tokens
    assert list(trimmed.token_ids) == list(first.token_ids[:expected_tokens])
    np.testing.assert_allclose(read_rows(eos_rows, 0, expected_tokens, (12, 12)),
                               read_rows(rows, 0, expected_tokens, (12, 12)),
                               atol=1e-3)


def test_a_failing_batch_is_retried_image_by_image(tmp_path, toy_path, edge_case_manifest, monkeypatch):
    """Generation that fails for one image (here: a failure injected for the 40x70 RGBA image) costs
    only that image; its batch partner is answered normally."""
    real_generate_batch = generate._generate_batch

    def failing_for_rgba(lmm, capture, items, cfg, device):
        if any(item.image.size == (70, 70) for item in items):   # the only 70 px square after padding
            raise RuntimeError("injected failure")
        return real_generate_batch(lmm, capture, items, cfg, device)

    monkeypatch.setattr(generate, "_generate_batch", failing_for_rgba)
    table, rows, _ = run_shard(tmp_path, toy_path, edge_case_manifest, pad_to_square=True)
    errors = dict(zip(table["image_id"], table["error"], strict=True))
    assert errors["rgba"] == "generation failed: RuntimeError: injected failure"
    assert pd.isna(errors["gray"]) and pd.isna(errors["cmyk"])
    assert rows.shape[0] == int(table["num_tokens"].sum()) * 144


def test_pad_to_square_auto_follows_the_model_and_true_false_override_it(tmp_path, toy_path, monkeypatch):
    """The toy is LLaVA-1.5 (``pad_to_square`` True): auto pads a 40 x 30 image to 40 x 40 before the
    processor and the store says its grids cover the padded square; false sends it as it is, and as
    the CLIP processor resizes the shorter side and crops the centre, the store says the grids cover
    the centre square."""
    image = tmp_path / "wide.png"
    Image.fromarray(noise(30, 40, 3)).save(image)
    manifest = tmp_path / "manifest.parquet"
    write_table([{"image_id": "w", "file": str(image), "width": 40, "height": 30, "shard": 0, "error": None}],
                manifest, "manifest")
    sizes = []
    real_generate_batch = generate._generate_batch

    def recording_sizes(lmm, capture, items, cfg, device):
        sizes.extend(item.image.size for item in items)
        return real_generate_batch(lmm, capture, items, cfg, device)

    monkeypatch.setattr(generate, "_generate_batch", recording_sizes)
    for setting, size, covers in (("auto", (40, 40), "padded_square"), (False, (40, 30), "centre_square"),
                                  (True, (40, 40), "padded_square")):
        sizes.clear()
        table, _, store = run_shard(tmp_path, toy_path, manifest, name=f"pad-{setting}",
                                    pad_to_square=setting)
        assert sizes == [size] and attention_attrs(store)["grid_covers"] == covers
        assert (table["grid_h"].tolist(), table["grid_w"].tolist()) == ([12], [12])
    with pytest.raises(ConfigError, match="generate.pad_to_square"):
        GenerateConfig(pad_to_square="yes")


# --- configuration errors -------------------------------------------------------------------------

def test_progress_is_logged_as_lines_when_stderr_is_not_a_terminal(tmp_path, toy_path, caplog, capsys):
    """A job's stderr is its log file: the shard's progress is log lines there, not tqdm refreshes."""
    image = tmp_path / "one.png"
    Image.fromarray(noise(30, 40, 3)).save(image)
    manifest = tmp_path / "manifest.parquet"
    write_table([{"image_id": "one", "file": str(image), "width": 40, "height": 30, "shard": 0,
                  "error": None}], manifest, "manifest")
    caplog.set_level(logging.INFO, logger="stages.generate")
    assert not sys.stderr.isatty()  # pytest captures it
    generate.run(GenerateConfig(max_new_tokens=2), LMMConfig(path=str(toy_path)), manifest, 0,
                 tmp_path / "g.parquet", tmp_path / "a.zarr", device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate shard 0: sample")]
    assert len(lines) == 1 and re.fullmatch(r"generate shard 0: sample 1/1, \d+ s elapsed, ETA 0 s", lines[0])
    assert "generate shard" not in capsys.readouterr().err  # no bar (libraries may draw theirs)


def test_lmm_grid_is_refused_for_a_family_with_one_grid(tmp_path, toy_path, edge_case_manifest):
    with pytest.raises(ConfigError, match=r"lmm.grid \('base'\).*family 'llava' has one grid"):
        generate.run(GenerateConfig(), LMMConfig(path=str(toy_path), grid="base"), edge_case_manifest, 0,
                     tmp_path / "g.parquet", tmp_path / "a.zarr", device="cpu")
    with pytest.raises(ConfigError, match=r"lmm.grid 'middle' unknown for family 'llava_next'"):
        load_lmm("llava_next", str(toy_path), dtype=None, attn_implementation="sdpa", device="cpu", grid="middle")


def test_unknown_family_is_a_config_error_listing_known_ones(toy_path):
    known = re.escape(str(sorted(LMM_FAMILIES)))
    assert {"llava", "llava_original", "difflmm", "llava_next"} <= set(LMM_FAMILIES)
    with pytest.raises(ConfigError, match=rf"unknown LMM family 'llava-next-9'.*{known}"):
        load_lmm("llava-next-9", str(toy_path), dtype=None, attn_implementation="sdpa", device="cpu")


def test_the_registry_imports_a_family_module_only_when_that_family_is_loaded():
    code = ("import sys, stages.models.registry; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers') or m.startswith('stages.models.')))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout
    assert imported.strip() == "['stages.models.base', 'stages.models.registry']"


@pytest.mark.parametrize("family", sorted(LMM_FAMILIES))
def test_each_family_spec_names_a_loader_taking_what_the_spec_says(family):
    spec = LMM_FAMILIES[family]
    assert spec.name == family
    loader = getattr(importlib.import_module(spec.module), spec.loader)
    parameters = inspect.signature(loader).parameters
    assert {"path", "dtype", "attn_implementation", "device"} <= set(parameters)
    assert ("base" in parameters) == spec.takes_base
    assert ("grid" in parameters) == bool(spec.grid_choices)
    if spec.grid_choices:
        assert parameters["grid"].default == spec.grid_choices[0]


def test_base_is_refused_for_a_family_without_lora(toy_path):
    with pytest.raises(ConfigError, match=r"lmm.base \('lmsys/vicuna-7b-v1.5'\).*family 'llava_original'"):
        load_lmm("llava_original", str(toy_path), dtype=None, attn_implementation="sdpa", device="cpu",
                 base="lmsys/vicuna-7b-v1.5")


@pytest.mark.parametrize("kind", ["missing folder", "file"])
def test_bad_model_path_is_a_config_error_naming_it(tmp_path, kind):
    import torch

    path = tmp_path / "models" / "toy-llava"
    if kind == "file":
        path.parent.mkdir()
        path.write_text("not a model")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_lmm("llava", str(path), dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))


@pytest.mark.parametrize(("path", "is_hub_id"), [
    ("llava-hf/llava-1.5-7b-hf", True), ("gpt2", True), ("results/models/toy-llava", False),
    ("./toy-llava", False), ("/no/such/folder", False), ("owner/name with space", False),
])
def test_model_source_tells_hub_ids_from_missing_folders(path, is_hub_id, tmp_path, monkeypatch):
    from stages.models.base import model_source

    monkeypatch.chdir(tmp_path)        # relative paths must not find a checkout's own results/
    if is_hub_id:
        assert model_source(path) == path
    else:
        with pytest.raises(ConfigError, match=re.escape(repr(path))):
            model_source(path)


def test_bad_layer_selection_is_a_config_error(tmp_path, toy_path, edge_case_manifest):
    with pytest.raises(ConfigError, match="layers"):
        run_shard(tmp_path, toy_path, edge_case_manifest, layers=(5,))
    assert not (tmp_path / "run.parquet").exists() and not (tmp_path / "run.zarr").exists()


def test_attention_kernel_without_capture_is_a_config_error(tmp_path, toy_path, edge_case_manifest):
    with pytest.raises(ConfigError, match="'eager'"):
        generate.run(GenerateConfig(), LMMConfig(path=str(toy_path), attn_implementation="eager"),
                     edge_case_manifest, 0, tmp_path / "g.parquet", tmp_path / "a.zarr", device="cpu")


def test_command_line_runs_one_shard(tmp_path, toy_path):
    image = tmp_path / "image.png"
    Image.fromarray(noise(30, 40, 9)).save(image)
    manifest = tmp_path / "manifest.parquet"
    write_table([{"image_id": "7", "file": str(image), "width": 40, "height": 30, "shard": 3, "error": None}],
                manifest, "manifest")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"lmm": {"path": str(toy_path)},
                                      "generate": {"max_new_tokens": 3, "heads": [-2]}}))
    generate.main(["--config", str(config), "--manifest", str(manifest), "--shard", "3", "--device", "cpu",
                   "--generations", str(tmp_path / "g.parquet"), "--attention", str(tmp_path / "a.zarr"),
                   "--question", "What is it?"])
    table = read_table(tmp_path / "g.parquet", "generations")
    assert table["image_id"].tolist() == ["7"] and table["num_tokens"].tolist() == [3]
    assert table["prompt"][0] == "USER: <image>\nWhat is it? ASSISTANT:"
    assert attention_attrs(tmp_path / "a.zarr")["reduction"]["heads"] == [-2]
