"""Segment Anything models: a registry of architectures, checkpoint loading, and the embedded toy SAM.

Every builder returns an ``segment_anything.modeling.Sam`` with random weights, in eval mode, on the
CPU; :func:`load_sam` fills it from a checkpoint. The released architectures (``vit_h``, ``vit_l``,
``vit_b``) are segment_anything's own builders called with ``checkpoint=None`` (their loader uses an
unrestricted ``torch.load``; ours uses ``weights_only=True``). ``tiny`` is a small SAM of the same
classes for offline runs and tests: 256 px input, a 16 x 16 patch grid, a 64 x 64 low-resolution mask,
a 3-block image encoder whose last two blocks attend globally.

Checkpoints are plain state dicts: ``.pth`` (``torch.save``, as the official SAM files) or
``.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from stages.config import ConfigError
from stages.io.atomic import atomic_path
from stages.models.checkpoints import load_weights_only

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam


def _build_vit_h() -> Sam:
    from segment_anything import build_sam_vit_h

    return build_sam_vit_h(checkpoint=None)


def _build_vit_l() -> Sam:
    from segment_anything import build_sam_vit_l

    return build_sam_vit_l(checkpoint=None)


def _build_vit_b() -> Sam:
    from segment_anything import build_sam_vit_b

    return build_sam_vit_b(checkpoint=None)


# The toy architecture: SAM's layout at a fraction of the width, depth and resolution.
TINY_IMAGE_SIZE = 256
TINY_PATCH_SIZE = 16
TINY_ENCODER_DIM = 48
TINY_PROMPT_DIM = 32
# Depth 3 with two global-attention blocks, chosen on the toy world's val split (stages/toy/train_sam.py
# has the numbers): against depth 2 with one global block, more objects' masks reach IoU 0.5 from a
# random point inside them, for 20% more time per training step; large objects were the ones cut short.
TINY_ENCODER_DEPTH = 3
TINY_GLOBAL_ATTENTION_BLOCKS = (1, 2)


def _build_tiny() -> Sam:
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = TINY_IMAGE_SIZE // TINY_PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, embed_dim=TINY_ENCODER_DIM, depth=TINY_ENCODER_DEPTH,
            num_heads=2, mlp_ratio=2.0, out_chans=TINY_PROMPT_DIM, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
            global_attn_indexes=TINY_GLOBAL_ATTENTION_BLOCKS),
        prompt_encoder=PromptEncoder(
            embed_dim=TINY_PROMPT_DIM, image_embedding_size=(grid, grid),
            input_image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=TINY_PROMPT_DIM, mlp_dim=64, num_heads=2),
            transformer_dim=TINY_PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


SAM_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": _build_vit_h,
    "vit_l": _build_vit_l,
    "vit_b": _build_vit_b,
    "tiny": _build_tiny,
}


def build_sam(sam_type: str) -> Sam:
    """A randomly initialised SAM of architecture ``sam_type`` (a key of :data:`SAM_BUILDERS`)."""
    try:
        builder = SAM_BUILDERS[sam_type]
    except KeyError:
        raise ConfigError(f"unknown SAM type {sam_type!r}; known: {sorted(SAM_BUILDERS)}") from None
    return builder()


def read_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, on the CPU."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pth", ".pt", ".bin"):
        state = load_weights_only(path, what="SAM checkpoint")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"SAM checkpoint {path} does not hold a plain state dict (name -> tensor)")
        return dict(state)
    raise ConfigError(f"SAM checkpoint {path}: unknown format {path.suffix!r}; use .pth or .safetensors")


def _check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise ConfigError naming missing, unexpected and wrongly shaped keys, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", reshaped)) if keys]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def load_sam(sam_type: str, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> Sam:
    """SAM of architecture ``sam_type`` with the weights of ``checkpoint``, float32, eval mode, on ``device``.

    Raises :class:`ConfigError` for an unknown type (listing the known ones), a missing checkpoint
    (naming its path), an unknown file format, or a state dict that does not fit the architecture
    (naming the missing, unexpected and wrongly shaped keys).
    """
    sam = build_sam(sam_type)
    state = read_state_dict(checkpoint)
    _check_state_dict(sam, state, f"SAM checkpoint {checkpoint} does not fit SAM type {sam_type!r}")
    sam.load_state_dict(state, strict=True)
    return sam.float().eval().to(device)


def build_toy_sam(out_path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised ``tiny`` SAM to ``out_path`` (safetensors) and return the path.

    The weights depend only on ``seed`` (the global torch RNG is left as it was), so two builds
    with the same seed give identical tensors.
    """
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _build_tiny()
    state = {name: tensor.contiguous() for name, tensor in sam.state_dict().items()}
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"sam_type": "tiny", "seed": str(seed)})
    return out_path
