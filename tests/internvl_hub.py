"""Tiny InternVL2.5 checkpoints in the layout OpenGVLab publishes on the hub (``OpenGVLab/InternVL2_5-8B``:
InternViT-300M-448px-V2_5 + InternLM2.5-7B-chat; ``OpenGVLab/InternVL2_5-1B``: the same ViT + Qwen2.5-0.5B),
for tests of loaders that must read them *without* the checkpoint's remote code.

What a published folder holds, and what :func:`write_internvl_checkpoint` writes (tiny sizes, random weights):

- ``config.json``: ``model_type`` "internvl_chat", ``architectures`` ["InternVLChatModel"], the ``auto_map`` to
  the remote code, ``template`` "internvl2_5", ``downsample_ratio`` 0.5, ``ps_version`` "v2", ``select_layer``
  -1, ``force_image_size`` 448, dynamic tiling (``dynamic_image_size``, ``use_thumbnail``,
  ``min_dynamic_patch`` 1, ``max_dynamic_patch`` 12), a ``vision_config`` (``intern_vit_6b``: LayerNorm, qkv
  bias, no qk normalisation, 448 px images, 14 px patches: a tile is 32 x 32 patches, 16 x 16 = 256 tokens
  after the pixel shuffle) and an ``llm_config`` (InternLM2: GQA, ``rope_scaling`` {"type": "dynamic",
  "factor": 2.0}, ``bias`` false; or Qwen2). Field names from the published configuration classes
  (``internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py``,
  ``configuration_intern_vit.py``, ``internvl/model/internlm2/configuration_internlm2.py`` of
  github.com/OpenGVLab/InternVL, commit 2410d1dbf208f0e799459aff9376e5747dbf41a2).
- Weights in bfloat16 under the keys of the published ``InternVLChatModel`` state dict: ``vision_model.*``
  (``embeddings.class_embedding`` (1, 1, C), ``embeddings.patch_embedding.{weight,bias}``,
  ``embeddings.position_embedding`` (1, 1 + 32 * 32, C), ``encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1,
  mlp.fc2, norm1, norm2}.{weight,bias}``, ``encoder.layers.N.{ls1,ls2}``), ``mlp1.{0,1,3}.*`` (LayerNorm of
  4C, Linear, GELU, Linear), and ``language_model.*``: InternLM2 ``model.tok_embeddings``,
  ``model.layers.N.attention.{wqkv,wo}``, ``model.layers.N.feed_forward.{w1,w2,w3}``,
  ``model.layers.N.{attention_norm,ffn_norm}``, ``model.norm``, ``output`` (all ``.weight``; ``wqkv`` rows in
  the grouped layout: per key/value head, its query heads, then its key, then its value); or Qwen2
  ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}``, ``o_proj.weight``,
  ``mlp.{gate,up,down}_proj.weight``, ``{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
  ``lm_head.weight`` (``InternVLChatConfig`` forces untied embeddings). InternLM2: two shards
  ``model-0000k-of-00002.safetensors`` + ``model.safetensors.index.json`` (the 8B has four); Qwen2 one
  ``model.safetensors`` (as the 1B).
- The remote code files (``configuration_internvl_chat.py``, ``modeling_internvl_chat.py``,
  ``tokenization_internlm2.py``, ``conversation.py`` ...): here stubs that raise on import, so a loader that
  runs remote code fails loudly.
- ``preprocessor_config.json`` (CLIP-style: 448, bicubic, ImageNet mean/std), ``generation_config.json``
  (eos [<|im_end|>, <|im_start|>] for InternLM2, [<|im_end|>, <|endoftext|>] for Qwen2; the release passes
  ``eos_token_id`` = <|im_end|> to ``generate`` itself).
- Tokenizer, InternLM2 (``llm="internlm2"``): its vocabulary is not on npm (``tests/real_tokenizers.py``
  has none for it), so a sentencepiece BPE ``tokenizer.model`` in InternLM2's format is *trained here* on a
  small English corpus: byte fallback, identity normalisation (newlines and full-width punctuation kept), no
  dummy prefix, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, and, as InternLM2's last six pieces,
  ``[UNUSED_TOKEN_141]`` .. ``[UNUSED_TOKEN_146]``, which ``tokenizer_config.json`` renames <|plugin|>,
  <|interpreter|>, <|action_end|>, <|action_start|>, <|im_end|>, <|im_start|> (published ids 92538..92543,
  inside the 92544-piece vocabulary: <|im_end|> = 92542); InternVL's nine added tokens <img>, </img>,
  <IMG_CONTEXT>, <quad>, </quad>, <ref>, </ref>, <box>, </box> follow right after the sentencepiece
  vocabulary (published 92544..92552; ``<IMG_CONTEXT>`` 92546), and the language model's ``vocab_size`` is
  the sentencepiece size + 9 (published 92553). ``tokenizer_config.json``: ``tokenizer_class``
  "InternLM2Tokenizer" with its ``auto_map`` (remote code a loader must not run), ``add_bos_token`` true,
  ``add_eos_token`` false, bos <s>, eos </s>, pad </s>, InternLM2-chat's own chat template (which is *not*
  InternVL's conversation: no system message).
- Tokenizer, Qwen2 (``llm="qwen2"``): the real Qwen2.5 vocabulary (:func:`real_tokenizers.write_qwen2_5_tokenizer`,
  as ``vocab.json`` + ``merges.txt``, no ``tokenizer.json``, as the 1B) plus the same nine InternVL tokens as
  added special tokens 151665..151673 (``<IMG_CONTEXT>`` 151667, ``vocab_size`` 151674), eos <|im_end|>.

The weights are scaled so that the tiny model is not degenerate (activations of order one, peaked
attention: different images give different tokens). ``im_end_scale`` multiplies the ``<|im_end|>`` row of
the output head, which makes generation end sooner (greater values) or never (0).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fake_hub import save_shards

IMAGE_SIZE, PATCH = 448, 14
SP_PIECES = 560                                         # sentencepiece vocabulary incl. the six renamed pieces
# InternLM2's chat tokens: the last six sentencepiece pieces, renamed (published ids 92538..92543).
INTERNLM2_CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                         "<|im_start|>"]
# InternVL's added tokens, in the published order, right after the base vocabulary.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
QWEN_BASE_SIZE = 151665                                 # Qwen2.5's tokenizer: 151643 BPE tokens + 22 added
# InternLM2-chat's chat template (tokenizer_config.json of internlm/internlm2_5-7b-chat).
INTERNLM2_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                           "{{ '<|im_start|>assistant\n' }}{% endif %}")
REMOTE_CODE = ["configuration_intern_vit.py", "configuration_internvl_chat.py", "modeling_intern_vit.py",
               "modeling_internvl_chat.py", "conversation.py"]
REMOTE_CODE_INTERNLM2 = ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                         "tokenization_internlm2_fast.py"]

_CORPUS_WORDS = ["the", "a", "an", "of", "in", "on", "at", "to", "from", "with", "and", "or", "but", "image", "picture", "photo", "shows", "there", "is", "are", "was", "were", "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "train", "boat", "plane", "tree", "flower", "grass", "sky", "cloud", "sun", "water", "river", "road", "street", "house", "building", "window", "door", "table", "chair", "cup", "plate", "food", "pizza", "cake", "red", "green", "blue", "yellow", "black", "white", "brown", "small", "large", "big", "little", "old", "young", "left", "right", "top", "bottom", "middle", "front", "back", "near", "far", "sitting", "standing", "walking", "running", "playing", "eating", "holding", "looking", "wearing", "riding", "describe", "detail", "color", "shape", "scene", "background", "foreground", "person", "people", "two", "three", "four", "five", "many", "some", "this", "that", "these", "those", "it", "its", "his", "her", "their", "what", "where", "which"]


def _corpus() -> str:
    """A small deterministic English corpus (a few thousand words, with punctuation and newlines)."""
    generator = torch.Generator().manual_seed(1234)
    lines = []
    for _ in range(400):
        picks = torch.randint(len(_CORPUS_WORDS), (int(torch.randint(4, 14, (1,), generator=generator)),),
                              generator=generator)
        sentence = " ".join(_CORPUS_WORDS[i] for i in picks.tolist())
        lines.append(sentence[0].upper() + sentence[1:] + (". " if len(lines) % 3 else ", 12 and 345.\n"))
    return "".join(lines)


@functools.lru_cache(maxsize=1)
def internlm2_sentencepiece_model() -> bytes:
    """The serialized ``tokenizer.model``: BPE trained on :func:`_corpus` (deterministic, one thread), with
    the six ``[UNUSED_TOKEN_141..146]`` user-defined pieces appended as the last ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().split("\n")), model_writer=model, model_type="bpe",
        vocab_size=SP_PIECES - len(INTERNLM2_CHAT_TOKENS), character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for k in range(141, 147):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"[UNUSED_TOKEN_{k}]", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    assert len(proto.pieces) == SP_PIECES
    return proto.SerializeToString()


def token_ids(llm: str = "internlm2") -> dict[str, int]:
    """Ids of the chat and InternVL tokens of the fabricated tokenizer for ``llm``."""
    if llm == "internlm2":
        ids = {token: SP_PIECES - 6 + i for i, token in enumerate(INTERNLM2_CHAT_TOKENS)}
        ids.update({token: SP_PIECES + i for i, token in enumerate(INTERNVL_TOKENS)})
        ids.update({"<unk>": 0, "<s>": 1, "</s>": 2})
        return ids
    if llm == "qwen2":
        ids = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
        ids.update({token: QWEN_BASE_SIZE + i for i, token in enumerate(INTERNVL_TOKENS)})
        return ids
    raise ValueError(f"llm must be 'internlm2' or 'qwen2', got {llm!r}")


def vocab_size(llm: str = "internlm2") -> int:
    """The language model's vocabulary size (the tokenizer's length, as published)."""
    return (SP_PIECES if llm == "internlm2" else QWEN_BASE_SIZE) + len(INTERNVL_TOKENS)


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _vision_config() -> dict[str, Any]:
    return {
        "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.1, "dropout": 0.0,
        "hidden_act": "gelu", "hidden_size": 32, "image_size": IMAGE_SIZE, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b",
        "norm_type": "layer_norm", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
        "patch_size": PATCH, "qk_normalization": False, "qkv_bias": True, "torch_dtype": "bfloat16",
        "use_bfloat16": True, "use_flash_attn": True}


def _llm_config(llm: str) -> dict[str, Any]:
    ids = token_ids(llm)
    if llm == "internlm2":
        return {
            "_name_or_path": "internlm/internlm2_5-7b-chat", "architectures": ["InternLM2ForCausalLM"],
            "attn_implementation": "flash_attention_2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64,
            "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 32768,
            "model_type": "internlm2", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "pad_token_id": 2, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.37.2", "use_bfloat16": True, "use_cache": True, "vocab_size": vocab_size(llm)}
    return {
        "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0, "attn_implementation": "flash_attention_2", "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"], "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 128, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.37.2", "use_bfloat16": True, "use_cache": True,
        "use_sliding_window": False, "vocab_size": vocab_size(llm)}


def published_config(llm: str = "internlm2", **overrides: Any) -> dict[str, Any]:
    """``config.json`` as published (tiny sizes). ``overrides``: top-level fields replaced, except
    ``vision_config`` / ``llm_config``, whose dicts update the sub-configs."""
    vision = _vision_config()
    vision.update(overrides.pop("vision_config", {}))
    text = _llm_config(llm)
    text.update(overrides.pop("llm_config", {}))
    config = {
        "_commit_hash": None, "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": IMAGE_SIZE, "llm_config": text,
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "model_type": "internvl_chat", "ps_version": "v2",
        "select_layer": -1, "template": "internvl2_5", "torch_dtype": "bfloat16", "transformers_version": None,
        "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision}
    config.update(overrides)
    return config


def random_state_dict(config: dict[str, Any], seed: int = 0, im_end_scale: float = 1.0,
                      im_end_id: int | None = None) -> dict[str, torch.Tensor]:
    """Random float32 weights under the published key names for ``config`` (see the module doc).

    Linear weights ~ N(0, 1/fan_in) (query/key rows of the language model x 2, for peaked attention), biases
    ~ N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), layer scales U(0.5, 1.5), token embeddings ~ N(0, 1). The
    ``im_end_id`` row of the output head is multiplied by ``im_end_scale``."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def linear(state: dict, name: str, out: int, fan_in: int, bias: bool, gain: float = 1.0) -> None:
        state[f"{name}.weight"] = normal(out, fan_in, std=gain / fan_in ** 0.5)
        if bias:
            state[f"{name}.bias"] = normal(out, std=0.1)

    def norm(state: dict, name: str, size: int, bias: bool) -> None:
        state[f"{name}.weight"] = 1 + normal(size, std=0.1)
        if bias:
            state[f"{name}.bias"] = normal(size, std=0.1)

    state: dict[str, torch.Tensor] = {}
    vision = config["vision_config"]
    c, inner, side = vision["hidden_size"], vision["intermediate_size"], vision["image_size"] // vision["patch_size"]
    p = vision["patch_size"]
    state["vision_model.embeddings.class_embedding"] = normal(1, 1, c)
    state["vision_model.embeddings.patch_embedding.weight"] = normal(c, 3, p, p, std=(3 * p * p) ** -0.5)
    state["vision_model.embeddings.patch_embedding.bias"] = normal(c, std=0.1)
    state["vision_model.embeddings.position_embedding"] = normal(1, 1 + side * side, c, std=0.5)
    for n in range(vision["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{n}"
        linear(state, f"{prefix}.attn.qkv", 3 * c, c, vision["qkv_bias"], gain=1.5)
        linear(state, f"{prefix}.attn.proj", c, c, True)
        linear(state, f"{prefix}.mlp.fc1", inner, c, True)
        linear(state, f"{prefix}.mlp.fc2", c, inner, True)
        norm(state, f"{prefix}.norm1", c, True)
        norm(state, f"{prefix}.norm2", c, True)
        state[f"{prefix}.ls1"] = 0.5 + torch.rand(c, generator=generator)
        state[f"{prefix}.ls2"] = 0.5 + torch.rand(c, generator=generator)

    text = config["llm_config"]
    hidden, ffn, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = hidden // heads
    merged = c * int(1 / config["downsample_ratio"]) ** 2
    norm(state, "mlp1.0", merged, True)
    linear(state, "mlp1.1", hidden, merged, True)
    linear(state, "mlp1.3", hidden, hidden, True)

    internlm2 = text["architectures"][0] == "InternLM2ForCausalLM"
    lm = "language_model"
    state[f"{lm}.model.{'tok_embeddings' if internlm2 else 'embed_tokens'}.weight"] = normal(vocab, hidden)
    for n in range(text["num_hidden_layers"]):
        prefix = f"{lm}.model.layers.{n}"
        if internlm2:
            group = heads // kv_heads
            gains = torch.tensor([2.0] * group + [2.0, 1.0]).repeat(kv_heads).repeat_interleave(head_dim)
            state[f"{prefix}.attention.wqkv.weight"] = (
                normal((heads + 2 * kv_heads) * head_dim, hidden, std=hidden ** -0.5) * gains[:, None])
            linear(state, f"{prefix}.attention.wo", hidden, heads * head_dim, False)
            linear(state, f"{prefix}.feed_forward.w1", ffn, hidden, False)
            linear(state, f"{prefix}.feed_forward.w3", ffn, hidden, False)
            linear(state, f"{prefix}.feed_forward.w2", hidden, ffn, False)
            norm(state, f"{prefix}.attention_norm", hidden, False)
            norm(state, f"{prefix}.ffn_norm", hidden, False)
        else:
            linear(state, f"{prefix}.self_attn.q_proj", heads * head_dim, hidden, True, gain=2.0)
            linear(state, f"{prefix}.self_attn.k_proj", kv_heads * head_dim, hidden, True, gain=2.0)
            linear(state, f"{prefix}.self_attn.v_proj", kv_heads * head_dim, hidden, True)
            linear(state, f"{prefix}.self_attn.o_proj", hidden, heads * head_dim, False)
            linear(state, f"{prefix}.mlp.gate_proj", ffn, hidden, False)
            linear(state, f"{prefix}.mlp.up_proj", ffn, hidden, False)
            linear(state, f"{prefix}.mlp.down_proj", hidden, ffn, False)
            norm(state, f"{prefix}.input_layernorm", hidden, False)
            norm(state, f"{prefix}.post_attention_layernorm", hidden, False)
    norm(state, f"{lm}.model.norm", hidden, False)
    head = f"{lm}.{'output' if internlm2 else 'lm_head'}.weight"
    linear(state, head.removesuffix(".weight"), vocab, hidden, False)
    if im_end_id is not None:
        state[head][im_end_id] *= im_end_scale
    return state


def _write_internlm2_tokenizer(folder: Path) -> None:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json in InternLM2's published form."""
    (folder / "tokenizer.model").write_bytes(internlm2_sentencepiece_model())
    ids = token_ids("internlm2")
    decoder = {str(i): _added_token(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    decoder.update({str(ids[t]): _added_token(t) for t in INTERNLM2_CHAT_TOKENS + INTERNVL_TOKENS})
    additional = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                  "<|plugin|>"] + INTERNVL_TOKENS
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 16384, "pad_token": "</s>",
        "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"}, indent=2))
    plain = {name: {key: value for key, value in _added_token(content).items() if key != "special"}
             for name, content in [("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "</s>"),
                                   ("unk_token", "<unk>")]}
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": additional, **plain},
                                                               indent=2))


def _write_qwen2_tokenizer(folder: Path) -> None:
    """Qwen2.5's vocab.json + merges.txt + InternVL's added tokens (added_tokens.json, tokenizer_config.json,
    special_tokens_map.json), as InternVL2_5-1B publishes them (no tokenizer.json)."""
    from real_tokenizers import write_qwen2_5_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        write_qwen2_5_tokenizer(scratch)
        tokenizer = json.loads((Path(scratch) / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((Path(scratch) / "tokenizer_config.json").read_text())
    bpe = tokenizer["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    ids = token_ids("qwen2")
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    added.update({t: ids[t] for t in INTERNVL_TOKENS})
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False))
    config["added_tokens_decoder"].update({str(ids[t]): _added_token(t) for t in INTERNVL_TOKENS})
    config.update({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                                 "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                                 "<|video_pad|>"] + INTERNVL_TOKENS,
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "model_max_length": 8192, "tokenizer_class": "Qwen2Tokenizer", "split_special_tokens": False})
    config.pop("tokenizer_file", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": config["additional_special_tokens"], "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"}, indent=2))


def write_internvl_checkpoint(folder: str | os.PathLike, *, llm: str = "internlm2", seed: int = 0,
                              im_end_scale: float = 1.0, **overrides: Any) -> None:
    """Write a tiny InternVL2.5 checkpoint in the published hub layout into ``folder`` (created if needed).

    ``llm``: "internlm2" (as InternVL2_5-8B) or "qwen2" (as InternVL2_5-1B). ``seed``: the weights' seed.
    ``im_end_scale``: factor on the output head's ``<|im_end|>`` row. ``overrides``: config.json fields (see
    :func:`published_config`). Takes about a second (the InternLM2 tokenizer is trained once per process).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token_ids(llm)                                                    # validates llm
    config = published_config(llm, **copy.deepcopy(overrides))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in REMOTE_CODE + (REMOTE_CODE_INTERNLM2 if llm == "internlm2" else []):
        (folder / name).write_text(f'raise RuntimeError("{name}: remote code of the published checkpoint; '
                                   'the loader must not run it")\n')
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": IMAGE_SIZE}, indent=2))
    ids = token_ids(llm)
    if llm == "internlm2":
        _write_internlm2_tokenizer(folder)
        generation = {"_from_model_config": True, "eos_token_id": [ids["<|im_end|>"], ids["<|im_start|>"]],
                      "transformers_version": "4.37.2"}
    else:
        _write_qwen2_tokenizer(folder)
        generation = {"_from_model_config": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                      "transformers_version": "4.37.2"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    from safetensors.torch import save_file

    state = {key: value.to(torch.bfloat16).contiguous() for key, value in
             random_state_dict(config, seed, im_end_scale, ids["<|im_end|>"]).items()}
    if llm == "qwen2":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    save_shards(folder, state, 2, shard_of=lambda key: 0 if key.startswith("language_model.") else 1)
