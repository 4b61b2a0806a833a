"""A tiny Cambrian-1 (nyu-visionx/cambrian-8b) in its published layout, fabricated into a fake Hugging Face
cache together with its four towers under their own hub ids (docs/method.md, "Cambrian-1").

- ``nyu-visionx/cambrian-8b``: config.json with the published field names and the 8B script's values where
  they are not sizes (tower names, projector type, connector depth, select layer, ``connector_only`` false,
  start 0 / stride 3 of the SVA layers in the LLM); sizes shrunk (Llama 64 wide, 4 layers; SVA 32 wide; a 6 x 6
  query grid, towers resampled to 6 x 6 and ConvNeXt to 24 x 24, i.e. 4 x 4 tokens per cell as published);
  ``image_position`` = where the default llama_3 prompt puts the image with the real Llama-3 tokenizer;
  weights under the published names in three safetensors shards + index; the real Llama-3 tokenizer.
- ``timm/ViT-SO400M-14-SigLIP-384`` and ``laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup``: open_clip
  layout (``open_clip_config.json``, ``open_clip_model.safetensors``, timm trunk keys under ``visual.trunk.``,
  plus keys the towers do not use), published resolutions (384, and 1024 as Cambrian sets it).
- ``openai/clip-vit-large-patch14-336`` and ``facebook/dinov2-giant``: transformers layout (``save_pretrained``
  of a tiny CLIPModel / Dinov2Model at 336 / 518 px, patch 14) with their preprocessor_config.json.
"""

from __future__ import annotations

import json

import torch
from fake_hub import save_shards, snapshot
from real_tokenizers import write_llama3_tokenizer

REPO_ID = "nyu-visionx/cambrian-8b"
SIGLIP_ID = "timm/ViT-SO400M-14-SigLIP-384"
CLIP_ID = "openai/clip-vit-large-patch14-336"
DINO_ID = "facebook/dinov2-giant"
CONVNEXT_ID = "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"
TOWER_NAMES = ["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336", "facebook/dinov2-giant-res378",
               "clip-convnext-XXL-multi-stage"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

GRID = 6                                   # sqrt(image_token_len)
HIDDEN, VISION = 64, 32                    # Llama width, SVA width (vision_hidden_size)
TOWER_WIDTHS = [32, 24, 16, 8 + 12 + 16 + 20]         # SigLIP, CLIP, DINOv2, ConvNeXt (4 stages summed)
CONVNEXT_DIMS, CONVNEXT_DEPTHS = [8, 12, 16, 20], [1, 1, 2, 1]
IMAGE_POSITION = 92                        # 2 BOS + system header and message + user header, Llama-3 tokenizer
EOS = 128009                               # <|eot_id|>


def published_config() -> dict:
    """config.json: Llama-3 fields (sizes shrunk, vocabulary and ids as published) + Cambrian's fields."""
    return {
        "architectures": ["CambrianLlamaForCausalLM"], "model_type": "cambrian_llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": EOS,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": 128,
        "max_position_embeddings": 8192, "num_attention_heads": 4, "num_hidden_layers": 4,
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.37.0", "use_cache": True, "vocab_size": 128256,
        "mm_vision_tower_aux_list": TOWER_NAMES,
        "mm_vision_tower_aux_token_len_list": [GRID * GRID] * 3 + [(4 * GRID) ** 2],
        "image_token_len": GRID * GRID, "num_query_group": 1, "query_num_list": [GRID * GRID],
        "connector_depth": 3, "image_position": IMAGE_POSITION, "vision_hidden_size": VISION,
        "connector_only": False, "num_of_vision_sampler_layers": 2, "start_of_vision_sampler_layers": 0,
        "stride_of_vision_sampler_layers": 3, "mm_projector_type": "sva", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_mm_proj": True,
        "unfreeze_mm_vision_tower": False,
    }


def _sva_shapes(prefix: str, q_dim: int, depth: int, kv_sides: list[int]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer in range(depth):
        p = f"{prefix}.layers.{layer}."
        shapes.update({p + "proj_context.weight": (VISION, VISION), p + "proj_in.weight": (VISION, q_dim + VISION),
                       p + "proj_out.linear_1.weight": (VISION, VISION), p + "proj_out.linear_2.weight": (q_dim, VISION),
                       p + "norm.weight": (VISION,), p + "norm.bias": (VISION,),
                       p + "cross_attn.q_proj.0.weight": (VISION,), p + "cross_attn.q_proj.0.bias": (VISION,),
                       p + "cross_attn.q_proj.1.weight": (VISION, VISION), p + "cross_attn.o_proj.weight": (VISION, VISION)})
        for i, side in enumerate(kv_sides):
            for kv in ("k", "v"):
                shapes.update({f"{p}cross_attn.{kv}_proj_{i}.0.weight": (VISION,),
                               f"{p}cross_attn.{kv}_proj_{i}.0.bias": (VISION,),
                               f"{p}cross_attn.{kv}_proj_{i}.1.weight": (VISION, VISION)})
            if side > 1:
                shapes[f"{p}pos_embed_{i}"] = (side * side, VISION)
    return shapes


def published_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published checkpoint (towers excluded) with its shape."""
    vocab, hidden, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.mm_projector.0.weight": (hidden, VISION), "model.mm_projector.0.bias": (hidden,),
                   "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,),
                   "model.vision_query": (1, VISION), "model.image_newline": (hidden,)})
    for i, width in enumerate(TOWER_WIDTHS):
        p = f"model.mm_projector_aux_{i}."
        shapes.update({p + "0.weight": (VISION, width), p + "0.bias": (VISION,), p + "2.weight": (VISION, VISION),
                       p + "2.bias": (VISION,), p + "3.weight": (VISION,), p + "3.bias": (VISION,)})
    kv_sides = [int(length ** 0.5) // GRID for length in config["mm_vision_tower_aux_token_len_list"]]
    shapes.update(_sva_shapes("model.vision_sampler_0", VISION, config["connector_depth"], kv_sides))
    for k in range(config["num_of_vision_sampler_layers"]):
        shapes.update(_sva_shapes(f"model.vision_sampler_layers.{k}", hidden, 1, kv_sides))
    return shapes


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """1-D weights (norms) near 1, other vectors small, matrices ~ N(0, 1/fan_in) scaled up so
    that attention varies over cells."""
    noise = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
    return noise * (1.5 / shape[-1] ** 0.5)


def write_checkpoint(folder) -> dict[str, torch.Tensor]:
    """config.json, generation_config.json, the tokenizer and three safetensors shards + index; returns the
    weights (published names)."""

    write_llama3_tokenizer(folder)
    config = published_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": EOS, "transformers_version": "4.37.0"}, indent=2))
    generator = torch.Generator().manual_seed(5)
    state = {name: _random(name, shape, generator) for name, shape in published_shapes(config).items()}
    save_shards(folder, state, 3)
    return state


def write_siglip(folder) -> dict[str, torch.Tensor]:
    """open_clip layout of timm/ViT-SO400M-14-SigLIP-384 (a 2-block, 32-wide trunk at 384 px, patch 14)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(11)
    width, mlp, tokens = TOWER_WIDTHS[0], 48, (384 // 14) ** 2

    def rand(*shape, scale=None):
        return torch.randn(shape, generator=generator) * (scale if scale is not None else shape[-1] ** -0.5)

    trunk = {"patch_embed.proj.weight": rand(width, 3, 14, 14, scale=0.05), "patch_embed.proj.bias": rand(width, scale=0.1),
             "pos_embed": rand(1, tokens, width, scale=0.5), "norm.weight": 1 + rand(width, scale=0.1),
             "norm.bias": rand(width, scale=0.1), "attn_pool.latent": rand(1, 1, width, scale=1.0)}
    for b in range(2):
        p = f"blocks.{b}."
        trunk.update({p + "norm1.weight": 1 + rand(width, scale=0.1), p + "norm1.bias": rand(width, scale=0.1),
                      p + "attn.qkv.weight": rand(3 * width, width), p + "attn.qkv.bias": rand(3 * width, scale=0.1),
                      p + "attn.proj.weight": rand(width, width), p + "attn.proj.bias": rand(width, scale=0.1),
                      p + "norm2.weight": 1 + rand(width, scale=0.1), p + "norm2.bias": rand(width, scale=0.1),
                      p + "mlp.fc1.weight": rand(mlp, width), p + "mlp.fc1.bias": rand(mlp, scale=0.1),
                      p + "mlp.fc2.weight": rand(width, mlp), p + "mlp.fc2.bias": rand(width, scale=0.1)})
    state = {f"visual.trunk.{key}": value for key, value in trunk.items()}
    state.update({"logit_scale": torch.tensor(4.0), "logit_bias": torch.tensor(-10.0),
                  "text.token_embedding.weight": rand(10, width)})
    save_file(state, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 1152, "init_logit_bias": -10,
                      "vision_cfg": {"image_size": 384, "timm_model_name": "vit_so400m_patch14_siglip_384",
                                     "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                      "text_cfg": {"context_length": 64, "vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-SO400M-14-SigLIP-384",
                                   "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 1152, "heads": 16,
                                   "layers": 27, "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True,
                                   "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                           "resize_mode": "squash"}}, indent=2))
    return trunk


def write_convnext(folder) -> dict[str, torch.Tensor]:
    """open_clip layout of laion/CLIP-convnext_xxlarge-...-soup (a 4-stage timm trunk, dims 8..20)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(13)

    def rand(*shape, scale):
        return torch.randn(shape, generator=generator) * scale

    dims = CONVNEXT_DIMS
    trunk = {"stem.0.weight": rand(dims[0], 3, 4, 4, scale=0.2), "stem.0.bias": rand(dims[0], scale=0.1),
             "stem.1.weight": 1 + rand(dims[0], scale=0.1), "stem.1.bias": rand(dims[0], scale=0.1),
             "head.norm.weight": torch.ones(dims[-1]), "head.norm.bias": torch.zeros(dims[-1])}
    for s, (dim, depth) in enumerate(zip(dims, CONVNEXT_DEPTHS)):
        if s:
            trunk.update({f"stages.{s}.downsample.0.weight": 1 + rand(dims[s - 1], scale=0.1),
                          f"stages.{s}.downsample.0.bias": rand(dims[s - 1], scale=0.1),
                          f"stages.{s}.downsample.1.weight": rand(dim, dims[s - 1], 2, 2, scale=0.3),
                          f"stages.{s}.downsample.1.bias": rand(dim, scale=0.1)})
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            trunk.update({p + "conv_dw.weight": rand(dim, 1, 7, 7, scale=0.15), p + "conv_dw.bias": rand(dim, scale=0.1),
                          p + "norm.weight": 1 + rand(dim, scale=0.1), p + "norm.bias": rand(dim, scale=0.1),
                          p + "mlp.fc1.weight": rand(4 * dim, dim, scale=dim ** -0.5),
                          p + "mlp.fc1.bias": rand(4 * dim, scale=0.1),
                          p + "mlp.fc2.weight": rand(dim, 4 * dim, scale=(4 * dim) ** -0.5),
                          p + "mlp.fc2.bias": rand(dim, scale=0.1), p + "gamma": 0.5 + rand(dim, scale=0.1)})
    state = {f"visual.trunk.{key}": value for key, value in trunk.items()}
    state.update({"visual.head.proj.weight": rand(16, dims[-1], scale=0.1), "logit_scale": torch.tensor(4.6)})
    save_file(state, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 1024,
                      "vision_cfg": {"timm_model_name": "convnext_xxlarge", "timm_model_pretrained": False,
                                     "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0,
                                     "timm_drop_path": 0.1, "image_size": 256},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}, indent=2))
    return trunk


def write_clip(folder) -> None:
    """transformers layout of openai/clip-vit-large-patch14-336: a tiny CLIPModel (336 px, patch 14)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(17)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 77},
        vision_config={"hidden_size": TOWER_WIDTHS[1], "intermediate_size": 48, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": 336}, indent=2))


def write_dinov2(folder) -> None:
    """transformers layout of facebook/dinov2-giant: a tiny Dinov2Model (518 px, patch 14, SwiGLU)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(19)
    config = Dinov2Config(hidden_size=TOWER_WIDTHS[2], num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                          image_size=518, patch_size=14, use_swiglu_ffn=True, layerscale_value=1.0)
    Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
        "image_processor_type": "BitImageProcessor", "image_std": IMAGENET_STD, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}, indent=2))


def fabricate_cambrian_hub(cache) -> dict:
    """All five snapshots in ``cache``; returns the original tensors the reference reads: ``checkpoint``
    (published names), ``siglip`` / ``convnext`` (timm trunk names), and the folders."""
    folders = {name: snapshot(cache, repo) for name, repo in
               (("checkpoint", REPO_ID), ("siglip", SIGLIP_ID), ("clip", CLIP_ID), ("dinov2", DINO_ID),
                ("convnext", CONVNEXT_ID))}
    return {"checkpoint": write_checkpoint(folders["checkpoint"]), "siglip": write_siglip(folders["siglip"]),
            "convnext": write_convnext(folders["convnext"]), "clip": write_clip(folders["clip"]),
            "dinov2": write_dinov2(folders["dinov2"]), "folders": folders}
