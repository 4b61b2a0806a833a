"""The "difflmm" family: DiffLMM (Stable Diffusion + CLIP vision tower, SDCLIPBlock projector, Vicuna + LoRA).

Published checkpoint (``Shengcao1006/difflmm-llava-v1.5-7b-lora``, the LLaVA-1.5 LoRA layout):

- ``config.json``: LLaVA-Llama config (Llama fields + ``mm_*``): ``mm_vision_tower`` = the SD-1.5 hub
  id or folder (subfolders ``vae``, ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``),
  ``mm_projector_type`` "SDCLIPBlock", ``mm_vision_select_layer`` (1: the UNet up-block whose output is
  the diffusion feature), ``mm_vision_resolution`` (384), ``mm_vision_sd_timestep`` (100),
  ``mm_vision_sd_ensemble_size`` (1), ``mm_vision_sd_clip`` (CLIP ViT-L/14-336 id or folder),
  ``mm_vision_sd_clip_proj_in`` / ``_out`` (1024 / 768), ``mm_vision_sd_concat_clip`` (true),
  ``mm_vision_sd_implicit_caption`` (true), ``mm_vision_sd_pe`` (576), ``mm_hidden_size`` (the
  release's list [1280, 1280, 640, 320, 1024]: channels of the up-blocks, then CLIP's);
- ``adapter_config.json`` + ``adapter_model.safetensors`` / ``.bin``: the PEFT LoRA of the language
  model (keys ``base_model.model.model.layers.N.*.lora_{A,B}.weight``), its base model named by
  ``base_model_name_or_path`` (``lmsys/vicuna-7b-v1.5``; the release's ``--model-base``);
- ``non_lora_trainables.bin``: the projector, keys ``base_model.model.model.mm_projector.<name>``.

The projector's parameter names are the release's ``SDCLIPBlock`` (Shengcao-Cao/groundLMM,
``llava/model/multimodal_projector/builder.py``): ``clip_projector.{0,2}`` (CLIP MLP,
proj_in -> proj_out -> proj_out), ``clip_pe`` (pe x proj_out), ``sd_norm_layer`` (LayerNorm over the
diffusion channels), ``clip_norm_layer`` (LayerNorm over the CLIP channels), ``vt_pe`` (pe x (sd + clip
channels)), ``linear.{0,2}`` ((sd + clip) -> hidden -> hidden). There is no 1x1 convolution.

Computation (the release's ``SDCLIPFeaturizer`` / ``SDCLIPBlock``), for pixel values x (B, 3, R, R):

1. CLIP: x resized bilinearly to R*7/8, mapped by x * 0.5 + 0.5 then (x - CLIP mean) / CLIP std,
   CLIP hidden_states[-2] without CLS: clip (B, N, proj_in), N = (R*7/8 / clip patch)**2.
2. Implicit caption (cross-attention context of the UNet): clip_projector(clip) + clip_pe + the mean
   over its 77 tokens of SD's text-encoder output for the empty prompt: (B, N, proj_out).
3. Diffusion: latents = VAE posterior sample * scaling_factor, noised to ``timestep`` with the DDIM
   schedule (sqrt(a_t) * latents + sqrt(1 - a_t) * noise), one UNet pass, output of up-block
   ``mm_vision_select_layer``: (B, C_sd, h, w) with h * w = N, averaged over ``ensemble_size`` draws.
4. Projector: LayerNorm(sd tokens) ++ LayerNorm(clip) + vt_pe -> Linear -> GELU -> Linear: (B, N, hidden).

Random draws: the release draws the posterior sample and the noise from the global RNG. Here each
image gets its own ``torch.Generator`` seeded with :data:`NOISE_SEED` on the model's device, drawing
per ensemble member first the posterior's standard normal, then the noise; features are therefore
reproducible and independent of batching (but, as in the release, differ between CPU and GPU).

Self-contained checkpoints: ``mm_vision_tower``, ``mm_vision_sd_clip`` and the adapter's
``base_model_name_or_path`` may name a subfolder of the checkpoint folder itself (a relative name such as
``sd``, ``clip`` or ``language_model`` that exists there: the toy DiffLMM, :mod:`stages.toy.difflmm`,
writes its SD, CLIP and trained language model so, with a zero LoRA, so the folder moves as one); a name
that is not such a subfolder (the release's hub ids) is read as before.

Image preprocessing, as the release (``SDCLIPVisionTower.load_model``): ``CLIPImageProcessor(size=R,
crop_size=R, mean=[0.5]*3, std=[0.5]*3)``; ``mean`` / ``std`` are not CLIPImageProcessor arguments, so
the release normalises with the CLIP statistics, and the model was trained so. This family keeps
that (``image_mean`` / ``image_std`` = CLIP's), so published weights see what they were trained on.

Conversion into transformers: a stock ``LlavaForConditionalGeneration`` whose ``model.vision_tower`` is
:class:`DiffusionVisionTower` (steps 1-3, returning per image token the concatenation
[diffusion feature, CLIP feature], (B, N, C_sd + proj_in), as ``hidden_states[-1]``) and whose
``model.multi_modal_projector`` is :class:`SDCLIPProjector` (step 4); ``vision_feature_layer`` -1,
strategy "full". The language model is the base LlamaForCausalLM with the LoRA merged (PEFT
``merge_and_unload``, as the release), so :mod:`stages.capture` works unchanged. The image token
is handled as in :mod:`stages.models.llava_v1` ("<image>" added, zero rows, suppressed), and so are the
prompt ids (the release's chunk-wise tokenisation around "<image>",
:class:`~stages.models.llava_v1.LlavaV1Processor`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stages.config import ConfigError
from stages.devices import place_model
from stages.models.base import Devices, LoadedLMM, uniform_layouts
from stages.models.checkpoints import load_weights_only
from stages.models.llava_v1 import (CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, LLAVA_V1_CHAT_TEMPLATE,
                                    LlavaV1Processor, add_image_token, llama_text_config, load_tokenizer,
                                    pad_embedding_rows, resolve_checkpoint)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

log = logging.getLogger(__name__)

NOISE_SEED = 0
CLIP_RESIZE = (7, 8)        # CLIP input side = R * 7 // 8 (336 for R = 384)
_NON_LORA_PREFIX = "model.mm_projector."


class DiffusionVisionTower(nn.Module):
    """DiffLMM's vision tower: pixel values (B, 3, R, R) -> per image token [diffusion, CLIP] features.

    ``vae``: SD's AutoencoderKL (only its encoder and quant_conv are used); ``unet``: SD's
    UNet2DConditionModel; ``clip``: CLIPVisionModel; ``alphas_cumprod``: (T,) float DDIM schedule;
    ``null_caption``: (proj_out,) mean of SD's text-encoder output for the empty prompt. Owns the
    release's CLIP MLP (``clip_projector``) and ``clip_pe`` (pe, proj_out), which the release keeps in
    the projector and lends to the tower.
    """

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, clip: CLIPVisionModel,
                 alphas_cumprod: torch.Tensor, null_caption: torch.Tensor, *, proj_in: int, proj_out: int,
                 pe: int, timestep: int, ensemble_size: int, feature_block: int):
        super().__init__()
        self.vae, self.unet, self.clip = vae, unet, clip
        self.clip_projector = nn.Sequential(nn.Linear(proj_in, proj_out), nn.GELU(),
                                            nn.Linear(proj_out, proj_out))
        self.clip_pe = nn.Parameter(torch.zeros(pe, proj_out))
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("null_caption", null_caption, persistent=False)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.timestep, self.ensemble_size, self.feature_block = timestep, ensemble_size, feature_block

    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> CLIP penultimate-layer patch features (B, N, proj_in), CLS dropped."""
        height, width = (side * CLIP_RESIZE[0] // CLIP_RESIZE[1] for side in pixel_values.shape[-2:])
        image = nn.functional.interpolate(pixel_values, size=(height, width), mode="bilinear",
                                          align_corners=False)
        image = ((image * 0.5 + 0.5) - self.clip_mean.to(image.dtype)) / self.clip_std.to(image.dtype)
        return self.clip(image, output_hidden_states=True).hidden_states[-2][:, 1:]

    def _unet_block_output(self, noisy: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """UNet pass up to the output of up-block ``feature_block``: (B, C_sd, h, w)."""
        unet = self.unet
        timesteps = torch.full((noisy.shape[0],), self.timestep, dtype=torch.long, device=noisy.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(noisy.dtype))
        sample = unet.conv_in(noisy)
        residuals = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=caption)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        sample = unet.mid_block(sample, emb, encoder_hidden_states=caption)
        forward_size = any(side % 2 ** unet.num_upsamplers for side in noisy.shape[-2:])
        for block in unet.up_blocks[:self.feature_block + 1]:
            res, residuals = residuals[-len(block.resnets):], residuals[:-len(block.resnets)]
            size = residuals[-1].shape[2:] if forward_size else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=caption, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               upsample_size=size)
        return sample

    def diffusion_features(self, pixel_values: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """UNet up-block features of the noised VAE latents, averaged over the ensemble: (B, C_sd, h, w).

        ``caption``: (B, N, proj_out) cross-attention context. Draws follow the module doc (per-image
        generators seeded with NOISE_SEED: posterior normal, then noise, per ensemble member).
        """
        posterior = self.vae.encode(pixel_values).latent_dist
        generators = [torch.Generator(device=pixel_values.device).manual_seed(NOISE_SEED)
                      for _ in range(pixel_values.shape[0])]
        shape = posterior.mean.shape[1:]

        def normal() -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g, device=pixel_values.device,
                                            dtype=posterior.mean.dtype) for g in generators])

        alpha = self.alphas_cumprod[self.timestep]
        total = None
        for _ in range(self.ensemble_size):
            latents = (posterior.mean + posterior.std * normal()) * self.vae.config.scaling_factor
            noisy = alpha.sqrt().to(latents.dtype) * latents + (1 - alpha).sqrt().to(latents.dtype) * normal()
            features = self._unet_block_output(noisy, caption)
            total = features if total is None else total + features
        return total / self.ensemble_size

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        """(B, 3, R, R) in the model's dtype -> ``BaseModelOutput`` whose ``last_hidden_state`` and only
        ``hidden_states`` entry are (B, N, C_sd + proj_in): per token [diffusion feature, CLIP feature].
        Extra keyword arguments (LLaVA's ``output_hidden_states``, ``return_dict``) are ignored."""
        from transformers.modeling_outputs import BaseModelOutput

        clip = self.clip_features(pixel_values)
        caption = self.clip_projector(clip) + self.clip_pe + self.null_caption
        sd = self.diffusion_features(pixel_values, caption)
        batch, channels, height, width = sd.shape
        if height * width != clip.shape[1]:
            raise ValueError(f"diffusion grid {height}x{width} does not match {clip.shape[1]} CLIP patches")
        tokens = torch.cat([sd.flatten(2).transpose(1, 2), clip], dim=-1)
        return BaseModelOutput(last_hidden_state=tokens, hidden_states=(tokens,))


class SDCLIPProjector(nn.Module):
    """The release's SDCLIPBlock (concat_clip, pe > 0) on token features: (B, N, sd + clip) -> (B, N, hidden).

    Parameter names follow the release (``sd_norm_layer``, ``clip_norm_layer``, ``vt_pe``,
    ``linear.{0,2}``) so ``non_lora_trainables.bin`` loads by name; its ``clip_projector`` / ``clip_pe``
    live in :class:`DiffusionVisionTower`.
    """

    def __init__(self, sd_channels: int, clip_channels: int, hidden_size: int, pe: int):
        super().__init__()
        self.sd_channels = sd_channels
        self.sd_norm_layer = nn.LayerNorm(sd_channels)
        self.clip_norm_layer = nn.LayerNorm(clip_channels)
        width = sd_channels + clip_channels
        self.vt_pe = nn.Parameter(torch.zeros(pe, width))
        self.linear = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(),
                                    nn.Linear(hidden_size, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        sd, clip = tokens[..., :self.sd_channels], tokens[..., self.sd_channels:]
        joined = torch.cat([self.sd_norm_layer(sd), self.clip_norm_layer(clip)], dim=-1)
        return self.linear(joined + self.vt_pe)


def _local_source(folder: Path, source: str) -> str:
    """``source`` as a subfolder of the checkpoint ``folder`` when it names one there (relative), else
    unchanged (a hub id or a path of its own)."""
    inside = folder / source
    return str(inside) if not Path(source).is_absolute() and inside.is_dir() else source


def _check_fields(raw: dict[str, Any], path: str) -> None:
    """ConfigError unless the config describes the published DiffLMM variant."""
    expected = {"mm_projector_type": "SDCLIPBlock", "mm_vision_sd_concat_clip": True,
                "mm_vision_sd_implicit_caption": True, "mm_use_im_start_end": False}
    for field, value in expected.items():
        found = raw.get(field, False if field == "mm_use_im_start_end" else None)
        if found != value:
            raise ConfigError(f"{path!r}: {field} = {found!r}; the difflmm family supports {value!r}")
    for field in ("mm_vision_tower", "mm_vision_sd_clip", "mm_vision_resolution", "mm_vision_sd_timestep",
                  "mm_vision_sd_ensemble_size", "mm_vision_select_layer", "mm_vision_sd_clip_proj_in",
                  "mm_vision_sd_clip_proj_out", "mm_vision_sd_pe"):
        if raw.get(field) is None:
            raise ConfigError(f"{path!r}: config.json lacks {field}; not a DiffLMM checkpoint")
    if raw["mm_vision_sd_pe"] <= 0:
        raise ConfigError(f"{path!r}: mm_vision_sd_pe must be the number of image tokens (> 0)")


def non_lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` with the release's key normalisation (drop "base_model.", then
    "model." when keys start with "model.model."), restricted to ``model.mm_projector.*``, the prefix
    removed. Any other key raises ConfigError."""
    state = load_weights_only(folder / "non_lora_trainables.bin", what="DiffLMM projector weights")
    state = {(key[len("base_model."):] if key.startswith("base_model.") else key): value
             for key, value in state.items()}
    if any(key.startswith("model.model.") for key in state):
        state = {(key[len("model."):] if key.startswith("model.") else key): value
                 for key, value in state.items()}
    unknown = [key for key in state if not key.startswith(_NON_LORA_PREFIX)]
    if unknown:
        raise ConfigError(f"{folder}: non_lora_trainables.bin holds keys outside the projector: "
                          f"{unknown[:5]}")
    return {key[len(_NON_LORA_PREFIX):]: value for key, value in state.items()}


def _null_caption(sd_source: str, dtype: torch.dtype) -> torch.Tensor:
    """Mean over tokens of SD's text-encoder output (last_hidden_state) for "" padded to the tokenizer's
    max length, as the release's ``_encode_prompt`` computes it: (cross_attention_dim,)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_source, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd_source, subfolder="text_encoder").eval()
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state[0].mean(0).to(dtype)


def _build_tower(raw: dict[str, Any], dtype: torch.dtype, attn_implementation: str) -> DiffusionVisionTower:
    """The vision tower from the SD folder / id ``mm_vision_tower`` and CLIP ``mm_vision_sd_clip``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModel

    sd_source, clip_source = raw["mm_vision_tower"], raw["mm_vision_sd_clip"]
    try:
        vae = AutoencoderKL.from_pretrained(sd_source, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(sd_source, subfolder="unet", torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(sd_source, subfolder="scheduler")
        null_caption = _null_caption(sd_source, dtype)
        clip = CLIPVisionModel.from_pretrained(clip_source, dtype=dtype,
                                               attn_implementation=attn_implementation)
    except OSError as exc:
        raise ConfigError(f"cannot load DiffLMM's vision tower ({sd_source!r}, {clip_source!r}): "
                          f"{exc}") from None
    for field in ("class_embed_type", "addition_embed_type"):
        if unet.config.get(field) is not None:
            raise ConfigError(f"{sd_source!r}: UNet with {field}; DiffLMM uses SD-1.5's UNet")
    vae.decoder = None
    tower = DiffusionVisionTower(
        vae, unet, clip, scheduler.alphas_cumprod, null_caption,
        proj_in=int(raw["mm_vision_sd_clip_proj_in"]),
        proj_out=int(raw["mm_vision_sd_clip_proj_out"]), pe=int(raw["mm_vision_sd_pe"]),
        timestep=int(raw["mm_vision_sd_timestep"]), ensemble_size=int(raw["mm_vision_sd_ensemble_size"]),
        feature_block=int(raw["mm_vision_select_layer"]))
    return tower.to(dtype)


def _merged_language_model(folder: Path, raw: dict[str, Any], dtype: torch.dtype, attn_implementation: str,
                           base: str | None):
    """(base LlamaForCausalLM with the LoRA of ``folder`` merged, base model source); ``base`` None
    takes ``adapter_config.json``'s ``base_model_name_or_path``."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    if base is None:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        base = adapter.get("base_model_name_or_path")
        base = _local_source(folder, base) if base else base
    if not base:
        raise ConfigError(f"{folder}/adapter_config.json names no base_model_name_or_path; set lmm.base")
    base_folder = resolve_checkpoint(base)
    llm = LlamaForCausalLM.from_pretrained(base_folder, config=llama_text_config(raw), dtype=dtype,
                                           attn_implementation=attn_implementation)
    return PeftModel.from_pretrained(llm, folder).merge_and_unload(), base_folder


def load_difflmm(path: str, *, dtype: torch.dtype, attn_implementation: str,
                 device: Devices, base: str | None = None) -> LoadedLMM:
    """Load a DiffLMM LoRA checkpoint (folder or hub id) as a LLaVA model with the diffusion tower.

    The base model is ``base`` (the release's ``--model-base``, e.g. ``lmsys/vicuna-7b-v1.5``) or, when
    None, ``adapter_config.json``'s ``base_model_name_or_path``; SD-1.5 and CLIP come from the ids /
    folders the checkpoint names (``mm_vision_tower``, ``mm_vision_sd_clip``).
    Returns the model in eval mode (``dtype`` on ``device``: one device, or several CUDA devices it is
    spread over once built, :func:`stages.devices.place_model`, the diffusion vision tower kept whole
    on one of them since its forward draws noise on the pixels' device and calls the UNet's blocks
    itself) and a :class:`~stages.models.llava_v1.LlavaV1Processor` (R px CLIP
    preprocessing, base tokenizer + "<image>", llava_v1 template) expanding "<image>" to N tokens,
    laid row-major on the N = cells x cells diffusion grid; ``pad_to_square`` when config.json's
    ``image_aspect_ratio`` is "pad" (the release's expand2square).
    """
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    folder = resolve_checkpoint(path)
    for name in ("config.json", "adapter_config.json", "non_lora_trainables.bin"):
        if not (folder / name).is_file():
            raise ConfigError(f"{path!r} has no {name}; not a DiffLMM LoRA checkpoint")
    raw = json.loads((folder / "config.json").read_text())
    _check_fields(raw, path)
    for field in ("mm_vision_tower", "mm_vision_sd_clip"):
        raw[field] = _local_source(folder, raw[field])
    projector_state = non_lora_state(folder)
    tower = _build_tower(raw, dtype, attn_implementation)
    llm, base_folder = _merged_language_model(folder, raw, dtype, attn_implementation, base)
    tokenizer = load_tokenizer(base_folder, str(base_folder))
    added_ids = add_image_token(tokenizer)

    sd_channels = tower.unet.up_blocks[tower.feature_block].resnets[-1].out_channels
    clip_channels = tower.clip.config.hidden_size
    projector = SDCLIPProjector(sd_channels, clip_channels, llm.config.hidden_size,
                                int(raw["mm_vision_sd_pe"]))
    tower_keys = {"clip_projector.0.weight", "clip_projector.0.bias", "clip_projector.2.weight",
                  "clip_projector.2.bias", "clip_pe"}
    try:
        tower.load_state_dict({key: projector_state.pop(key) for key in tower_keys}, strict=False)
        projector.load_state_dict(projector_state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"non_lora_trainables.bin of {path!r} does not fit its config.json: "
                          f"{exc}") from None
    projector.to(dtype)

    resolution = int(raw["mm_vision_resolution"])
    vae_factor = 2 ** (len(tower.vae.config.block_out_channels) - 1)
    patch = vae_factor * 2 ** (len(tower.unet.up_blocks) - 2 - tower.feature_block)
    cells = resolution // patch
    clip_cells = resolution * CLIP_RESIZE[0] // CLIP_RESIZE[1] // tower.clip.config.patch_size
    if clip_cells != cells or int(raw["mm_vision_sd_pe"]) != cells * cells:
        raise ConfigError(f"{path!r}: diffusion grid {cells}x{cells}, "
                          f"CLIP grid {clip_cells}x{clip_cells} and "
                          f"mm_vision_sd_pe {raw['mm_vision_sd_pe']} disagree")

    text_config = llm.config
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    config = LlavaConfig(
        vision_config=tower.clip.config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_seq_length=cells * cells, pad_token_id=tokenizer.pad_token_id)
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                           attn_implementation=attn_implementation)
    model.model.vision_tower, model.model.multi_modal_projector = tower, projector
    state = {f"model.language_model.{key}": value for key, value in llm.model.state_dict().items()}
    state["lm_head.weight"] = llm.lm_head.weight.detach()
    pad_embedding_rows(state, text_config.vocab_size)
    prefix = "model.language_model."
    model.model.language_model.load_state_dict(
        {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)},
        strict=True, assign=True)
    model.lm_head.load_state_dict({"weight": state["lm_head.weight"]}, strict=True, assign=True)

    if (base_folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(base_folder)
    else:
        generation = GenerationConfig.from_model_config(llm.config)
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if added_ids:
        generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(added_ids))
    model.generation_config = generation

    image_processor = CLIPImageProcessor(size={"shortest_edge": resolution},
                                         crop_size={"height": resolution, "width": resolution},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaV1Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=LLAVA_V1_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    place_model(model, device, keep_whole=[DiffusionVisionTower.__name__])
    model.eval()
    log.info("loaded DiffLMM %s (SD %s, CLIP %s, base %s; %s, %s, %s)", path, raw["mm_vision_tower"],
             raw["mm_vision_sd_clip"], base_folder, dtype, attn_implementation, device)
    image_token_id = int(config.image_token_id)
    return LoadedLMM(family="difflmm", path=path, model=model, processor=processor,
                     image_token_id=image_token_id,
                     image_layouts=uniform_layouts(image_token_id, (cells, cells)),
                     pad_to_square=raw.get("image_aspect_ratio") == "pad",
                     unpadded_grid_covers="centre_square")
