"""The "llava" family: stock transformers ``LlavaForConditionalGeneration`` + ``AutoProcessor``.

Loads any checkpoint in the llava-hf layout (e.g. ``llava-hf/llava-1.5-7b-hf``, or the toy model of
:mod:`stages.toy.model`) from a local folder or a hub id. The processor must expand the
``<image>`` placeholder to one token per image feature (llava-hf processors carry ``patch_size``,
``num_additional_image_tokens`` and ``vision_feature_select_strategy`` for that). Every image fills
the vision tower's square grid ((image_size / patch_size)**2 tokens, row-major); LLaVA-1.5 was
trained on images padded to a square (``pad_to_square``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from stages.config import ConfigError
from stages.devices import place_model, pretrained_placement
from stages.models.base import Devices, LoadedLMM, model_source, uniform_layouts

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_llava(path: str, *, dtype: torch.dtype, attn_implementation: str, device: Devices) -> LoadedLMM:
    """Load model (eval mode, ``dtype``, on ``device``: one device, or several CUDA devices it is
    loaded straight onto with ``device_map="auto"``, see :mod:`stages.devices`) and processor from
    ``path``.

    ``attn_implementation`` ("sdpa" | "flash_attention_2") applies to the whole model; attention
    capture later swaps only the language model's implementation. Raises ConfigError naming
    ``path`` when it is not a model folder or a loadable hub id, or holds no llava-hf processor.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source = model_source(path)
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        model = LlavaForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **pretrained_placement(device))
    except (OSError, ValueError) as exc:  # ValueError: e.g. a model that needs its own code (never run)
        raise ConfigError(f"cannot load LLaVA model {path!r} (lmm.path): {exc}") from None
    if getattr(processor, "patch_size", None) is None:
        raise ConfigError(f"the processor of {path!r} has no patch_size, so it does not expand <image> into "
                          "one token per image feature; use a llava-hf processor (processor_config.json)")
    place_model(model, device)
    model.eval()
    vision = model.config.vision_config
    cells = vision.image_size // vision.patch_size
    image_token_id = int(model.config.image_token_id)
    log.info("loaded LLaVA %s (%s, %s, %s)", path, dtype, attn_implementation, device)
    return LoadedLMM(family="llava", path=path, model=model, processor=processor,
                     image_token_id=image_token_id,
                     image_layouts=uniform_layouts(image_token_id, (cells, cells)),
                     pad_to_square=True, unpadded_grid_covers="centre_square")
