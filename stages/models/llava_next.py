"""The "llava_next" family: stock transformers ``LlavaNextForConditionalGeneration`` + ``AutoProcessor``.

Loads checkpoints in the llava-hf LLaVA-NeXT layout (``llava-hf/llava-v1.6-mistral-7b-hf``,
``llava-hf/llava-v1.6-vicuna-7b-hf``, ``llava-hf/llama3-llava-next-8b-hf``, or a folder in that
layout): ``config.json`` (``model_type`` "llava_next", ``image_grid_pinpoints``,
``vision_feature_select_strategy``, ``vision_feature_layer``, ``image_token_index``, a CLIP
``vision_config`` and a Mistral / Llama ``text_config``), sharded safetensors, the tokenizer files,
``preprocessor_config.json`` (``LlavaNextImageProcessor``), ``processor_config.json`` (``patch_size``,
``num_additional_image_tokens``, ``vision_feature_select_strategy``) and the chat template. The prompt
is the model's own chat template (Mistral: ``[INST] <image>\\n{question} [/INST]``; Vicuna:
``USER: <image>\\n{question} ASSISTANT:``; Llama 3: its header/``<|eot_id|>`` turns).

Where the image tokens come from (transformers 5.24: ``LlavaNextImageProcessor``,
``LlavaNextModel.get_image_features`` / ``pack_image_features``, ``LlavaNextProcessor``); with
``s = image_size / patch_size`` (336 / 14 = 24):

- the image processor makes a *base image*, the whole image resized to image_size x image_size
  (stretched, its aspect ratio is not kept; nothing is padded), and *anyres tiles*: the image
  resized, keeping its aspect ratio, to fit the best of ``image_grid_pinpoints`` (``(H, W)`` pixel
  canvases, e.g. 672 x 672; ``select_best_resolution``), padded with black to that canvas, centred,
  and cut into ``nh x nw`` tiles of image_size, row-major;
- the vision tower encodes each of them; strategy "default" drops the CLS token, leaving s x s
  patch features per tile, row-major;
- ``pack_image_features`` puts first the base image's s * s features, then the tiles' features laid
  as one ``(nh * s) x (nw * s)`` grid (tile (ti, tj), patch (i, j) -> row ti * s + i, column
  tj * s + j), *unpadded* with ``unpad_image`` and the image's ``image_sizes`` (H, W): the rows (or
  columns) of the canvas padding are cut symmetrically, leaving ``rows x columns``; then one
  ``image_newline`` feature after every row: ``rows x (columns + 1)``, row-major;
- the processor expands ``<image>`` to exactly s * s + rows * (columns + 1) tokens, which
  ``masked_scatter`` fills with those features in order.

Two grids are meaningful (``lmm.grid``): ``highres`` (default), the unpadded ``rows x columns`` grid
with the newline column dropped, which follows the image's aspect ratio and covers the whole image
(the canvas padding is cut at whole-cell granularity, so an edge may be off by less than one cell);
and ``base``, the s x s grid of the base image, which covers the whole image stretched to a square.
Neither pads the image to a square before the processor (the release and llava-hf take it as it
is): ``pad_to_square`` is False and both grids cover the whole image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from stages.config import ConfigError
from stages.devices import place_model, pretrained_placement
from stages.models.base import Devices, ImageLayout, LoadedLMM, model_source
from stages.models.registry import LMM_FAMILIES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def highres_grid(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the unpadded high-resolution grid of an image of ``image_size`` (H, W) px,
    computed with the model's own ``get_anyres_image_grid_shape`` and ``unpad_image``."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints,
                                                   vision.image_size)
    canvas = torch.empty(0, tiles_h * side, tiles_w * side)
    rows, columns = unpad_image(canvas, list(image_size)).shape[1:]
    return int(rows), int(columns)


def anyres_layouts(config: Any, grid: str) -> Callable[[Mapping[str, Any]], list[ImageLayout]]:
    """``LoadedLMM.image_layouts`` of a LLaVA-NeXT model with ``config`` (a ``LlavaNextConfig``).

    The returned function takes the processor's batch output (``input_ids`` (B, L), ``image_sizes``
    (B, 2) as (H, W) of each item's image, one image per item) and returns per item the positions
    of the ``grid`` cells: ``highres`` cell (r, c) is image feature s * s + r * (columns + 1) + c,
    ``base`` cell (r, c) is image feature r * s + c, where image feature k sits at the item's k-th
    ``image_token_id`` position. ValueError when an item does not hold s * s + rows * (columns + 1)
    image tokens.
    """
    import torch

    choices = LMM_FAMILIES["llava_next"].grid_choices
    if grid not in choices:
        raise ValueError(f"grid must be one of {choices}, got {grid!r}")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    image_token_id = int(config.image_token_id)

    def layouts(inputs: Mapping[str, Any]) -> list[ImageLayout]:
        input_ids, image_sizes = inputs["input_ids"], inputs["image_sizes"]
        result = []
        for b in range(input_ids.shape[0]):
            size = tuple(int(v) for v in image_sizes[b].tolist())
            rows, columns = highres_grid(config, size)
            where = (input_ids[b] == image_token_id).nonzero()[:, 0]
            expected = side * side + rows * (columns + 1)
            if len(where) != expected:
                raise ValueError(f"an image of {size[0]} x {size[1]} px needs {expected} image tokens "
                                 f"({side} x {side} base + {rows} x ({columns} + 1) high-resolution); "
                                 f"sequence {b} holds {len(where)}")
            if grid == "base":
                features, cells = torch.arange(side * side), (side, side)
            else:
                row_starts = side * side + torch.arange(rows) * (columns + 1)
                features = (row_starts[:, None] + torch.arange(columns)[None, :]).reshape(-1)
                cells = (rows, columns)
            result.append(ImageLayout(where[features.to(where.device)], cells))
        return result

    return layouts


def load_llava_next(path: str, *, dtype: torch.dtype, attn_implementation: str, device: Devices,
                    grid: str = "highres") -> LoadedLMM:
    """Load a LLaVA-NeXT model (eval mode, ``dtype``, on ``device``: one device, or several CUDA
    devices it is loaded straight onto with ``device_map="auto"``, see :mod:`stages.devices`) and its
    processor from ``path``.

    ``attn_implementation`` ("sdpa" | "flash_attention_2") applies to the whole model; attention
    capture later swaps only the language model's. ``grid``: "highres" or "base" (module docstring).
    A tokenizer without a pad token pads with its end-of-sequence token (batches are left-padded and
    masked). Raises ConfigError naming ``path`` when it is not a loadable LLaVA-NeXT model with a
    llava-hf processor, or when processor and model disagree on the anyres resolutions.
    """
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

    source = model_source(path)
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        model = LlavaNextForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **pretrained_placement(device))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load LLaVA-NeXT model {path!r} (lmm.path): {exc}") from None
    if not isinstance(processor, LlavaNextProcessor) or getattr(processor, "patch_size", None) is None:
        raise ConfigError(f"the processor of {path!r} is no llava-hf LlavaNextProcessor with a patch_size "
                          f"(processor_config.json); got {type(processor).__name__}")
    pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
    if pinpoints != [list(p) for p in model.config.image_grid_pinpoints]:
        raise ConfigError(f"{path!r}: image_grid_pinpoints of preprocessor_config.json {pinpoints} and of "
                          f"config.json {model.config.image_grid_pinpoints} differ")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    place_model(model, device)
    model.eval()
    log.info("loaded LLaVA-NeXT %s (%s grid; %s, %s, %s)", path, grid, dtype, attn_implementation, device)
    return LoadedLMM(family="llava_next", path=path, model=model, processor=processor,
                     image_token_id=int(model.config.image_token_id),
                     image_layouts=anyres_layouts(model.config, grid), pad_to_square=False)
