"""The "cambrian" family: Cambrian-1 (``nyu-visionx/cambrian-8b``) in its published layout, built from
stock transformers modules and converted at load time (no remote code, no Cambrian package).

Sources (read, not copied): github.com/cambrian-mllm/cambrian at commit
539ffc3254bba004e5d012b65c0ad6cb308897c5 — ``cambrian/model/cambrian_arch.py`` (SVA connector, unpadding,
newline tokens), ``cambrian/model/language_model/cambrian_llama.py`` (SVA layers inside the LLM),
``cambrian/model/vision_sampler.py`` (the aggregator's layers), ``cambrian/model/multimodal_encoder/*``
(the four towers), ``cambrian/mm_utils.py`` (``process_images``, ``tokenizer_image_token``),
``cambrian/conversation.py`` (``conv_llama_3``), ``inference.py``, ``scripts/cambrian/finetune_cambrian_8b.sh``;
and the release's own Cambrian script, Shengcao-Cao/groundLMM ``new_models/cambrian-1/infer_attn.py``
(commit 2702463f0013e6d7534547cc856292b976cd76e0). docs/method.md, section "Cambrian-1", has the details.

Checkpoint (``config.json`` ``model_type`` "cambrian_llama", ``architectures`` ["CambrianLlamaForCausalLM"]):
the Llama-3-8B fields plus, per the 8B training script, ``mm_vision_tower_aux_list`` ["siglip/CLIP-ViT-SO400M-14-384",
"openai/clip-vit-large-patch14-336", "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"],
``mm_vision_tower_aux_token_len_list`` [576, 576, 576, 9216], ``image_token_len`` 576, ``num_query_group`` 1,
``query_num_list`` [576], ``connector_depth`` 3, ``image_position`` 91, ``vision_hidden_size`` 1024,
``connector_only`` false, ``num_of_vision_sampler_layers`` 10, ``start_of_vision_sampler_layers`` 0,
``stride_of_vision_sampler_layers`` 3, ``mm_projector_type`` "sva", ``mm_vision_select_layer`` -2,
``mm_vision_select_feature`` "patch", ``mm_use_im_start_end`` / ``mm_use_im_patch_token`` false,
``image_aspect_ratio`` "pad". Weights (safetensors or ``.bin``, single or sharded with an index): the
language model (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``) and the connector:
``model.mm_projector.{0,2}`` (Linear(1024 -> 4096), GELU, Linear), ``model.mm_projector_aux_{i}.{0,2,3}``
(Linear(C_i -> 1024), GELU, Linear, LayerNorm), ``model.vision_sampler_0.layers.{0,1,2}.*`` (the SVA),
``model.vision_sampler_layers.{0..9}.layers.0.*`` (the SVA inside the LLM), ``model.vision_query`` (1, 1024),
``model.image_newline`` (4096). The towers are *not* in the checkpoint (the release keeps them in a plain
Python list, so they are not part of its state dict; ``load_pretrained_model`` loads them from their own
hub ids): ``timm/ViT-SO400M-14-SigLIP-384`` and ``laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup``
(open_clip layout: ``open_clip_config.json`` + ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, keys ``visual.trunk.*`` of a timm model), ``openai/clip-vit-large-patch14-336``
and ``facebook/dinov2-giant`` (transformers layout). Keys of the checkpoint under ``model.vision_tower_aux_list.``
are ignored, as the release ignores them.

The towers as stock transformers models (the release's features, see :func:`tower_features`):

- SigLIP: timm ``vit_so400m_patch14_siglip_384`` -> ``SiglipVisionModel`` (fused ``qkv`` split into q/k/v;
  ``hidden_act`` "gelu": timm's ViT uses exact GELU, not the tanh approximation of transformers' SigLIP
  configs), 384 px, last layer after the final norm, 27 x 27 = 729 tokens;
- CLIP ViT-L/14-336: ``CLIPVisionModel``, hidden state of layer ``mm_vision_select_layer`` (-2), CLS
  dropped, 24 x 24;
- DINOv2-giant at 378 px: ``Dinov2Model`` (position embeddings interpolated by transformers), last layer
  after its norm, CLS dropped, 27 x 27;
- ConvNeXt-XXL (timm ``convnext_xxlarge``, LayerNorm eps 1e-5, which transformers' ``ConvNextModel``
  hard-codes as 1e-6 and the loader resets) at 1024 px, the outputs of all four stages (384 + 768 + 1536 +
  3072 = 5760 channels at 256^2 .. 32^2).

Every tower's tokens are resampled bilinearly (``align_corners`` False, float32) to a square of its
``mm_vision_tower_aux_token_len_list`` entry when their count differs: 24 x 24 for the first three,
96 x 96 for ConvNeXt.

Image tokens. Each tower gets the image padded to a centred square (``expand2square``) with *its*
processor's mean colour (the CLIP mean for SigLIP and ConvNeXt, whose release wrapper defaults to it;
ImageNet's for DINOv2), resized (PIL bicubic) to its resolution and normalised with its own statistics
(SigLIP 0.5 / 0.5). The SVA gives one feature per cell of a Q x Q grid (Q = sqrt(image_token_len) = 24)
over that padded square; the cells of the padding are cut (``unpad_image`` with the image's (width,
height)), leaving ``rows x columns`` cells (the longer side keeps Q; the shorter keeps Q - 2 * pad with
pad = (Q - int(short * (Q / long))) // 2), and one ``image_newline`` feature follows every row: the image
is ``rows * (columns + 1)`` tokens, row-major. Cell (r, c) of the grid covers rows
[r * h / rows, (r + 1) * h / rows) and columns [c * w / columns, ...) of the original h x w image up to
less than one cell at the padded edges, so ``pad_to_square`` is False and the grid covers the image.

The release splices the features at the sentinel id -200; here the processor writes one "<image>" id (an
added token, never produced: the model's vocabulary is the checkpoint's) per image token, and the model
writes the features over them in order. The SVA layers inside the LLM (after decoder layers
``start + k * stride``) update the hidden states of the grid cells at prefill; the release finds them at
the fixed offset ``image_position`` from the first real token, this model at the image tokens themselves
(the same tokens when the prompt before the image is ``image_position`` tokens long).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    GenerationConfig,
    GenerationMixin,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from stages.config import ConfigError
from stages.devices import place_model
from stages.models.base import Devices, ImageLayout, LoadedLMM
from stages.models.checkpoints import load_weights_only
from stages.models.llava_v1 import load_tokenizer, read_checkpoint_config, read_state_dict, rename_keys

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# conv_llama_3.system of cambrian/conversation.py, verbatim (its line breaks and indentation included).
CAMBRIAN_LLAMA3_SYSTEM = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n"
    "    As a multimodal AI, you have the ability to process and analyze images. Whenever an image is present "
    "in the conversation, very carefully examine it and consider its content when formulating your response.\n"
    "    You should give concise responses to very simple questions, but provide thorough responses to more "
    "complex and open-ended questions. ")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)     # base_encoder.ProcessorWrapper's default image_mean

# Tower name of mm_vision_tower_aux_list (prefix) -> (kind, hub id), as the release's encoder classes map them.
TOWER_SOURCES = (
    ("siglip/CLIP-ViT-SO400M-14-384", "siglip", "timm/ViT-SO400M-14-SigLIP-384"),
    ("timm/ViT-SO400M-14-SigLIP-384", "siglip", "timm/ViT-SO400M-14-SigLIP-384"),
    ("openai/clip-vit-large-patch14-336", "clip", "openai/clip-vit-large-patch14-336"),
    ("facebook/dinov2-giant", "dinov2", "facebook/dinov2-giant"),
    ("clip-convnext-XXL", "convnext", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"),
)
# timm architectures of the open_clip towers: attention heads (SigLIP) / LayerNorm eps (ConvNeXt), which the
# weights do not tell.
TIMM_VIT_HEADS = {"vit_so400m_patch14_siglip_384": 16}
TIMM_CONVNEXT_EPS = {"convnext_xxlarge": 1e-5}
SVA_HEADS = 16          # vision_sampler.VisionCrossAttentionLayer's num_heads

# Llama fields of config.json passed to LlamaConfig (the others are Cambrian's or bookkeeping).
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias", "bos_token_id", "eos_token_id",
                "pad_token_id", "pretraining_tp", "tie_word_embeddings", "head_dim", "initializer_range")


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------

def unpadded_span(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """The cells of a ``side`` x ``side`` grid over an image of ``width`` x ``height`` px padded to a centred
    square that show the image: (row0, row1, col0, col1), half-open, as the release's ``unpad_image``
    computes them (same float operations: scale = side / longer, kept = int(shorter * scale), padding =
    (side - kept) // 2 cut from both ends of the shorter axis)."""
    if width / height > 1.0:
        pad = (side - int(height * (side / width))) // 2
        return pad, side - pad, 0, side
    pad = (side - int(width * (side / height))) // 2
    return 0, side, pad, side - pad


def unpadded_grid(width: int, height: int, side: int) -> tuple[int, int]:
    """(rows, columns) of the unpadded grid (:func:`unpadded_span`)."""
    row0, row1, col0, col1 = unpadded_span(width, height, side)
    return row1 - row0, col1 - col0


def image_token_count(width: int, height: int, side: int) -> int:
    """Tokens of one image: rows * (columns + 1) (a newline after every row)."""
    rows, columns = unpadded_grid(width, height, side)
    return rows * (columns + 1)


def visible_token_mask(width: int, height: int, side: int) -> torch.Tensor:
    """(side, side) bool: the tokens of a tower's square grid that show the image, not the padding (the
    release's ``unmask_attention_mask``: padding = (side - int(shorter * side / longer)) // 2 rows or columns
    masked at both ends, only when > 0)."""
    mask = torch.ones(side, side, dtype=torch.bool)
    row0, row1, col0, col1 = unpadded_span(width, height, side)
    mask[:row0], mask[row1:], mask[:, :col0], mask[:, col1:] = False, False, False, False
    return mask


# ---------------------------------------------------------------------------------------------------------
# Spatial Vision Aggregator (parameter names as published: vision_sampler.py)
# ---------------------------------------------------------------------------------------------------------

class SvaMLP(nn.Module):
    """linear_1 -> exact GELU -> linear_2, no biases. (N, *, d_in) -> (N, *, d_out)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class SvaCrossAttend(nn.Module):
    """Multi-head cross-attention of queries over the concatenated keys/values of several sources, each
    with its own LayerNorm + projection (``k_proj_{i}``, ``v_proj_{i}``)."""

    def __init__(self, dim: int, kv_dims: Sequence[int], heads: int = SVA_HEADS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SVA width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.q_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False))
        for i, kv_dim in enumerate(kv_dims):
            setattr(self, f"k_proj_{i}", nn.Sequential(nn.LayerNorm(kv_dim), nn.Linear(kv_dim, dim, bias=False)))
            setattr(self, f"v_proj_{i}", nn.Sequential(nn.LayerNorm(kv_dim), nn.Linear(kv_dim, dim, bias=False)))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.sources = len(kv_dims)

    def forward(self, queries: torch.Tensor, latents: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``queries`` (N, q, dim); ``latents[i]`` (N, t_i, kv_dim_i); ``masks[i]`` (N, t_i) bool, True = read.
        Returns (N, q, dim)."""
        n, q_len, dim = queries.shape
        head_dim = dim // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, -1, self.heads, head_dim).transpose(1, 2)

        query = split(self.q_proj(queries))
        key = split(torch.cat([getattr(self, f"k_proj_{i}")(x) for i, x in enumerate(latents)], dim=1))
        value = split(torch.cat([getattr(self, f"v_proj_{i}")(x) for i, x in enumerate(latents)], dim=1))
        mask = torch.cat(list(masks), dim=1)[:, None, None, :].expand(-1, 1, q_len, -1)
        out = F.scaled_dot_product_attention(query.contiguous(), key.contiguous(), value.contiguous(), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(n, q_len, dim))


class SvaLayer(nn.Module):
    """One aggregator layer (``VisionCrossAttentionLayer``): queries (N, 1, q_dim) and a context (N, 1,
    context_dim) read the per-cell features of every tower (plus a learnt position embedding for towers
    with more than one token per cell); the output is added to the queries (residual)."""

    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], kv_sides: Sequence[int], hidden: int):
        super().__init__()
        self.proj_context = nn.Linear(context_dim, hidden, bias=False)
        self.proj_in = nn.Linear(q_dim + hidden, hidden, bias=False)
        self.proj_out = SvaMLP(hidden, hidden, q_dim)
        self.norm = nn.LayerNorm(hidden)
        self.cross_attn = SvaCrossAttend(hidden, kv_dims)
        for i, side in enumerate(kv_sides):
            if side > 1:
                setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(side * side, hidden)))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, latents: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.proj_in(torch.cat([queries, self.proj_context(context)], dim=-1))
        positioned = [latent + getattr(self, f"pos_embed_{i}").to(latent.dtype)
                      if hasattr(self, f"pos_embed_{i}") else latent for i, latent in enumerate(latents)]
        x = self.norm(x + self.cross_attn(x, positioned, masks))
        return self.proj_out(x) + queries


class SvaSampler(nn.Module):
    """``VisionTokenSampler``: ``layers`` applied in turn."""

    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], kv_sides: Sequence[int],
                 hidden: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList([SvaLayer(q_dim, context_dim, kv_dims, kv_sides, hidden) for _ in range(depth)])

    def forward(self, queries: torch.Tensor, context: torch.Tensor, latents: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, context, latents, masks)
        return queries


def projector_aux(in_dim: int, hidden: int) -> nn.Sequential:
    """``mm_projector_aux_{i}``: Linear, GELU, Linear, LayerNorm."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden))


# ---------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------

class CambrianConfig(PretrainedConfig):
    """Composite config: ``text_config`` (Llama), one sub-config per tower kind present
    (``siglip_config`` / ``clip_config`` / ``dinov2_config`` / ``convnext_config``), and the connector
    fields: ``tower_kinds`` (kinds in ``mm_vision_tower_aux_list`` order), ``tower_token_lens``,
    ``tower_select_layers`` (CLIP's hidden-state index, else 0), ``image_token_len``, ``vision_hidden_size``,
    ``connector_depth``, ``sampler_layers`` (decoder layer indices followed by an SVA layer),
    ``image_token_id``."""

    model_type = "cambrian_aas"
    sub_configs: ClassVar[dict[str, type]] = {"text_config": LlamaConfig, "siglip_config": SiglipVisionConfig,
                   "clip_config": CLIPVisionConfig, "dinov2_config": Dinov2Config, "convnext_config": ConvNextConfig}

    def __init__(self, text_config=None, siglip_config=None, clip_config=None, dinov2_config=None,
                 convnext_config=None, tower_kinds=(), tower_token_lens=(), tower_select_layers=(),
                 image_token_len=576, vision_hidden_size=1024, connector_depth=3, sampler_layers=(),
                 image_token_id=None, **kwargs):
        self.text_config = text_config
        self.siglip_config, self.clip_config = siglip_config, clip_config
        self.dinov2_config, self.convnext_config = dinov2_config, convnext_config
        self.tower_kinds, self.tower_token_lens = list(tower_kinds), list(tower_token_lens)
        self.tower_select_layers = list(tower_select_layers)
        self.image_token_len, self.vision_hidden_size = image_token_len, vision_hidden_size
        self.connector_depth, self.sampler_layers = connector_depth, list(sampler_layers)
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class CambrianPreTrainedModel(PreTrainedModel):
    config_class = CambrianConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer", "SiglipEncoderLayer", "CLIPEncoderLayer", "Dinov2Layer",
                         "ConvNextStage", "SvaLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache"]


@dataclasses.dataclass
class SamplerInputs:
    """What the SVA layers inside the language model read at prefill, for the N grid cells of the batch
    (items in order, each item's cells row-major): ``batch`` / ``position`` (N,) int64, where each cell's
    token is; ``context`` (N, 1, vision_hidden); ``latents[i]`` (N, t_i, vision_hidden) tower i's features
    in the cell; ``masks[i]`` (N, t_i) bool."""

    batch: torch.Tensor
    position: torch.Tensor
    context: torch.Tensor
    latents: list[torch.Tensor]
    masks: list[torch.Tensor]


class CambrianLanguageModel(LlamaModel):
    """Llama-3 with the SVA layers ``vision_sampler_layers``; layer k runs after decoder layer
    ``config.sampler_layers[k]`` on the grid cells' hidden states when :class:`SamplerInputs` are given
    (prefill). Otherwise exactly ``LlamaModel``."""

    def __init__(self, config: LlamaConfig, sampler_layers: Sequence[int], vision_hidden: int,
                 kv_sides: Sequence[int]):
        super().__init__(config)
        self.sampler_at = {layer: k for k, layer in enumerate(sampler_layers)}
        self.vision_sampler_layers = nn.ModuleList([
            SvaSampler(config.hidden_size, vision_hidden, [vision_hidden] * len(kv_sides), kv_sides, vision_hidden, 1)
            for _ in sampler_layers])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, vision: SamplerInputs | None = None, **kwargs) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
            if vision is not None and index in self.sampler_at:
                sampler = self.vision_sampler_layers[self.sampler_at[index]]
                where = (vision.batch.to(hidden.device), vision.position.to(hidden.device))
                cells = sampler(hidden[where][:, None], vision.context, vision.latents, vision.masks)
                hidden = hidden.index_put(where, cells[:, 0].to(hidden.dtype))
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


def _interpolate_tokens(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, T, C) tokens of a square grid -> (B, side * side, C), bilinear (float32, align_corners False)
    when T != side * side, as the release's towers resample."""
    batch, count, channels = tokens.shape
    if count == side * side:
        return tokens
    grid = round(count ** 0.5)
    maps = tokens.view(batch, grid, grid, channels).permute(0, 3, 1, 2).float()
    maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False).to(tokens.dtype)
    return maps.permute(0, 2, 3, 1).reshape(batch, side * side, channels)


def tower_features(kind: str, tower: nn.Module, pixels: torch.Tensor, token_len: int, select_layer: int) -> torch.Tensor:
    """One tower's features as the release's encoder class returns them: (B, token_len, C) in the tower's
    dtype, row-major over a square grid. ``pixels``: (B, 3, S, S) normalised for that tower."""
    side = round(token_len ** 0.5)
    if kind == "siglip":
        return _interpolate_tokens(tower(pixel_values=pixels).last_hidden_state, side)
    if kind == "clip":
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
        return _interpolate_tokens(hidden[:, 1:], side)
    if kind == "dinov2":
        return _interpolate_tokens(tower(pixel_values=pixels).last_hidden_state[:, 1:], side)
    stages = []
    x = tower.embeddings(pixels)
    for stage in tower.encoder.stages:
        x = stage(x)
        resampled = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False).to(x.dtype)
        stages.append(resampled.flatten(2).transpose(1, 2))
    return torch.cat(stages, dim=-1)


def _cells(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(side * side, C) tokens of one tower -> (grid * grid, r * r, C): the r x r tokens of each grid cell
    (cells and tokens row-major), r = side / grid."""
    side = round(features.shape[0] ** 0.5)
    r = side // grid
    return features.view(grid, r, grid, r, -1).permute(0, 2, 1, 3, 4).reshape(grid * grid, r * r, -1)


class CambrianModel(CambrianPreTrainedModel):
    """Towers (``vision_tower``, a ModuleList in ``tower_kinds`` order), the SVA connector
    (``mm_projector_aux_{i}``, ``vision_query``, ``vision_sampler_0``, ``mm_projector``, ``image_newline``) and
    ``language_model`` (:class:`CambrianLanguageModel`)."""

    def __init__(self, config: CambrianConfig):
        super().__init__(config)
        towers = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel, "dinov2": Dinov2Model,
                  "convnext": ConvNextModel}
        self.vision_tower = nn.ModuleList([towers[kind](getattr(config, f"{kind}_config"))
                                           for kind in config.tower_kinds])
        text, vision_hidden = config.text_config, config.vision_hidden_size
        grid = round(config.image_token_len ** 0.5)
        kv_sides = [round(length ** 0.5) // grid for length in config.tower_token_lens]
        for i, kind in enumerate(config.tower_kinds):
            setattr(self, f"mm_projector_aux_{i}", projector_aux(tower_width(kind, getattr(config, f"{kind}_config")),
                                                                 vision_hidden))
        self.vision_query = nn.Parameter(torch.zeros(1, vision_hidden))
        self.vision_sampler_0 = SvaSampler(vision_hidden, vision_hidden, [vision_hidden] * len(kv_sides), kv_sides,
                                           vision_hidden, config.connector_depth)
        self.mm_projector = nn.Sequential(nn.Linear(vision_hidden, text.hidden_size), nn.GELU(),
                                          nn.Linear(text.hidden_size, text.hidden_size))
        self.image_newline = nn.Parameter(torch.zeros(text.hidden_size))
        self.language_model = CambrianLanguageModel(text, config.sampler_layers, vision_hidden, kv_sides)
        self.grid = grid
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def image_features(self, pixels: Sequence[torch.Tensor], image_sizes: torch.Tensor
                       ) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]], list[list[torch.Tensor]],
                                  list[list[torch.Tensor]], torch.Tensor]:
        """The connector for a batch. ``pixels[i]`` (B, 3, S_i, S_i) for tower i; ``image_sizes`` (B, 2) int
        (height, width) of the original images. Returns per item its image-token features (rows * (columns
        + 1), hidden) and its unpadded span (row0, row1, col0, col1), per tower and item the per-cell
        latents (Q * Q, r_i^2, vision_hidden) and masks (Q * Q, r_i^2), and the global context (B,
        vision_hidden)."""
        cfg, grid = self.config, self.grid
        projected = []
        for i, (kind, tower) in enumerate(zip(cfg.tower_kinds, self.vision_tower)):
            device = next(tower.parameters()).device
            dtype = next(tower.parameters()).dtype
            features = tower_features(kind, tower, pixels[i].to(device, dtype), cfg.tower_token_lens[i],
                                      cfg.tower_select_layers[i])
            projector = getattr(self, f"mm_projector_aux_{i}")
            projected.append(projector(features.to(projector[0].weight.device, projector[0].weight.dtype)))
        context = projected[0].mean(dim=1)                                         # (B, vision_hidden)
        device = context.device
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        latents, masks = [], []
        for features in projected:
            side = round(features.shape[1] ** 0.5)
            latents.append([_cells(features[b].to(device), grid) for b in range(len(sizes))])
            item_masks = []
            for height, width in sizes:
                mask = _cells(visible_token_mask(width, height, side).view(-1, 1), grid)[..., 0].to(device)
                mask[~mask.any(dim=1)] = True
                item_masks.append(mask)
            masks.append(item_masks)
        batch = len(sizes)
        queries = self.vision_query.expand(batch * grid * grid, -1)[:, None]
        cell_context = context.repeat_interleave(grid * grid, dim=0)[:, None]
        aggregated = self.vision_sampler_0(
            queries, cell_context, [torch.cat(per_item) for per_item in latents],
            [torch.cat(per_item) for per_item in masks])
        mapped = self.mm_projector(aggregated.view(batch, grid, grid, -1))         # (B, Q, Q, hidden)
        tokens, spans = [], []
        for b, (height, width) in enumerate(sizes):
            row0, row1, col0, col1 = unpadded_span(width, height, grid)
            kept = mapped[b, row0:row1, col0:col1]
            newline = self.image_newline.to(kept.dtype).view(1, 1, -1).expand(row1 - row0, 1, -1)
            tokens.append(torch.cat([kept, newline], dim=1).reshape(-1, kept.shape[-1]))
            spans.append((row0, row1, col0, col1))
        return tokens, spans, latents, masks, context

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                pixel_values=None, pixel_values_1=None, pixel_values_2=None, pixel_values_3=None,
                image_sizes=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        """``input_ids`` (B, L) with each image's rows * (columns + 1) "<image>" ids; ``pixel_values``,
        ``pixel_values_1`` ... (B, 3, S_i, S_i): tower i's input (the generate stage casts only the first
        to the model dtype; each is cast to its tower's here); ``image_sizes`` (B, 2) (height, width)."""
        is_image = input_ids == self.config.image_token_id
        embed = self.language_model.embed_tokens
        inputs_embeds = embed(input_ids.masked_fill(is_image, 0))
        vision = None
        if pixel_values is not None and bool(is_image.any()):
            pixels = [pixel_values, pixel_values_1, pixel_values_2, pixel_values_3][:len(self.config.tower_kinds)]
            tokens, spans, latents, masks, context = self.image_features(pixels, image_sizes)
            counts = is_image.sum(dim=1).tolist()
            if counts != [len(t) for t in tokens]:
                raise ValueError(f"the prompts hold {counts} image tokens, the images need {[len(t) for t in tokens]}")
            features = torch.cat(tokens).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], features)
            vision = self._sampler_inputs(is_image, spans, latents, masks, context)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache, vision=vision,
                                   **kwargs)

    def _sampler_inputs(self, is_image: torch.Tensor, spans, latents, masks, context) -> SamplerInputs:
        """:class:`SamplerInputs` of the unpadded cells of every item (their tokens: item b's image tokens
        laid (rows, columns + 1), the last column dropped)."""
        grid = self.grid
        batch_index, positions, kept = [], [], []
        for b, (row0, row1, col0, col1) in enumerate(spans):
            where = is_image[b].nonzero()[:, 0].view(row1 - row0, col1 - col0 + 1)[:, :-1].reshape(-1)
            batch_index.append(torch.full_like(where, b))
            positions.append(where)
            cells = (torch.arange(row0, row1)[:, None] * grid + torch.arange(col0, col1)[None]).reshape(-1)
            kept.append(cells.to(context.device))
        return SamplerInputs(
            batch=torch.cat(batch_index), position=torch.cat(positions),
            context=torch.cat([context[b].expand(len(cells), -1) for b, cells in enumerate(kept)])[:, None],
            latents=[torch.cat([per_item[b][cells] for b, cells in enumerate(kept)]) for per_item in latents],
            masks=[torch.cat([per_item[b][cells] for b, cells in enumerate(kept)]) for per_item in masks])


class CambrianForConditionalGeneration(CambrianPreTrainedModel, GenerationMixin):
    """:class:`CambrianModel` + ``lm_head``; ``generate`` takes the processor's output."""

    def __init__(self, config: CambrianConfig):
        super().__init__(config)
        self.model = CambrianModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                pixel_values=None, pixel_values_1=None, pixel_values_2=None, pixel_values_3=None,
                image_sizes=None, use_cache=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, L or logits_to_keep, vocab) and the cache; arguments as :meth:`CambrianModel.forward`."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         pixel_values=pixel_values, pixel_values_1=pixel_values_1, pixel_values_2=pixel_values_2,
                         pixel_values_3=pixel_values_3, image_sizes=image_sizes, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache)


def tower_width(kind: str, config: PretrainedConfig) -> int:
    """Channels of a tower's features: hidden size, or ConvNeXt's four stages summed (multi-stage)."""
    return sum(config.hidden_sizes) if kind == "convnext" else config.hidden_size


# ---------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TowerInput:
    """How one tower sees the image: ``size`` (S px square), ``pad_mean`` (the expand2square colour, as
    fractions), ``mean`` / ``std`` (normalisation)."""

    size: int
    pad_mean: tuple[float, float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class CambrianImageProcessor:
    """The release's ``process_images`` for every tower: expand2square with ``int(255 * pad_mean)``,
    PIL bicubic resize to S x S, /255, (x - mean) / std. ``image_mean``: the first tower's pad colour."""

    def __init__(self, towers: Sequence[TowerInput]):
        self.towers = list(towers)
        self.image_mean = list(self.towers[0].pad_mean)

    def __call__(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """RGB PIL images -> per tower a (B, 3, S, S) float32 tensor."""
        from PIL import Image

        outputs = []
        for tower in self.towers:
            batch = []
            for image in images:
                width, height = image.size
                colour = tuple(int(255 * c) for c in tower.pad_mean)
                side = max(width, height)
                square = image
                if width != height:
                    square = Image.new(image.mode, (side, side), colour)
                    square.paste(image, ((side - width) // 2, (side - height) // 2))
                square = square.resize((tower.size, tower.size), Image.BICUBIC)
                array = np.asarray(square, dtype=np.float32) / 255.0
                array = (array - np.array(tower.mean, np.float32)) / np.array(tower.std, np.float32)
                batch.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
            outputs.append(torch.stack(batch))
        return outputs


class CambrianProcessor:
    """Tokenizer + :class:`CambrianImageProcessor` + the ``llama_3`` conversation.

    ``processor(images=[PIL, ...], text=[prompt, ...], padding=True, return_tensors="pt")`` returns
    ``input_ids`` / ``attention_mask`` (B, L) int64 (padded on the tokenizer's side), ``pixel_values``,
    ``pixel_values_1`` ... (B, 3, S_i, S_i) float32 per tower, ``image_sizes`` (B, 2) int64 (height, width).
    Each prompt holds one "<image>", which becomes rows * (columns + 1) image ids; the text is tokenised as
    the release's ``tokenizer_image_token`` does (chunks around "<image>" tokenised alone; when the first
    chunk starts with the BOS token, every later chunk loses its first token)."""

    def __init__(self, tokenizer: Any, image_processor: CambrianImageProcessor, grid: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.grid = grid
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        """``conv_llama_3.get_prompt()``: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>{system}
        <|eot_id|>" (left out when the system message is empty; default :data:`CAMBRIAN_LLAMA3_SYSTEM`), per
        turn "<|start_header_id|>{user|assistant}<|end_header_id|>{text}<|eot_id|>" with the image first as
        "<image>\\n", then "<|start_header_id|>assistant<|end_header_id|>" when ``add_generation_prompt``.
        Content: a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts."""
        if tokenize:
            raise ValueError("CambrianProcessor.apply_chat_template renders text only (tokenize=False)")

        def text_of(content: Any) -> str:
            if isinstance(content, str):
                return content
            images = sum(part["type"] == "image" for part in content)
            words = " ".join(part["text"] for part in content if part["type"] == "text")
            return f"{IMAGE_TOKEN}\n" * images + words

        system = CAMBRIAN_LLAMA3_SYSTEM
        for message in messages:
            if message["role"] == "system":
                system = text_of(message["content"])
        prompt = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{system}<|eot_id|>"
                  if system else "")
        for message in messages:
            if message["role"] != "system":
                role = "user" if message["role"] == "user" else "assistant"
                prompt += f"<|start_header_id|>{role}<|end_header_id|>{text_of(message['content'])}<|eot_id|>"
        if add_generation_prompt:
            prompt += "<|start_header_id|>assistant<|end_header_id|>"
        return prompt

    def encode(self, prompt: str, image_tokens: int) -> list[int]:
        """The release's ``tokenizer_image_token`` ids of ``prompt`` with "<image>" -> ``image_tokens``
        image ids."""
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
        offset = 1 if chunks[0] and chunks[0][0] == self.tokenizer.bos_token_id else 0
        ids = list(chunks[0])
        for chunk in chunks[1:]:
            ids += [self.image_token_id] * image_tokens + list(chunk[offset:])
        return ids

    def __call__(self, images: Sequence[Any] = (), text: str | Sequence[str] = (), *, padding: bool = False,
                 return_tensors: str | None = None):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        images = list(images)
        if len(images) != len(texts) or any(t.count(IMAGE_TOKEN) != 1 for t in texts):
            raise ValueError(f"CambrianProcessor needs one image and one {IMAGE_TOKEN!r} per text; got "
                             f"{len(images)} images for placeholders {[t.count(IMAGE_TOKEN) for t in texts]}")
        ids = [self.encode(t, image_token_count(*image.size, self.grid)) for t, image in zip(texts, images)]
        text_inputs = self.tokenizer.pad({"input_ids": ids}, padding=padding, return_attention_mask=True)
        data = dict(text_inputs)
        for i, pixels in enumerate(self.image_processor(images)):
            data["pixel_values" if i == 0 else f"pixel_values_{i}"] = pixels
        data["image_sizes"] = torch.tensor([[image.size[1], image.size[0]] for image in images], dtype=torch.long)
        return BatchFeature(data=data, tensor_type=return_tensors)


def cambrian_layouts(inputs: Mapping[str, Any], image_token_id: int, grid: int) -> list[ImageLayout]:
    """``LoadedLMM.image_layouts``: per item the positions of its rows x columns cells (image tokens laid
    (rows, columns + 1) row-major, the newline column dropped). ``inputs``: ``input_ids`` (B, L),
    ``image_sizes`` (B, 2) (height, width). ValueError when an item does not hold one run of rows *
    (columns + 1) image tokens."""
    layouts = []
    for b, (height, width) in enumerate(inputs["image_sizes"].tolist()):
        rows, columns = unpadded_grid(int(width), int(height), grid)
        where = (inputs["input_ids"][b] == image_token_id).nonzero()[:, 0]
        count = rows * (columns + 1)
        if where.numel() != count or (count and int(where[-1] - where[0]) + 1 != count):
            raise ValueError(f"item {b}: an image of {height} x {width} px needs one run of {rows} x ({columns} + 1) "
                             f"= {count} image tokens ({image_token_id}); the sequence holds {where.numel()}")
        layouts.append(ImageLayout(where.view(rows, columns + 1)[:, :columns].reshape(-1), (rows, columns)))
    return layouts


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def parse_tower(name: str) -> tuple[str, str, int | None]:
    """A ``mm_vision_tower_aux_list`` entry -> (kind, hub id, resolution from "-resNNN" or None)."""
    for prefix, kind, hub_id in TOWER_SOURCES:
        if name.startswith(prefix):
            found = re.search(r"-res(\d+)", name[len(prefix):])
            return kind, hub_id, int(found.group(1)) if found else None
    raise ConfigError(f"vision tower {name!r} of mm_vision_tower_aux_list is not one of Cambrian-1's "
                      f"({[prefix for prefix, _, _ in TOWER_SOURCES]})")


def _snapshot(hub_id: str, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot find the {what} tower {hub_id!r}: {exc}") from None


def _open_clip_tower(hub_id: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``open_clip_config.json`` and the ``visual.trunk.`` tensors (prefix removed) of an open_clip repo."""
    from safetensors.torch import load_file

    folder = _snapshot(hub_id, ["open_clip_config.json", "open_clip_model.safetensors",
                                "open_clip_pytorch_model.bin"], what)
    if not (folder / "open_clip_config.json").is_file():
        raise ConfigError(f"the {what} tower {hub_id!r} has no open_clip_config.json")
    config = json.loads((folder / "open_clip_config.json").read_text())
    if (folder / "open_clip_model.safetensors").is_file():
        state = load_file(folder / "open_clip_model.safetensors")
    elif (folder / "open_clip_pytorch_model.bin").is_file():
        state = load_weights_only(folder / "open_clip_pytorch_model.bin", what=f"{what} tower weights", mmap=True)
    else:
        raise ConfigError(f"the {what} tower {hub_id!r} holds no open_clip_model.safetensors or "
                          "open_clip_pytorch_model.bin")
    prefix = "visual.trunk."
    return config, {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def siglip_from_timm(trunk: Mapping[str, torch.Tensor], heads: int, image_size: int
                     ) -> tuple[SiglipVisionConfig, dict[str, torch.Tensor]]:
    """A timm SigLIP ViT trunk (``patch_embed``, ``pos_embed``, ``blocks.*``, ``norm``; no class token) ->
    ``SiglipVisionModel`` config (exact GELU, eps 1e-6, no head) and state dict."""
    patch = trunk["patch_embed.proj.weight"]
    depth = 1 + max(int(key.split(".")[1]) for key in trunk if key.startswith("blocks."))
    width = patch.shape[0]
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=trunk["blocks.0.mlp.fc1.weight"].shape[0],
                                num_hidden_layers=depth, num_attention_heads=heads, image_size=image_size,
                                patch_size=patch.shape[-1], hidden_act="gelu", layer_norm_eps=1e-6,
                                vision_use_head=False)
    state = {"embeddings.patch_embedding.weight": patch,
             "embeddings.patch_embedding.bias": trunk["patch_embed.proj.bias"],
             "embeddings.position_embedding.weight": trunk["pos_embed"][0],
             "post_layernorm.weight": trunk["norm.weight"],
             "post_layernorm.bias": trunk["norm.bias"]}
    for i in range(depth):
        old, new = f"blocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = trunk[f"{old}attn.qkv.{kind}"].chunk(3, dim=0)
            state.update({f"{new}self_attn.q_proj.{kind}": q, f"{new}self_attn.k_proj.{kind}": k,
                          f"{new}self_attn.v_proj.{kind}": v,
                          f"{new}self_attn.out_proj.{kind}": trunk[f"{old}attn.proj.{kind}"],
                          f"{new}layer_norm1.{kind}": trunk[f"{old}norm1.{kind}"],
                          f"{new}layer_norm2.{kind}": trunk[f"{old}norm2.{kind}"],
                          f"{new}mlp.fc1.{kind}": trunk[f"{old}mlp.fc1.{kind}"],
                          f"{new}mlp.fc2.{kind}": trunk[f"{old}mlp.fc2.{kind}"]})
    return config, state


def convnext_from_timm(trunk: Mapping[str, torch.Tensor]) -> tuple[ConvNextConfig, dict[str, torch.Tensor]]:
    """A timm ConvNeXt trunk (``stem.{0,1}``, ``stages.{s}.downsample.{0,1}``, ``stages.{s}.blocks.{b}.{conv_dw,
    norm, mlp.fc1, mlp.fc2, gamma}``) -> ``ConvNextModel`` config and state dict (the final ``layernorm``,
    unused, set to identity)."""
    stages = 1 + max(int(key.split(".")[1]) for key in trunk if key.startswith("stages."))
    depths = [1 + max(int(key.split(".")[3]) for key in trunk if key.startswith(f"stages.{s}.blocks."))
              for s in range(stages)]
    dims = [trunk[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0] for s in range(stages)]
    config = ConvNextConfig(num_channels=3, patch_size=trunk["stem.0.weight"].shape[-1], hidden_sizes=dims,
                            depths=depths, hidden_act="gelu", layer_scale_init_value=1e-6, drop_path_rate=0.0)
    state = {"embeddings.patch_embeddings.weight": trunk["stem.0.weight"],
             "embeddings.patch_embeddings.bias": trunk["stem.0.bias"],
             "embeddings.layernorm.weight": trunk["stem.1.weight"], "embeddings.layernorm.bias": trunk["stem.1.bias"],
             "layernorm.weight": torch.ones(dims[-1]), "layernorm.bias": torch.zeros(dims[-1])}
    for s in range(stages):
        if s > 0:
            for part in ("0", "1"):
                for kind in ("weight", "bias"):
                    state[f"encoder.stages.{s}.downsampling_layer.{part}.{kind}"] = \
                        trunk[f"stages.{s}.downsample.{part}.{kind}"]
        for b in range(depths[s]):
            old, new = f"stages.{s}.blocks.{b}.", f"encoder.stages.{s}.layers.{b}."
            for ours, theirs in (("dwconv", "conv_dw"), ("layernorm", "norm"), ("pwconv1", "mlp.fc1"),
                                 ("pwconv2", "mlp.fc2")):
                for kind in ("weight", "bias"):
                    state[f"{new}{ours}.{kind}"] = trunk[f"{old}{theirs}.{kind}"]
            state[f"{new}layer_scale_parameter"] = trunk[f"{old}gamma"]
    return config, state


def _load_towers(raw: Mapping[str, Any], path: str, dtype: torch.dtype, attn_implementation: str
                 ) -> tuple[dict[str, PretrainedConfig], dict[str, torch.Tensor], list[str], list[TowerInput],
                            list[int], dict[str, float]]:
    """Configs, state dicts (keys under ``model.vision_tower.{i}.``), kinds, processor inputs and select
    layers of the towers of ``mm_vision_tower_aux_list``, read from their own hub ids; plus the ConvNeXt
    LayerNorm eps to set after building."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    configs, state, kinds, inputs, select_layers, eps = {}, {}, [], [], [], {}
    for i, name in enumerate(raw["mm_vision_tower_aux_list"]):
        kind, hub_id, resolution = parse_tower(name)
        if kind in kinds:
            raise ConfigError(f"{path!r}: two {kind} towers in mm_vision_tower_aux_list; Cambrian-1 has one of each")
        select = 0
        try:
            if kind in ("siglip", "convnext"):
                open_clip, trunk = _open_clip_tower(hub_id, kind)
                vision = open_clip.get("model_cfg", {}).get("vision_cfg", {})
                pre = open_clip.get("preprocess_cfg", {})
                mean, std = tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
                timm_name = vision.get("timm_model_name")
                if kind == "siglip":
                    if timm_name not in TIMM_VIT_HEADS:
                        raise ConfigError(f"tower {hub_id!r}: timm model {timm_name!r} unknown; "
                                          f"known: {sorted(TIMM_VIT_HEADS)}")
                    size = int(vision["image_size"])
                    config, tower_state = siglip_from_timm(trunk, TIMM_VIT_HEADS[timm_name], size)
                else:
                    size = resolution or 1024          # clip_convnext_encoder: res from the name, else 1024
                    config, tower_state = convnext_from_timm(trunk)
                    eps[kind] = TIMM_CONVNEXT_EPS.get(timm_name, 1e-6)
                inputs.append(TowerInput(size, CLIP_MEAN, mean, std))
            elif kind == "clip":
                processor = CLIPImageProcessor.from_pretrained(hub_id)
                tower = CLIPVisionModel.from_pretrained(hub_id, dtype=dtype, attn_implementation=attn_implementation)
                config, tower_state = tower.config, tower.state_dict()
                size = int(processor.crop_size["height"])
                mean, std = tuple(processor.image_mean), tuple(processor.image_std)
                inputs.append(TowerInput(size, mean, mean, std))
                select = int(raw.get("mm_vision_select_layer", -2))
            else:
                processor = AutoImageProcessor.from_pretrained(hub_id, trust_remote_code=False)
                tower = Dinov2Model.from_pretrained(hub_id, dtype=dtype, attn_implementation=attn_implementation)
                config, tower_state = tower.config, tower.state_dict()
                size = resolution or int(config.image_size)
                mean, std = tuple(processor.image_mean), tuple(processor.image_std)
                inputs.append(TowerInput(size, mean, mean, std))
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot load the vision tower {name!r} ({hub_id}) of {path!r}: {exc}") from None
        configs[f"{kind}_config"] = config
        state.update({f"model.vision_tower.{i}.{key}": value for key, value in tower_state.items()})
        kinds.append(kind)
        select_layers.append(select)
    return configs, state, kinds, inputs, select_layers, eps


# Original key prefix -> ours; the connector keeps its published names under model.
KEY_PREFIXES = (
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.vision_sampler_layers.", "model.language_model.vision_sampler_layers."),
    ("model.mm_projector", "model.mm_projector"),        # mm_projector.* and mm_projector_aux_{i}.*
    ("model.vision_sampler_0.", "model.vision_sampler_0."),
    ("model.vision_query", "model.vision_query"),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
)
IGNORED_PREFIX = "model.vision_tower_aux_list."


def convert_state_dict(original: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Published Cambrian keys -> :class:`CambrianForConditionalGeneration` keys (towers excluded).
    ``model.vision_query`` (num_query_group, vision_hidden) is kept as published. Unknown keys raise
    ConfigError naming ``path``."""
    return rename_keys(original, KEY_PREFIXES, IGNORED_PREFIX, f"the Cambrian checkpoint {path!r}")


def _check_fields(raw: Mapping[str, Any], path: str) -> None:
    """ConfigError unless ``config.json`` describes a Cambrian-1 SVA model this loader builds."""
    required = ("mm_vision_tower_aux_list", "mm_vision_tower_aux_token_len_list", "image_token_len",
                "query_num_list", "connector_depth", "vision_hidden_size", "hidden_size", "num_hidden_layers")
    missing = [field for field in required if field not in raw]
    if missing:
        raise ConfigError(f"{path!r}: config.json lacks {missing}; not a Cambrian-1 checkpoint")
    expected = {"mm_projector_type": "sva", "mm_use_im_start_end": False, "mm_vision_select_feature": "patch"}
    for field, value in expected.items():
        if raw.get(field, value) != value:
            raise ConfigError(f"{path!r}: {field} = {raw[field]!r}; the cambrian family supports {value!r}")
    if list(raw["query_num_list"]) != [raw["image_token_len"]]:
        raise ConfigError(f"{path!r}: query_num_list {raw['query_num_list']} is not one group of image_token_len "
                          f"({raw['image_token_len']}) queries, Cambrian-1's only connector")
    if len(raw["mm_vision_tower_aux_list"]) != len(raw["mm_vision_tower_aux_token_len_list"]) or \
            len(raw["mm_vision_tower_aux_list"]) > 4:
        raise ConfigError(f"{path!r}: mm_vision_tower_aux_list and mm_vision_tower_aux_token_len_list must pair "
                          "up to four towers")
    grid = round(raw["image_token_len"] ** 0.5)
    for length in [raw["image_token_len"], *raw["mm_vision_tower_aux_token_len_list"]]:
        side = round(length ** 0.5)
        if side * side != length or side % grid:
            raise ConfigError(f"{path!r}: token length {length} is no square grid divisible into {grid} x {grid} "
                              "cells")


def load_cambrian(path: str, *, dtype: torch.dtype, attn_implementation: str, device: Devices) -> LoadedLMM:
    """Load a Cambrian-1 checkpoint in its published layout (folder or hub id; towers from their hub ids)
    as a :class:`CambrianForConditionalGeneration` in eval mode, ``dtype`` parameters, on ``device`` (one
    device, or several CUDA devices it is spread over: :func:`stages.devices.place_model`), with
    ``attn_implementation`` ("sdpa" | "flash_attention_2" | "eager") for the language model and the ViT
    towers; attention capture later swaps only the language model's (``text_config``). Raises ConfigError
    naming ``path`` for a missing or incompatible checkpoint or tower."""
    from transformers.initialization import no_init_weights

    folder, raw = read_checkpoint_config(path)
    _check_fields(raw, path)
    tokenizer = load_tokenizer(folder, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    tower_configs, tower_state, kinds, tower_inputs, select_layers, eps = _load_towers(raw, path, dtype,
                                                                                       attn_implementation)
    text_config = LlamaConfig(**{key: raw[key] for key in LLAMA_FIELDS if key in raw and raw[key] is not None})
    if raw.get("connector_only", True):
        sampler_layers = []
    else:
        sampler_layers = [raw["start_of_vision_sampler_layers"] + k * raw["stride_of_vision_sampler_layers"]
                          for k in range(raw["num_of_vision_sampler_layers"])]
    config = CambrianConfig(text_config=text_config, **tower_configs, tower_kinds=kinds,
                            tower_token_lens=list(raw["mm_vision_tower_aux_token_len_list"]),
                            tower_select_layers=select_layers, image_token_len=raw["image_token_len"],
                            vision_hidden_size=raw["vision_hidden_size"], connector_depth=raw["connector_depth"],
                            sampler_layers=sampler_layers, image_token_id=image_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    # ConvNeXt has no attention: it keeps "eager", every other part takes attn_implementation.
    implementations = {"": attn_implementation, **{key: "eager" if key == "convnext_config" else attn_implementation
                                                   for key in ("text_config", *tower_configs)}}
    with no_init_weights():
        model = CambrianForConditionalGeneration._from_config(config, dtype=dtype,
                                                              attn_implementation=implementations)
    state = convert_state_dict(read_state_dict(folder), path)
    state.update(tower_state)
    try:
        model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights of {path!r} do not fit its config.json: {exc}") from None
    if "convnext" in kinds:
        tower = model.model.vision_tower[kinds.index("convnext")]
        for module in tower.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = eps["convnext"]

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    else:
        model.generation_config = GenerationConfig.from_model_config(text_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    grid = round(raw["image_token_len"] ** 0.5)
    processor = CambrianProcessor(tokenizer, CambrianImageProcessor(tower_inputs), grid)
    place_model(model, device, keep_whole=["SvaSampler"])
    model.eval()
    log.info("loaded Cambrian %s (towers %s; %s, %s, %s)", path, kinds, dtype, attn_implementation, device)
    return LoadedLMM(family="cambrian", path=path, model=model, processor=processor, image_token_id=image_token_id,
                     image_layouts=lambda inputs: cambrian_layouts(inputs, image_token_id, grid),
                     pad_to_square=False, unpadded_grid_covers="image")
