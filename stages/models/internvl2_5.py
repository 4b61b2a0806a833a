"""The "internvl2_5" family: InternVL2.5 checkpoints in their published layout, converted on load into
stock transformers ``InternVLForConditionalGeneration`` (no code of the checkpoint runs).

The published layout (``OpenGVLab/InternVL2_5-{1B,2B,4B,8B,26B,38B,78B}``; the hub's remote-code model
``InternVLChatModel``, OpenGVLab/InternVL ``internvl_chat/internvl/model/internvl_chat/``):

- ``config.json``: ``model_type`` "internvl_chat", ``template`` "internvl2_5", ``downsample_ratio`` 0.5,
  ``ps_version`` "v2", ``select_layer`` -1, ``force_image_size`` 448, ``min_dynamic_patch`` /
  ``max_dynamic_patch`` (1 / 12), ``use_thumbnail`` true, a ``vision_config`` (InternViT: ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``qkv_bias``,
  ``qk_normalization``, ``norm_type``, ``layer_norm_eps``, ``image_size`` 448, ``patch_size`` 14) and an
  ``llm_config`` whose ``architectures`` name the language model: ``InternLM2ForCausalLM`` (2B, 8B, 26B)
  or ``Qwen2ForCausalLM`` (1B, 4B, 38B, 78B);
- weights ``vision_model.*`` (InternViT: ``embeddings.{class_embedding, patch_embedding,
  position_embedding}``, ``encoder.layers.N.{attn.qkv, attn.proj, attn.q_norm, attn.k_norm, ls1, ls2,
  norm1, norm2, mlp.fc1, mlp.fc2}``), ``mlp1.{0,1,3}`` (LayerNorm, Linear, GELU, Linear over the
  pixel-shuffled features) and ``language_model.*`` (InternLM2: ``model.tok_embeddings``,
  ``model.layers.N.attention.{wqkv, wo}``, ``feed_forward.{w1, w2, w3}``, ``attention_norm``,
  ``ffn_norm``, ``model.norm``, ``output``; Qwen2: the stock Qwen2 names under ``language_model.``);
- the tokenizer: InternLM2's sentencepiece ``tokenizer.model`` (tokenizer class ``InternLM2Tokenizer``,
  remote code) with the added tokens ``<|im_start|>``, ``<|im_end|>``, ``<img>``, ``</img>``,
  ``<IMG_CONTEXT>`` ... in ``tokenizer_config.json``; or Qwen2's (a stock class).

Conversion: the vision tower into ``InternVLVisionModel`` (``qkv`` split into q, k, v; ``ls1``/``ls2``
-> ``lambda_1``/``lambda_2``; ``norm1``/``norm2`` -> ``layernorm_before``/``layernorm_after``), the
projector into ``InternVLMultiModalProjector``, InternLM2 into ``LlamaModel`` (``wqkv`` holds, per key/value
head, its group of query heads, then its key head, then its value head: rows (kv heads, group + 2,
head_dim) are split into q, k, v; ``w1``/``w3``/``w2`` -> gate/up/down; dynamic NTK rope as published),
Qwen2 into ``Qwen2Model``. transformers' ``pixel_shuffle`` (scale 0.5, the published "v2" order) and
``masked_scatter`` over the ``<IMG_CONTEXT>`` tokens are the published model's. The InternLM2 tokenizer is
rebuilt from ``tokenizer.model`` as :class:`InternLM2SentencePieceTokenizer` (the published tokenizer's
behaviour: the text is split at the added tokens and each piece encoded by sentencepiece as it is; BOS
first).

Prompt (the release's ``conv_template`` "internvl2_5", ``internvl/conversation.py``, MPT separators):
``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<img>{<IMG_CONTEXT> x 256 x tiles}</img>\\n
{question}<|im_end|>\\n<|im_start|>assistant\\n`` after the tokenizer's BOS, with the InternVL system
message :data:`INTERNVL_SYSTEM` unless another is given; generation ends at ``<|im_end|>`` (the release's
``eos_token_id``).

Tiling (the published ``dynamic_preprocess``; transformers' ``GotOcr2ImageProcessorPil`` with
``crop_to_patches``, same rule): among the (columns, rows) tile arrangements with ``min_tiles <= columns
x rows <= max_tiles`` the one whose aspect ratio is closest to the image's (ties: the later, larger one
while the image has more than half its pixels) is chosen; the image is resized (bicubic, stretched) to
(448 columns) x (448 rows) px and cut into tiles, row-major; with more than one tile the whole image
resized to 448 x 448 (the thumbnail) is appended. Each tile gives a 32 x 32 patch grid, pixel-shuffled
to 16 x 16 tokens, row-major. The release (Shengcao-Cao/groundLMM ``aas/more_models/internvl2_5.py``)
uses 3 to 9 tiles; the checkpoint's own range is 1 to 12 (``lmm.min_tiles`` / ``lmm.max_tiles``).

Grids (``lmm.grid``): ``tiles`` (default), the tiles' 16 x 16 grids stitched row-major into one
(16 rows) x (16 columns) grid, the thumbnail dropped: cell (r, c) is token (r % 16) * 16 + c % 16 of tile
(r // 16) * columns + c // 16; and ``thumbnail``, the thumbnail's 16 x 16 grid alone (the release's
``--use-thumbnail-attention``; with a single tile, that tile, which is then the whole image at 448 x 448).
Both cover the whole image stretched to the grid: nothing is padded, ``pad_to_square`` is False.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from transformers import InternVLProcessor
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from stages.config import ConfigError
from stages.devices import place_model
from stages.models.base import Devices, ImageLayout, LoadedLMM
from stages.models.llava_v1 import read_checkpoint_config, read_state_dict

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The published system message of the "internvl2_5" conversation template (internvl/conversation.py).
INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                   "多模态大语言模型。")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

START_IMAGE, END_IMAGE, CONTEXT_IMAGE = "<img>", "</img>", "<IMG_CONTEXT>"
END_OF_TURN = "<|im_end|>"

# The "internvl2_5" conversation (MPT style, sep "<|im_end|>\n"): the system turn (the given system
# message, else INTERNVL_SYSTEM), then per turn "<|im_start|>{role}\n{text}<|im_end|>\n", an image as
# "<IMG_CONTEXT>\n" before the text (the processor expands it to <img>, the context tokens, </img>); the
# generation prompt is "<|im_start|>assistant\n". Content may be a string or a list of {"type": "image"} /
# {"type": "text", "text": ...} parts.
INTERNVL2_5_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + INTERNVL_SYSTEM + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\n' + ns.system + '<|im_end|>\n' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

TILE_GRID_KEY = "tile_grids"
TOKENS_PER_SIDE = 16   # a 448 px tile: 32 x 32 patches of 14 px, pixel-shuffled by 0.5


class InternLM2SentencePieceTokenizer(SentencePieceBackend):
    """InternLM2's tokenizer rebuilt from its ``tokenizer.model`` with stock parts: text is split at the
    added tokens, each remaining piece is encoded by sentencepiece unchanged (its own normaliser and
    dummy prefix, as the published ``InternLM2Tokenizer._tokenize``), BOS is prepended
    (``add_bos_token``) and EOS appended only when ``add_eos_token``; decoding joins sentencepiece's
    decoding of the ordinary pieces with the added tokens verbatim."""

    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": "tokenizer.model"}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, *, add_bos_token: bool = True, add_eos_token: bool = False,
                 **kwargs: Any) -> None:
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        super().__init__(vocab_file=vocab_file, legacy=True, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, pieces = "", []
        for token in tokens:
            if token in self._added_tokens_encoder:
                text += self.sp_model.decode(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return text + self.sp_model.decode(pieces)


def load_tokenizer(folder: Path, path: str) -> Any:
    """The tokenizer of the checkpoint in ``folder``: :class:`InternLM2SentencePieceTokenizer` for an
    InternLM2 tokenizer (``tokenizer_class`` InternLM2Tokenizer[Fast], whose own class is remote code),
    else the stock class ``tokenizer_config.json`` names. Its added tokens are those of
    ``tokenizer_config.json`` with their published ids; ConfigError when the InternVL image tokens are
    missing."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import AddedToken

    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if str(settings.get("tokenizer_class", "")).startswith("InternLM2Tokenizer"):
        if not (folder / "tokenizer.model").is_file():
            raise ConfigError(f"{path!r}: an InternLM2 tokenizer needs tokenizer.model")
        special = {name: settings[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if isinstance(settings.get(name), str)}
        # Added tokens keep their published ids: InternLM2's chat tokens rename pieces of the
        # sentencepiece vocabulary (<|im_end|> is [UNUSED_TOKEN_145]); InternVL's follow it.
        added = {int(index): AddedToken(entry["content"], special=entry.get("special", True), normalized=False,
                                        lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False))
                 for index, entry in settings.get("added_tokens_decoder", {}).items()}
        tokenizer = InternLM2SentencePieceTokenizer(
            str(folder / "tokenizer.model"), add_bos_token=settings.get("add_bos_token", True),
            add_eos_token=settings.get("add_eos_token", False), added_tokens_decoder=added, **special)
        for index, token in added.items():
            if tokenizer.convert_tokens_to_ids(token.content) != index:
                raise ConfigError(f"{path!r}: added token {token.content!r} should have id {index}, the "
                                  f"tokenizer gives {tokenizer.convert_tokens_to_ids(token.content)}")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the tokenizer of {path!r}: {exc}") from None
    missing = [token for token in (START_IMAGE, END_IMAGE, CONTEXT_IMAGE, END_OF_TURN)
               if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ConfigError(f"the tokenizer of {path!r} lacks the InternVL tokens {missing}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class InternVL25Processor(InternVLProcessor):
    """``InternVLProcessor`` (images tiled by ``GotOcr2ImageProcessorPil``; each ``<IMG_CONTEXT>`` of the
    text becomes ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>``) whose output also holds
    ``tile_grids``: (B, 2) int64, the (rows, columns) of each image's tiles, read by
    :func:`internvl_image_layouts` and not passed to the model (:attr:`LoadedLMM.layout_keys`)."""

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        import torch
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        outputs = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            tile = (self.image_processor.size["height"], self.image_processor.size["width"])
            grids = []
            for image in images:
                columns, rows = get_optimal_tiled_canvas((image.height, image.width), tile,
                                                         self.image_processor.min_patches,
                                                         self.image_processor.max_patches)
                grids.append((rows, columns))
            outputs[TILE_GRID_KEY] = torch.tensor(grids, dtype=torch.int64)
        return outputs


def internvl_image_layouts(inputs: Mapping[str, Any], *, image_token_id: int, grid: str) -> list[ImageLayout]:
    """:attr:`LoadedLMM.image_layouts` of InternVL2.5: per batch item, the sequence positions of its
    ``grid`` cells.

    ``inputs``: ``input_ids`` (B, L) and ``tile_grids`` (B, 2) (rows, columns) of each item's tiles
    (:class:`InternVL25Processor`). Item b's k-th ``image_token_id`` token is token k % 256 of image k //
    256, images being its tiles row-major then, with more than one tile, the thumbnail. ``tiles``: a
    (16 rows) x (16 columns) grid, cell (r, c) = token (r % 16) * 16 + c % 16 of tile (r // 16) *
    columns + c // 16; ``thumbnail``: the last 256 tokens as 16 x 16. ValueError when an item does not
    hold 256 x (tiles [+ 1]) image tokens.
    """

    input_ids, tile_grids = inputs["input_ids"], inputs.get(TILE_GRID_KEY)
    if tile_grids is None or tuple(tile_grids.shape) != (input_ids.shape[0], 2):
        raise ValueError(f"InternVL image layouts need {TILE_GRID_KEY} with one (rows, columns) per item")
    side = TOKENS_PER_SIDE
    layouts = []
    for b, (rows, columns) in enumerate(tile_grids.tolist()):
        positions = (input_ids[b] == image_token_id).nonzero()[:, 0]
        images = rows * columns + (1 if rows * columns > 1 else 0)
        if positions.numel() != images * side * side:
            raise ValueError(f"item {b}: {positions.numel()} image tokens ({image_token_id}), expected "
                             f"{side * side} per image for {rows} x {columns} tiles"
                             f"{' and the thumbnail' if images > rows * columns else ''}")
        if grid == "thumbnail":
            layouts.append(ImageLayout(positions[-side * side:], (side, side)))
            continue
        tokens = positions[:rows * columns * side * side].view(rows, columns, side, side)
        layouts.append(ImageLayout(tokens.permute(0, 2, 1, 3).reshape(-1), (rows * side, columns * side)))
    return layouts


def _vision_config(raw: dict[str, Any], path: str) -> Any:
    from transformers import InternVLVisionConfig

    vision = raw.get("vision_config") or {}
    try:
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
        return InternVLVisionConfig(
            hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
            hidden_act=vision.get("hidden_act", "gelu"), attention_bias=bool(vision.get("qkv_bias", True)),
            use_qk_norm=bool(vision.get("qk_normalization", False)),
            norm_type=vision.get("norm_type", "layer_norm"), layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            image_size=[image_size, image_size], patch_size=[patch_size, patch_size],
            num_channels=vision.get("num_channels", 3), use_mean_pooling=True)
    except KeyError as exc:
        raise ConfigError(f"{path!r}: vision_config lacks {exc}") from None


def _text_config(raw: dict[str, Any], path: str) -> tuple[Any, str]:
    """The stock text config for ``llm_config`` and the published language model's kind ("internlm2" |
    "qwen2")."""
    from transformers import LlamaConfig, Qwen2Config

    llm = dict(raw.get("llm_config") or {})
    architecture = (llm.get("architectures") or [""])[0]
    if architecture == "Qwen2ForCausalLM":
        fields = {key: value for key, value in llm.items()
                  if key not in ("architectures", "auto_map", "_name_or_path", "attn_implementation",
                                 "transformers_version", "torch_dtype", "model_type")}
        return Qwen2Config(**fields), "qwen2"
    if architecture != "InternLM2ForCausalLM":
        raise ConfigError(f"{path!r}: llm_config.architectures {llm.get('architectures')!r}; the internvl2_5 "
                          "family supports InternLM2ForCausalLM and Qwen2ForCausalLM")
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            raise ConfigError(f"{path!r}: llm_config.rope_scaling type {kind!r} is not InternLM2's "
                              "dynamic or linear")
        rope.update(rope_type="dynamic" if kind == "dynamic" else "linear", factor=float(scaling["factor"]))
    try:
        return LlamaConfig(
            vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
            hidden_act=llm.get("hidden_act", "silu"), max_position_embeddings=llm["max_position_embeddings"],
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6), rope_parameters=rope,
            attention_bias=bool(llm.get("bias", False)), mlp_bias=False,
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            bos_token_id=llm.get("bos_token_id", 1), eos_token_id=llm.get("eos_token_id", 2),
            pad_token_id=llm.get("pad_token_id", 2)), "internlm2"
    except KeyError as exc:
        raise ConfigError(f"{path!r}: llm_config lacks {exc}") from None


def _split_wqkv(weight: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused ``wqkv`` ((heads + 2 kv_heads) head_dim, hidden) -> q (heads head_dim, hidden),
    k and v (kv_heads head_dim, hidden): rows are (kv head, [its heads / kv_heads query heads, key,
    value], head_dim)."""
    group = heads // kv_heads
    head_dim = weight.shape[0] // (heads + 2 * kv_heads)
    blocks = weight.view(kv_heads, group + 2, head_dim, -1)
    return (blocks[:, :group].reshape(heads * head_dim, -1), blocks[:, group].reshape(kv_heads * head_dim, -1),
            blocks[:, group + 1].reshape(kv_heads * head_dim, -1))


VISION_RENAMES = (("embeddings.class_embedding", "embeddings.cls_token"),
                  ("embeddings.position_embedding", "embeddings.position_embeddings"),
                  ("embeddings.patch_embedding", "embeddings.patch_embeddings.projection"),
                  ("encoder.layers.", "encoder.layer."), (".attn.proj.", ".attention.projection_layer."),
                  (".attn.q_norm.", ".attention.q_norm."), (".attn.k_norm.", ".attention.k_norm."),
                  (".ls1", ".lambda_1"), (".ls2", ".lambda_2"), (".norm1.", ".layernorm_before."),
                  (".norm2.", ".layernorm_after."))
INTERNLM2_RENAMES = (("model.tok_embeddings.", "embed_tokens."), ("model.norm.", "norm."),
                     ("model.layers.", "layers."), (".attention.wo.", ".self_attn.o_proj."),
                     (".feed_forward.w1.", ".mlp.gate_proj."), (".feed_forward.w3.", ".mlp.up_proj."),
                     (".feed_forward.w2.", ".mlp.down_proj."), (".attention_norm.", ".input_layernorm."),
                     (".ffn_norm.", ".post_attention_layernorm."))
PROJECTOR_NAMES = {"mlp1.0": "layer_norm", "mlp1.1": "linear_1", "mlp1.3": "linear_2"}


def convert_state_dict(original: Mapping[str, torch.Tensor], text_config: Any,
                       language_model: str) -> dict[str, torch.Tensor]:
    """The published ``InternVLChatModel`` state dict in ``InternVLForConditionalGeneration``'s names
    (module docstring); unknown keys are kept under their own name, so that loading fails naming them."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if key.startswith("vision_model."):
            name = key[len("vision_model."):]
            for old, new in VISION_RENAMES:
                name = name.replace(old, new)
            if ".attn.qkv." in name:
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted["model.vision_tower." + name.replace("attn.qkv", f"attention.{part}")] = chunk
                continue
            converted["model.vision_tower." + name] = value
        elif key.startswith("mlp1."):
            module, _, parameter = key.rpartition(".")
            converted[f"model.multi_modal_projector.{PROJECTOR_NAMES.get(module, module)}.{parameter}"] = value
        elif key.startswith("language_model."):
            name = key[len("language_model."):]
            if language_model == "qwen2":
                converted["lm_head." + name[len("lm_head."):] if name.startswith("lm_head.")
                          else "model.language_model." + name.removeprefix("model.")] = value
                continue
            if name.startswith("output."):
                converted["lm_head." + name[len("output."):]] = value
                continue
            if ".attention.wqkv." in name:
                q, k, v = _split_wqkv(value, text_config.num_attention_heads, text_config.num_key_value_heads)
                for part, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    renamed = name.replace("model.layers.", "layers.").replace("attention.wqkv", f"self_attn.{part}")
                    converted["model.language_model." + renamed] = tensor
                continue
            for old, new in INTERNLM2_RENAMES:
                name = name.replace(old, new)
            converted["model.language_model." + name] = value
        else:
            converted[key] = value
    return converted


def _check_published_fields(raw: dict[str, Any], path: str) -> None:
    expected = {"model_type": "internvl_chat", "template": "internvl2_5", "ps_version": "v2",
                "downsample_ratio": 0.5, "select_layer": -1}
    for field, value in expected.items():
        if raw.get(field) != value:
            raise ConfigError(f"{path!r}: config.json {field} = {raw.get(field)!r}; the internvl2_5 family "
                              f"loads InternVL2.5 checkpoints ({field} {value!r})")


def load_internvl2_5(path: str, *, dtype: torch.dtype, attn_implementation: str, device: Devices,
                     grid: str = "tiles", min_tiles: int | None = None,
                     max_tiles: int | None = None) -> LoadedLMM:
    """Load a published-layout InternVL2.5 checkpoint (folder or hub id) as a stock
    ``InternVLForConditionalGeneration`` + :class:`InternVL25Processor`.

    The model is in eval mode, parameters in ``dtype`` on ``device`` (one device, or several CUDA devices
    it is spread over once built: :func:`stages.devices.place_model`), ``attn_implementation`` ("sdpa" |
    "flash_attention_2" | "eager") for both towers. ``grid``: "tiles" or "thumbnail" (module docstring).
    ``min_tiles`` / ``max_tiles``: the tile range (None: config.json's ``min_dynamic_patch`` /
    ``max_dynamic_patch``). Raises ConfigError naming ``path`` for a missing or non-InternVL2.5
    checkpoint, weights that do not fit its config, or a tokenizer without the InternVL tokens.
    """
    from transformers import (
        GenerationConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVideoProcessor,
    )
    from transformers.initialization import no_init_weights
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    folder, raw = read_checkpoint_config(path)
    _check_published_fields(raw, path)
    vision_config = _vision_config(raw, path)
    text_config, language_model = _text_config(raw, path)
    tile_size = int(raw.get("force_image_size") or vision_config.image_size[0])
    cells = (tile_size // vision_config.patch_size[0]) // 2
    if cells != TOKENS_PER_SIDE:
        raise ConfigError(f"{path!r}: {tile_size} px tiles of {vision_config.patch_size[0]} px patches give "
                          f"{cells} x {cells} tokens; InternVL2.5 has {TOKENS_PER_SIDE} x {TOKENS_PER_SIDE}")
    low = int(raw.get("min_dynamic_patch", 1)) if min_tiles is None else min_tiles
    high = int(raw.get("max_dynamic_patch", 12)) if max_tiles is None else max_tiles
    if not 1 <= low <= high:
        raise ConfigError(f"lmm.min_tiles ({low}) and lmm.max_tiles ({high}) must satisfy 1 <= min <= max")
    if not raw.get("dynamic_image_size", True):
        low = high = 1
    tokenizer = load_tokenizer(folder, path)
    image_token_id = int(tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE))
    config = InternVLConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_id=image_token_id,
        image_seq_length=cells * cells, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=bool(text_config.tie_word_embeddings))
    state = convert_state_dict(read_state_dict(folder), text_config, language_model)
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype,
                                                              attn_implementation=attn_implementation)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    try:
        model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights of {path!r} do not fit its config.json: {exc}") from None
    if config.tie_word_embeddings:
        model.tie_weights()

    end_of_turn = int(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    model.generation_config = GenerationConfig(
        eos_token_id=end_of_turn, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=low, max_patches=high, size={"height": tile_size, "width": tile_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    # InternVLProcessor reads its placeholders from the tokenizer. InternVL2.5 has no video token: the
    # processor's "<video>" placeholder is not in the vocabulary (a question containing it is refused).
    for name, token in (("start_image_token", START_IMAGE), ("end_image_token", END_IMAGE),
                        ("context_image_token", CONTEXT_IMAGE)):
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", int(tokenizer.convert_tokens_to_ids(token)))
    tokenizer.video_token = "<video>"
    processor = InternVL25Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=InternVLVideoProcessor(), image_seq_length=cells * cells,
                                    chat_template=INTERNVL2_5_CHAT_TEMPLATE)
    place_model(model, device)
    model.eval()
    log.info("loaded InternVL2.5 %s (%s language model, %d-%d tiles, %s grid; %s, %s, %s)", path,
             language_model, low, high, grid, dtype, attn_implementation, device)
    return LoadedLMM(family="internvl2_5", path=path, model=model, processor=processor,
                     image_token_id=image_token_id,
                     image_layouts=functools.partial(internvl_image_layouts, image_token_id=image_token_id,
                                                     grid=grid),
                     pad_to_square=False, layout_keys=(TILE_GRID_KEY,))
