"""The model trained by the recipe, assembled from stock parts, and its published layouts.

:class:`Trainee` is LLaVA-1.5's ``LlavaLlamaForCausalLM`` forward written out: the vision tower's
features go through the projector and replace the embeddings of the :data:`~stages.training.data.IMAGE_INDEX`
positions of the token ids, then the language model (a stock ``LlamaForCausalLM``, in stage 2 wrapped by
``peft`` with the LoRA) computes the next-token loss on the labels. Families:

- ``difflmm``: :class:`stages.models.difflmm.DiffusionVisionTower` (SD-1.5's VAE + UNet + CLIP, built
  by the loader's own ``_build_tower`` from the recipe's ``mm_*`` options) and
  :class:`~stages.models.difflmm.SDCLIPProjector`. Trainable: the projector and the tower's
  ``clip_projector`` / ``clip_pe`` (the release's SDCLIPBlock holds them; they make the UNet's implicit
  caption, so their gradient flows back through the frozen UNet). Position embeddings start as the
  release's ``randn * 0.02``.
- ``llava_original``: a stock ``CLIPVisionModel``, features of layer ``mm_vision_select_layer`` without
  CLS, and the ``mlp2x_gelu`` projector (``0`` Linear, ``1`` GELU, ``2`` Linear).

Frozen: the towers and, in stage 1, the whole language model; stage 2 adds a LoRA on every linear
layer of the language model's decoder (a regex on ``model.layers.N.{self_attn,mlp}``: the towers are
no part of the wrapped model, and ``lm_head`` is left out, as LLaVA's ``find_all_linear_names``).

Layouts written (:func:`save_projector`, :func:`export_difflmm`, :func:`export_llava_original`):

- stage 1: ``mm_projector.bin`` (keys ``model.mm_projector.<name>``, the release's
  ``--pretrain_mm_mlp_adapter`` file) + ``config.json`` with the ``mm_*`` fields;
- difflmm, stage 2: the published DiffLMM LoRA layout that :func:`stages.models.difflmm.load_difflmm`
  reads (``config.json`` = the base's Llama fields + ``mm_*``, ``adapter_config.json`` +
  ``adapter_model.safetensors``, ``non_lora_trainables.bin`` with keys
  ``base_model.model.model.mm_projector.<name>``);
- llava_original, stage 2: the original LLaVA-1.5 layout (LoRA merged into the weights,
  ``model.safetensors`` with ``model.layers.*`` / ``model.mm_projector.{0,2}.*``, the tokenizer,
  ``config.json`` naming the CLIP tower) that :func:`stages.models.llava_original.load_llava_original`
  reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.config import ConfigError
from stages.models.llava_v1 import CLIP_MEAN, CLIP_STD, load_tokenizer, resolve_checkpoint
from stages.training.data import IMAGE_INDEX
from stages.training.recipe import Recipe

LORA_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PE_INIT_STD = 0.02
_TOWER_TRAINABLE = ("clip_projector.", "clip_pe")


class Trainee(nn.Module):
    """Tower + projector + language model (module docstring); ``forward`` returns the mean next-token
    loss over the labelled tokens."""

    def __init__(self, family: str, tower: nn.Module, projector: nn.Module, llm: nn.Module,
                 select_layer: int):
        super().__init__()
        self.family, self.select_layer = family, select_layer
        self.tower, self.projector, self.llm = tower, projector, llm

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> (n, image tokens, hidden)."""
        if self.family == "difflmm":
            return self.projector(self.tower(pixel_values).last_hidden_state)
        with torch.no_grad():
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        image = input_ids == IMAGE_INDEX
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image, 0))
        if pixel_values is not None:
            tower_dtype = next(self.tower.parameters()).dtype
            features = self.image_features(pixel_values.to(tower_dtype))
            if features.shape[0] * features.shape[1] != int(image.sum()):
                raise ValueError(f"{int(image.sum())} image tokens for {features.shape[0]} images of "
                                 f"{features.shape[1]} features")
            embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype))
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                        use_cache=False).loss

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The release's ``mm_projector`` weights by their names there (difflmm: the SDCLIPBlock's,
        including the tower's ``clip_projector`` / ``clip_pe``; llava_original: ``0.*`` / ``2.*``)."""
        state = {key: value.detach().cpu() for key, value in self.projector.state_dict().items()}
        if self.family == "difflmm":
            state.update({key: value.detach().cpu() for key, value in self.tower.state_dict().items()
                          if key.startswith(_TOWER_TRAINABLE)})
        return state

    def load_projector_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if self.family == "difflmm":
            tower = {key: state.pop(key) for key in list(state) if key.startswith(_TOWER_TRAINABLE)}
            wanted = {key for key in self.tower.state_dict() if key.startswith(_TOWER_TRAINABLE)}
            missing = wanted - set(tower)
            if missing:
                raise ConfigError(f"stage-1 projector lacks {sorted(missing)}")
            self.tower.load_state_dict(tower, strict=False)
        self.projector.load_state_dict(state, strict=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by its name in this module (what a checkpoint saves)."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}


def _image_grid_difflmm(tower: nn.Module, resolution: int, pe: int) -> int:
    """Image tokens of DiffLMM at ``resolution`` (as the loader computes them); ConfigError when the
    diffusion grid, the CLIP grid and ``mm_vision_sd_pe`` disagree."""
    vae_factor = 2 ** (len(tower.vae.config.block_out_channels) - 1)
    patch = vae_factor * 2 ** (len(tower.unet.up_blocks) - 2 - tower.feature_block)
    cells = resolution // patch
    clip_cells = resolution * 7 // 8 // tower.clip.config.patch_size
    if clip_cells != cells or pe != cells * cells:
        raise ConfigError(f"training: diffusion grid {cells}x{cells}, CLIP grid {clip_cells}x{clip_cells} "
                          f"and mm_vision_sd_pe {pe} disagree (mm_vision_resolution {resolution})")
    return cells * cells


def difflmm_fields(recipe: Recipe, tower: nn.Module | None = None) -> dict[str, Any]:
    """The ``mm_*`` fields of a DiffLMM config.json (the release's names)."""
    fields = {"mm_vision_tower": recipe.tower, "mm_projector_type": "SDCLIPBlock",
              "mm_vision_select_layer": recipe.select_layer, "mm_vision_select_feature": "patch",
              "mm_vision_resolution": recipe.mm_vision_resolution,
              "mm_vision_sd_timestep": recipe.mm_vision_sd_timestep,
              "mm_vision_sd_ensemble_size": recipe.mm_vision_sd_ensemble_size,
              "mm_vision_sd_clip": recipe.mm_vision_sd_clip, "mm_vision_sd_concat_clip": True,
              "mm_vision_sd_implicit_caption": True, "mm_vision_sd_pe": recipe.mm_vision_sd_pe,
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat"}
    if tower is not None:
        fields["mm_hidden_size"] = [block.resnets[-1].out_channels for block in tower.unet.up_blocks] + \
            [tower.clip.config.hidden_size]
        fields["mm_vision_sd_clip_proj_in"] = tower.clip.config.hidden_size
        fields["mm_vision_sd_clip_proj_out"] = tower.unet.config.cross_attention_dim
    return fields


def _build_difflmm_tower(recipe: Recipe, dtype: torch.dtype, attn_implementation: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from stages.models.difflmm import _build_tower

    try:
        clip_config = CLIPVisionConfig.from_pretrained(recipe.mm_vision_sd_clip)
        unet_config = UNet2DConditionModel.load_config(recipe.tower, subfolder="unet")
    except OSError as exc:
        raise ConfigError(f"training: cannot read the towers {recipe.tower!r} / "
                          f"{recipe.mm_vision_sd_clip!r}: {exc}") from None
    raw = {"mm_vision_tower": recipe.tower, "mm_vision_sd_clip": recipe.mm_vision_sd_clip,
           "mm_vision_sd_clip_proj_in": clip_config.hidden_size,
           "mm_vision_sd_clip_proj_out": unet_config["cross_attention_dim"],
           "mm_vision_sd_pe": recipe.mm_vision_sd_pe, "mm_vision_sd_timestep": recipe.mm_vision_sd_timestep,
           "mm_vision_sd_ensemble_size": recipe.mm_vision_sd_ensemble_size,
           "mm_vision_select_layer": recipe.select_layer}
    tower = _build_tower(raw, dtype, attn_implementation)
    # The release's SDCLIPBlock keeps clip_projector / clip_pe trainable in fp32.
    tower.clip_projector.float()
    tower.clip_pe.data = torch.randn(tower.clip_pe.shape) * PE_INIT_STD
    return tower


def build_trainee(recipe: Recipe, stage: int, *, frozen_dtype: torch.dtype = torch.float32,
                  projector_state: dict[str, torch.Tensor] | None = None):
    """(Trainee, tokenizer, image processor, image tokens per image, base folder) for ``stage``.

    Frozen weights in ``frozen_dtype``, trainable ones in float32. Stage 2 needs ``projector_state``
    (stage 1's projector, :func:`read_projector`) and adds the LoRA. Initialisation draws from
    torch's global RNG: seed it first."""
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    base_folder = resolve_checkpoint(recipe.base)
    tokenizer = load_tokenizer(base_folder, recipe.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token           # LLaVA's llava_v1 training
    attn = recipe.attn_implementation
    try:
        llm = LlamaForCausalLM.from_pretrained(base_folder, dtype=frozen_dtype, attn_implementation=attn)
    except OSError as exc:
        raise ConfigError(f"training: cannot load the base model {recipe.base!r}: {exc}") from None
    llm.config.use_cache = False
    hidden = llm.config.hidden_size
    if recipe.family == "difflmm":
        tower = _build_difflmm_tower(recipe, frozen_dtype, attn)
        from stages.models.difflmm import SDCLIPProjector

        sd_channels = tower.unet.up_blocks[tower.feature_block].resnets[-1].out_channels
        projector = SDCLIPProjector(sd_channels, tower.clip.config.hidden_size, hidden,
                                    recipe.mm_vision_sd_pe)
        projector.vt_pe.data = torch.randn(projector.vt_pe.shape) * PE_INIT_STD
        image_tokens = _image_grid_difflmm(tower, recipe.mm_vision_resolution, recipe.mm_vision_sd_pe)
        side = recipe.mm_vision_resolution
        image_processor = CLIPImageProcessor(size={"shortest_edge": side},
                                             crop_size={"height": side, "width": side},
                                             image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    else:
        try:
            tower = CLIPVisionModel.from_pretrained(recipe.tower, dtype=frozen_dtype,
                                                    attn_implementation=attn)
            image_processor = CLIPImageProcessor.from_pretrained(recipe.tower)
        except OSError as exc:
            raise ConfigError(f"training: cannot load the CLIP tower {recipe.tower!r}: {exc}") from None
        width = tower.config.hidden_size
        projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        image_tokens = (tower.config.image_size // tower.config.patch_size) ** 2
    for module in (tower, llm):
        module.requires_grad_(False)
    if recipe.family == "difflmm":
        tower.clip_projector.requires_grad_(True)
        tower.clip_pe.requires_grad_(True)
        tower.vae.eval()
    projector.float().requires_grad_(True)
    if recipe.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.family == "difflmm":
            tower.unet.enable_gradient_checkpointing()
    trainee = Trainee(recipe.family, tower, projector, llm, recipe.select_layer)
    if stage == 2:
        from peft import LoraConfig, get_peft_model

        if projector_state is None:
            raise ValueError("stage 2 starts from stage 1's projector")
        trainee.load_projector_state(projector_state)
        cfg = recipe.stage2
        trainee.llm = get_peft_model(llm, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return trainee, tokenizer, image_processor, image_tokens, base_folder


# ------------------------------------------------------------------------------------------------
# Layouts


def _mm_fields(recipe: Recipe, trainee: Trainee, stage: int) -> dict[str, Any]:
    cfg = recipe.stage(stage)
    fields = {"image_aspect_ratio": cfg.image_aspect_ratio, "tokenizer_model_max_length": cfg.max_length,
              "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": stage == 1, "use_mm_proj": True,
              "mm_projector_lr": getattr(cfg, "mm_projector_lr", None)}
    if recipe.family == "difflmm":
        return {**fields, **difflmm_fields(recipe, trainee.tower)}
    return {**fields, "mm_vision_tower": recipe.tower, "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": trainee.tower.config.hidden_size, "mm_vision_select_layer": recipe.select_layer,
            "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "mm_patch_merge_type": "flat"}


def _llava_config(recipe: Recipe, trainee: Trainee, stage: int, base_folder: Path) -> dict[str, Any]:
    """The base's config.json (its Llama fields) turned into a LLaVA-Llama one with the ``mm_*`` fields."""
    raw = json.loads((base_folder / "config.json").read_text())
    raw.update({"_name_or_path": recipe.base, "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama", "use_cache": True})
    return {**raw, **_mm_fields(recipe, trainee, stage)}


def save_projector(trainee: Trainee, folder: Path, recipe: Recipe, base_folder: Path) -> None:
    """Stage 1's output: ``mm_projector.bin`` (keys ``model.mm_projector.<name>``) + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({f"model.mm_projector.{key}": value for key, value in trainee.projector_state().items()},
               folder / "mm_projector.bin")
    (folder / "config.json").write_text(json.dumps(_llava_config(recipe, trainee, 1, base_folder), indent=2))


def read_projector(folder: str | Path) -> dict[str, torch.Tensor]:
    """Stage 1's projector by the release's names (``model.mm_projector.`` removed)."""
    from stages.models.checkpoints import load_weights_only

    state = load_weights_only(Path(folder) / "mm_projector.bin", what="stage-1 projector")
    prefix = "model.mm_projector."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def export_difflmm(trainee: Trainee, folder: Path, recipe: Recipe, base_folder: Path) -> None:
    """The published DiffLMM LoRA layout (module docstring) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    trainee.llm.save_pretrained(folder)
    adapter_file = folder / "adapter_config.json"
    adapter = json.loads(adapter_file.read_text())
    adapter["base_model_name_or_path"] = recipe.base
    adapter_file.write_text(json.dumps(adapter, indent=2))
    torch.save({f"base_model.model.model.mm_projector.{key}": value
                for key, value in trainee.projector_state().items()}, folder / "non_lora_trainables.bin")
    (folder / "config.json").write_text(json.dumps(_llava_config(recipe, trainee, 2, base_folder), indent=2))


def export_llava_original(trainee: Trainee, folder: Path, recipe: Recipe, base_folder: Path,
                          tokenizer: Any) -> None:
    """The original LLaVA-1.5 layout, the LoRA merged (module docstring), into ``folder``; merges
    ``trainee``'s LoRA in place."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    merged = trainee.llm.merge_and_unload()       # in place: the last use of the trained model
    trainee.llm = merged
    state = {key: value.detach().cpu().contiguous() for key, value in merged.state_dict().items()}
    state.update({f"model.mm_projector.{key}": value.contiguous()
                  for key, value in trainee.projector_state().items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_llava_config(recipe, trainee, 2, base_folder), indent=2))
    tokenizer.save_pretrained(folder)
    if (base_folder / "generation_config.json").is_file():
        shutil.copy(base_folder / "generation_config.json", folder / "generation_config.json")
