"""Tiny DiffLMM parts in their published hub layouts, shared by the loader, preset and training tests:
SD-1.5 (:func:`write_sd`), the CLIP ViT-L/14-336 tower (:func:`write_clip`, with its image processor),
Vicuna-7B-v1.5 (:func:`write_base`: tiny weights, the real tokenizer) and the DiffLMM LoRA
(:func:`write_lora`), and :func:`fabricate_difflmm_hub`, all four under their hub ids."""

from __future__ import annotations

import json

import torch
from real_tokenizers import LLAMA2_VOCAB_SIZE, write_vicuna_tokenizer
from test_llava_original import llama_fields

LORA_ID = "Shengcao1006/difflmm-llava-v1.5-7b-lora"
BASE_ID = "lmsys/vicuna-7b-v1.5"
SD_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_ID = "openai/clip-vit-large-patch14-336"
RESOLUTION = 64              # SD input; VAE factor 4 -> latent 16; up-block 1 -> 8 x 8
CLIP_SIDE, CLIP_PATCH = 56, 7  # 64 * 7 / 8 = 56 px, 8 x 8 patches
GRID = 8
SD_CHANNELS, CLIP_HIDDEN, CROSS = 16, 24, 12
TIMESTEP = 100
LORA_R, LORA_ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "Describe the image in detail."


def write_sd(folder) -> None:
    """SD-1.5's folder layout: model_index.json, vae/, unet/, scheduler/ (PNDM, as published),
    text_encoder/, tokenizer/ (CLIP BPE vocab.json + merges.txt)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=RESOLUTION).save_pretrained(folder / "vae")
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 8, SD_CHANNELS, SD_CHANNELS), norm_num_groups=4, cross_attention_dim=CROSS,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.no_grad():      # random, not zero-initialised output convs: informative features
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    unet.save_pretrained(folder / "unet")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1,
             **{f"{c}</w>": 2 + i for i, c in enumerate("abcdefgh")}}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder / "tokenizer")
    text_config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=CROSS, intermediate_size=24,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))


def write_clip(folder) -> None:
    """CLIP ViT-L/14-336's layout: the vision model (CLIPVisionModel.save_pretrained) and its
    preprocessor_config.json (resize + centre crop to the model's side, CLIP statistics)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(4)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_HIDDEN, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, image_size=CLIP_SIDE, patch_size=CLIP_PATCH,
                                     initializer_range=0.2)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIDE}, crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)


def write_base(folder) -> None:
    """lmsys/vicuna-7b-v1.5's layout: LlamaForCausalLM.save_pretrained, the real Vicuna tokenizer as
    published (tokenizer.model only, ``"legacy": false``), generation_config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    write_vicuna_tokenizer(folder, legacy=False, sentencepiece_only=True)
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(**llama_fields(LLAMA2_VOCAB_SIZE))).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}))


def write_lora(folder, base_folder) -> None:
    """The LoRA layout: config.json (Llama + mm_* fields), adapter_config.json + adapter_model.safetensors,
    non_lora_trainables.bin (keys base_model.model.model.mm_projector.*)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_folder)
    vocab_size = base.config.vocab_size
    config = {"_name_or_path": BASE_ID, "architectures": ["LlavaLlamaForCausalLM"],
              "model_type": "llava_llama", **llama_fields(vocab_size), "image_aspect_ratio": "pad",
              "mm_hidden_size": [16, 16, 8, 8, CLIP_HIDDEN],
              "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "SDCLIPBlock",
              "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
              "mm_vision_resolution": RESOLUTION,
              "mm_vision_sd_clip": CLIP_ID, "mm_vision_sd_clip_proj_in": CLIP_HIDDEN,
              "mm_vision_sd_clip_proj_out": CROSS, "mm_vision_sd_concat_clip": True,
              "mm_vision_sd_ensemble_size": 1, "mm_vision_sd_implicit_caption": True,
              "mm_vision_sd_pe": GRID * GRID, "mm_vision_sd_timestep": TIMESTEP,
              "mm_vision_select_feature": "patch", "mm_vision_select_layer": 1,
              "mm_vision_tower": SD_ID, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
              "torch_dtype": "bfloat16", "tune_mm_mlp_adapter": False, "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    peft_model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                                 lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    torch.manual_seed(6)
    with torch.no_grad():                      # LoRA B starts at zero: make the adapter change the model
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    peft_model.save_pretrained(folder)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = BASE_ID
    (folder / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    width = SD_CHANNELS + CLIP_HIDDEN
    hidden = config["hidden_size"]
    shapes = {"clip_projector.0.weight": (CROSS, CLIP_HIDDEN), "clip_projector.0.bias": (CROSS,),
              "clip_projector.2.weight": (CROSS, CROSS), "clip_projector.2.bias": (CROSS,),
              "clip_pe": (GRID * GRID, CROSS), "vt_pe": (GRID * GRID, width),
              "sd_norm_layer.weight": (SD_CHANNELS,), "sd_norm_layer.bias": (SD_CHANNELS,),
              "clip_norm_layer.weight": (CLIP_HIDDEN,), "clip_norm_layer.bias": (CLIP_HIDDEN,),
              "linear.0.weight": (hidden, width), "linear.0.bias": (hidden,),
              "linear.2.weight": (hidden, hidden), "linear.2.bias": (hidden,)}
    generator = torch.Generator().manual_seed(7)
    trainables = {f"base_model.model.model.mm_projector.{key}": torch.randn(shape, generator=generator) * 0.5
                  + (1.0 if key.endswith("norm_layer.weight") else 0.0) for key, shape in shapes.items()}
    torch.save(trainables, folder / "non_lora_trainables.bin")


def fabricate_difflmm_hub(cache) -> dict:
    """SD, CLIP, Vicuna and the DiffLMM LoRA as snapshots of a fake hub cache: {repo id: folder}."""
    from fake_hub import snapshot

    folders = {repo: snapshot(cache, repo) for repo in (SD_ID, CLIP_ID, BASE_ID, LORA_ID)}
    write_sd(folders[SD_ID])
    write_clip(folders[CLIP_ID])
    write_base(folders[BASE_ID])
    write_lora(folders[LORA_ID], folders[BASE_ID])
    return folders
