"""The settings of one trained model (one entry of the config's ``training:`` section).

Every default is the schema's (``schemas/config.schema.yaml``, ``training.<name>``), which holds
LLaVA-1.5's values (``scripts/v1_5/pretrain.sh``, ``finetune_lora.sh``) and DiffLMM's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.config import ConfigError, schema_default

FAMILY_DEFAULTS = {
    # family: (vision_tower, mm_projector_type, mm_vision_select_layer)
    "difflmm": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "SDCLIPBlock", 1),
    "llava_original": ("openai/clip-vit-large-patch14-336", "mlp2x_gelu", -2),
}


def _d(*path: str):
    return schema_default("training", "*", *path)


@dataclass(frozen=True)
class Stage1Config:
    """Projector pretraining: LLaVA pretraining JSON, ``plain`` template, only the projector trains."""

    data: str = _d("stage1", "data")
    image_folder: str = _d("stage1", "image_folder")
    epochs: float = _d("stage1", "epochs")
    max_steps: int | None = _d("stage1", "max_steps")
    global_batch_size: int = _d("stage1", "global_batch_size")
    per_device_batch_size: int = _d("stage1", "per_device_batch_size")
    lr: float = _d("stage1", "lr")
    warmup_ratio: float = _d("stage1", "warmup_ratio")
    weight_decay: float = _d("stage1", "weight_decay")
    max_length: int = _d("stage1", "max_length")
    image_aspect_ratio: str = _d("stage1", "image_aspect_ratio")


@dataclass(frozen=True)
class Stage2Config:
    """LoRA finetuning: LLaVA instruction JSON, ``v1`` template, LoRA of the LLM + projector train."""

    data: str = _d("stage2", "data")
    image_folder: str = _d("stage2", "image_folder")
    epochs: float = _d("stage2", "epochs")
    max_steps: int | None = _d("stage2", "max_steps")
    global_batch_size: int = _d("stage2", "global_batch_size")
    per_device_batch_size: int = _d("stage2", "per_device_batch_size")
    lr: float = _d("stage2", "lr")
    mm_projector_lr: float = _d("stage2", "mm_projector_lr")
    warmup_ratio: float = _d("stage2", "warmup_ratio")
    weight_decay: float = _d("stage2", "weight_decay")
    max_length: int = _d("stage2", "max_length")
    lora_r: int = _d("stage2", "lora_r")
    lora_alpha: float = _d("stage2", "lora_alpha")
    lora_dropout: float = _d("stage2", "lora_dropout")
    image_aspect_ratio: str = _d("stage2", "image_aspect_ratio")


@dataclass(frozen=True)
class Recipe:
    """One model to train; ``vision_tower`` / ``mm_projector_type`` / ``mm_vision_select_layer`` None
    take the family's (:data:`FAMILY_DEFAULTS`, see :meth:`resolved`)."""

    family: str = _d("family")
    base: str = _d("base")
    vision_tower: str | None = _d("vision_tower")
    mm_projector_type: str | None = _d("mm_projector_type")
    mm_vision_select_layer: int | None = _d("mm_vision_select_layer")
    mm_vision_sd_timestep: int = _d("mm_vision_sd_timestep")
    mm_vision_sd_ensemble_size: int = _d("mm_vision_sd_ensemble_size")
    mm_vision_sd_clip: str = _d("mm_vision_sd_clip")
    mm_vision_sd_concat_clip: bool = _d("mm_vision_sd_concat_clip")
    mm_vision_sd_implicit_caption: bool = _d("mm_vision_sd_implicit_caption")
    mm_vision_sd_pe: int = _d("mm_vision_sd_pe")
    mm_vision_resolution: int = _d("mm_vision_resolution")
    gpus: int = _d("gpus")
    precision: str = _d("precision")
    gradient_checkpointing: bool = _d("gradient_checkpointing")
    attn_implementation: str = _d("attn_implementation")
    seed: int = _d("seed")
    save_steps: int = _d("save_steps")
    save_total_limit: int = _d("save_total_limit")
    log_steps: int = _d("log_steps")
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DEFAULTS:
            raise ConfigError(f"training: family {self.family!r}; known: {sorted(FAMILY_DEFAULTS)}")
        expected = FAMILY_DEFAULTS[self.family][1]
        if self.mm_projector_type not in (None, expected):
            raise ConfigError(f"training: mm_projector_type {self.mm_projector_type!r} with family "
                              f"{self.family!r}; it takes {expected!r}")
        if not (self.mm_vision_sd_concat_clip and self.mm_vision_sd_implicit_caption):
            raise ConfigError("training: only mm_vision_sd_concat_clip and mm_vision_sd_implicit_caption "
                              "true (the published DiffLMM) are supported")

    @property
    def tower(self) -> str:
        return self.vision_tower or FAMILY_DEFAULTS[self.family][0]

    @property
    def projector_type(self) -> str:
        return FAMILY_DEFAULTS[self.family][1]

    @property
    def select_layer(self) -> int:
        default = FAMILY_DEFAULTS[self.family][2]
        return default if self.mm_vision_select_layer is None else self.mm_vision_select_layer

    def stage(self, number: int) -> Stage1Config | Stage2Config:
        if number not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {number}")
        return self.stage1 if number == 1 else self.stage2
