"""The "qwen2_5_vl" family: stock transformers ``Qwen2_5_VLForConditionalGeneration`` + ``AutoProcessor``.

Checkpoints: ``Qwen/Qwen2.5-VL-3B-Instruct``, ``-7B-Instruct``, ``-72B-Instruct``, or a folder in their
layout. The published checkpoints predate transformers 5 (flat text fields in ``config.json``, weight
keys ``visual.*`` and ``model.layers.*``); transformers' own conversion mapping for
``Qwen2_5_VLForConditionalGeneration`` renames them to ``model.visual.*`` / ``model.language_model.*``
at load. The prompt is the model's own chat template (``chat_template.json``: a default system message
"You are a helpful assistant.", then ``<|vision_start|><|image_pad|><|vision_end|>`` and the question).

Dynamic resolution. The image goes to the processor as it is (no square padding). The image processor
(``smart_resize``) resizes it, keeping its aspect ratio as closely as it can, to H x W pixels with H and
W multiples of ``patch_size * merge_size`` (14 * 2 = 28) and ``min_pixels <= H * W <= max_pixels``, cuts
it into 14 px patches and merges every 2 x 2 block of patches into one language-model token: the image
becomes R x C = (H / 28) x (W / 28) ``<|image_pad|>`` tokens, and ``image_grid_thw`` holds (1, H / 14,
W / 14) for it. The grid covers the whole resized image, without padding: cell (r, c) is the 28 x 28
square at pixel rows [28 r, 28 r + 28) and columns [28 c, 28 c + 28) of the resized image, i.e. rows
[r h / R, (r + 1) h / R) and columns [c w / C, (c + 1) w / C) of the original h x w image (the resize is
a stretch): an attention map on the grid maps back to the image by stretching it over the image.

Token order, from the transformers 5.24 source (and checked by the tests on a non-square image):

- ``Qwen2VLImageProcessor.patchify`` reshapes the resized image (channels, H, W) to (channels, R, 2, 14,
  C, 2, 14) and permutes it to (R, C, 2, 2, channels, 14, 14) before flattening: merged cells in
  row-major order, the four patches of a cell consecutive (themselves row-major).
- ``Qwen2_5_VisionTransformerPretrainedModel.forward`` reorders the merged cells into window order for
  its windowed attention (``permute_input_for_window_attn`` with ``get_vision_window_index``), merges
  each four consecutive patches (``Qwen2_5_VLPatchMerger``) and undoes the reordering
  (``merged_hidden_states[argsort(window_index)]``): output row k is merged cell (k // C, k % C).
- ``Qwen2_5_VLModel.forward`` writes the image's features over its ``<|image_pad|>`` tokens with
  ``masked_scatter`` in sequence order, images in batch order; M-RoPE (``get_rope_index``) gives those
  tokens the (row, column) positions of a row-major meshgrid, the same order.

So the k-th image token of a sequence is cell (k // C, k % C): :func:`qwen_image_layouts`.

``max_pixels`` bounds the tokens per image (and the vision tower's cost, which attends over 4x as many
patches). The loader keeps the checkpoint's ``preprocessor_config.json`` (published: ``min_pixels``
3136, ``max_pixels`` 12845056, i.e. 4 to 16384 tokens; a 640 x 480 COCO image becomes 476 x 644
pixels, a grid of 17 rows x 23 columns = 391 tokens) unless ``lmm.min_pixels`` / ``lmm.max_pixels`` set
them (the release's scripts: ``max_pixels`` 1008 * 1008; Qwen suggests 1280 * 28 * 28 to cap the cost).

Decoding: the checkpoint's ``generation_config.json`` is kept. The published one samples with
``top_k`` 1 and ``repetition_penalty`` 1.05; with the pipeline's ``do_sample=False`` decoding is
greedy and the repetition penalty still applies (Qwen's recommended decoding, deterministic).

M-RoPE is internal to the model: ``generate`` computes the 3D positions from ``input_ids``,
``mm_token_type_ids`` and ``image_grid_thw`` (all in the processor's output), left padding included.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stages.config import ConfigError
from stages.devices import place_model, pretrained_placement
from stages.models.base import Devices, ImageLayout, LoadedLMM, model_source

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def qwen_image_layouts(inputs: Mapping[str, Any], image_token_id: int, merge_size: int) -> list[ImageLayout]:
    """Where each batch item's image-grid cells sit in its sequence.

    ``inputs``: the processor's batch output, one image per item: ``input_ids`` (B, L) int64, left
    padding allowed; ``image_grid_thw`` (B, 3) int64, per image (temporal patches = 1, height and
    width in patches of ``patch_size`` px), images in batch order. ``merge_size``: patches per merged
    cell along each side (2). Returns B layouts; layout b has ``grid`` (R, C) = (height / merge_size,
    width / merge_size) and ``positions`` (R * C,) int64 on ``input_ids``' device: the indices along L
    (padding counted) of item b's ``image_token_id`` tokens, in order, i.e. cell (r, c) at
    ``positions[r * C + c]``. Raises ValueError when the inputs do not hold one R x C run of image
    tokens per item.
    """
    missing = [key for key in ("input_ids", "image_grid_thw") if key not in inputs]
    if missing:
        raise ValueError(f"the processor output lacks {missing}; Qwen2.5-VL image layouts need input_ids "
                         "and image_grid_thw")
    input_ids, grid_thw = inputs["input_ids"], inputs["image_grid_thw"]
    if grid_thw.shape != (input_ids.shape[0], 3):
        raise ValueError(f"image_grid_thw has shape {tuple(grid_thw.shape)}; expected one (t, h, w) row per "
                         f"batch item, ({input_ids.shape[0]}, 3)")
    layouts = []
    for b, (frames, height, width) in enumerate(grid_thw.tolist()):
        if frames != 1 or height % merge_size or width % merge_size:
            raise ValueError(f"item {b}: image_grid_thw {(frames, height, width)} is not one image whose "
                             f"patch grid divides by merge_size {merge_size}")
        rows, columns = height // merge_size, width // merge_size
        positions = (input_ids[b] == image_token_id).nonzero()[:, 0]
        count = int(positions.numel())
        if count != rows * columns or (count and int(positions[-1] - positions[0]) + 1 != count):
            raise ValueError(f"item {b}: {count} image tokens ({image_token_id}), expected one run of "
                             f"{rows} x {columns} = {rows * columns}")
        layouts.append(ImageLayout(positions=positions, grid=(rows, columns)))
    return layouts


def load_qwen2_5_vl(path: str, *, dtype: torch.dtype, attn_implementation: str, device: Devices,
                    min_pixels: int | None = None, max_pixels: int | None = None) -> LoadedLMM:
    """Load model (eval mode, ``dtype``, on ``device``: one device, or several CUDA devices it is
    loaded straight onto with ``device_map="auto"``, see :mod:`stages.devices`) and processor from ``path``;
    ``min_pixels`` / ``max_pixels`` (``lmm.min_pixels`` / ``lmm.max_pixels``) override the image
    processor's pixel budget (None: the checkpoint's ``preprocessor_config.json``).

    ``attn_implementation`` ("sdpa" | "flash_attention_2" | "eager") applies to the vision tower and
    the language model; attention capture later swaps only the language model's (``text_config``).
    The returned :class:`LoadedLMM` has ``pad_to_square`` False and ``image_layouts`` =
    :func:`qwen_image_layouts` (every image has its own grid; no fixed ``grid``). Raises ConfigError
    naming ``path`` when it is not a model folder or a loadable hub id, or when its processor does not
    match the model (not a Qwen2.5-VL config or processor, other patch or merge size, other image token).
    """
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    source = model_source(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load Qwen2.5-VL model {path!r} (lmm.path): {exc}") from None
    if config.model_type != "qwen2_5_vl":
        raise ConfigError(f"{path!r} (lmm.path) holds a model of type {config.model_type!r}, "
                          "not 'qwen2_5_vl'")
    try:
        budget = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                  if value is not None}
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False, **budget)
    except (OSError, ValueError) as exc:
        # ValueError: e.g. an unknown image_processor_type ("Qwen2_5_VLImageProcessor" in snapshots taken
        # before the hub's preprocessor_config.json was changed to "Qwen2VLImageProcessor").
        raise ConfigError(f"cannot load the processor of Qwen2.5-VL model {path!r} (lmm.path): "
                          f"{exc}") from None
    image_processor = getattr(processor, "image_processor", None)
    merge_size = getattr(image_processor, "merge_size", None)
    if merge_size is None or getattr(processor, "image_token_id", None) is None:
        raise ConfigError(f"the processor of {path!r} is a {type(processor).__name__}, not a Qwen2.5-VL "
                          "processor (preprocessor_config.json with patch_size and merge_size)")
    ours = (image_processor.patch_size, merge_size, processor.image_token_id)
    theirs = (config.vision_config.patch_size, config.vision_config.spatial_merge_size, config.image_token_id)
    if ours != theirs:
        raise ConfigError(f"the processor of {path!r} has (patch_size, merge_size, image token id) {ours}, "
                          f"the model {theirs}")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation=attn_implementation,
            **pretrained_placement(device))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load Qwen2.5-VL model {path!r} (lmm.path): {exc}") from None
    place_model(model, device)
    model.eval()
    log.info("loaded Qwen2.5-VL %s (%s, %s, %s; images of %d to %d pixels)", path, dtype, attn_implementation,
             device, image_processor.size["shortest_edge"], image_processor.size["longest_edge"])
    image_token_id = int(config.image_token_id)
    return LoadedLMM(family="qwen2_5_vl", path=path, model=model, processor=processor,
                     image_token_id=image_token_id,
                     image_layouts=functools.partial(qwen_image_layouts, image_token_id=image_token_id,
                                                     merge_size=int(merge_size)),
                     pad_to_square=False)
