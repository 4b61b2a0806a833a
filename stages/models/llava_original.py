"""The "llava_original" family: LLaVA-1.5 checkpoints in the original release's layout, converted on load.

The original layout (``liuhaotian/llava-v1.5-7b``, ``-13b``) is one LLaVA-Llama checkpoint:

- ``config.json``: ``model_type`` "llava_llama" (some releases say "llava"), ``architectures``
  ["LlavaLlamaForCausalLM"], the Llama fields (``hidden_size``, ``num_hidden_layers``, ``vocab_size``
  32000, ...) plus the ``mm_*`` fields: ``mm_vision_tower`` (CLIP hub id or folder, e.g.
  "openai/clip-vit-large-patch14-336"), ``mm_projector_type`` "mlp2x_gelu", ``mm_hidden_size``
  (1024), ``mm_vision_select_layer`` (-2), ``mm_vision_select_feature`` "patch",
  ``mm_use_im_start_end`` false, ``image_aspect_ratio`` "pad";
- weights (``model.safetensors`` / ``pytorch_model.bin``, or shards with their ``*.index.json``)
  with keys ``model.embed_tokens.weight``, ``model.layers.*``, ``model.norm.weight``,
  ``lm_head.weight``, ``model.mm_projector.{0,2}.{weight,bias}``; ``.bin`` files are read with
  ``torch.load(weights_only=True)``. Keys under ``model.vision_tower.`` are ignored, as the release
  ignores them: its vision tower is always loaded from ``mm_vision_tower``;
- the Vicuna (Llama) tokenizer files and, optionally, ``generation_config.json``.

Conversion into stock transformers ``LlavaForConditionalGeneration`` (the llava-hf architecture, so
:mod:`stages.capture` works unchanged):

- vision tower: ``CLIPVisionModel`` from ``mm_vision_tower``; ``vision_feature_layer`` =
  ``mm_vision_select_layer``, strategy "default" (CLS dropped, = the release's "patch" feature);
- projector: ``model.mm_projector.0`` -> ``linear_1``, GELU, ``model.mm_projector.2`` -> ``linear_2``;
- language model: ``model.{embed_tokens,layers,norm}`` -> ``model.language_model.*``, ``lm_head`` kept;
- image token (:mod:`stages.models.llava_v1`): the release splices the sentinel id -200
  (``IMAGE_TOKEN_INDEX``) into the prompt ids and never puts an image token in the vocabulary.
  llava-hf needs a real id, so "<image>" is added to the tokenizer as a special added token when
  absent (id = the old vocabulary size, 32000 for Vicuna, as llava-hf's conversion does). The
  embedding and ``lm_head`` matrices gain one zero row per added id (the embedding row is never
  read: the model writes the image features over those positions), and the added ids go into
  ``generation_config.suppress_tokens``, so the logits of the original 32000 tokens and greedy
  decoding are exactly the release's;
- processor: :class:`~stages.models.llava_v1.LlavaV1Processor` = ``CLIPImageProcessor`` of
  ``mm_vision_tower`` + the tokenizer (pad token = unk when the tokenizer has none, as LLaVA's
  ``llava_v1`` training does) + the ``llava_v1`` chat template; it tokenises the prompt chunk by chunk
  around "<image>" as the release does (the same ids whatever the tokenizer's ``legacy`` flag) and
  expands "<image>" to one token per patch ((image_size / patch_size)**2 = 576 for CLIP ViT-L/14-336).
  A tokenizer shipped only as ``tokenizer.model`` (as published) needs ``sentencepiece`` and
  ``protobuf``.

``image_aspect_ratio`` "pad" (expand2square with the image mean colour, every LLaVA-1.5 release) is
``LoadedLMM.pad_to_square``, applied by the generate stage (``generate.pad_to_square: auto``), not
by the processor; any other value (or none: the release's default) means no padding.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from stages.config import ConfigError
from stages.devices import place_model
from stages.models.base import Devices, LoadedLMM, uniform_layouts
from stages.models.llava_v1 import (IMAGE_TOKEN, LLAVA_V1_CHAT_TEMPLATE, LlavaV1Processor, add_image_token,
                                    convert_state_dict, llama_text_config, load_tokenizer, pad_embedding_rows,
                                    read_checkpoint_config, read_state_dict)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _check_mm_fields(raw: dict[str, Any], path: str) -> None:
    """ConfigError unless the ``mm_*`` fields describe LLaVA-1.5 (CLIP patch features, mlp2x_gelu)."""
    expected = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch",
                "mm_use_im_start_end": False, "mm_patch_merge_type": "flat"}
    for field, value in expected.items():
        if raw.get(field, value) != value:
            raise ConfigError(f"{path!r}: {field} = {raw[field]!r}; "
                              f"the llava_original family supports {value!r}")
    if "mm_vision_tower" not in raw:
        raise ConfigError(f"{path!r}: config.json has no mm_vision_tower; not a LLaVA-1.5 checkpoint")


def load_llava_original(path: str, *, dtype: torch.dtype, attn_implementation: str,
                        device: Devices) -> LoadedLMM:
    """Load an original-layout LLaVA-1.5 checkpoint (folder or hub id) as a llava-hf model + processor.

    The model is a ``LlavaForConditionalGeneration`` in eval mode, parameters in ``dtype`` on
    ``device`` (one device, or several CUDA devices it is spread over once built:
    :func:`stages.devices.place_model`), ``attn_implementation`` ("sdpa" | "flash_attention_2") for
    both towers; its vocabulary is the tokenizer's (Vicuna: 32001 with "<image>" = 32000). Raises
    ConfigError naming ``path`` for a missing or non-LLaVA-1.5 checkpoint, or a CLIP tower that does
    not fit ``mm_hidden_size``.
    """
    from transformers import (CLIPImageProcessor, CLIPVisionModel, GenerationConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    from transformers.initialization import no_init_weights

    folder, raw = read_checkpoint_config(path)
    _check_mm_fields(raw, path)
    tower_source = raw["mm_vision_tower"]
    tokenizer = load_tokenizer(folder, path)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(tower_source)
        tower = CLIPVisionModel.from_pretrained(tower_source, dtype=dtype,
                                                attn_implementation=attn_implementation)
    except OSError as exc:
        raise ConfigError(f"cannot load the vision tower {tower_source!r} of {path!r}: {exc}") from None
    vision_config = tower.config
    if vision_config.hidden_size != raw.get("mm_hidden_size", vision_config.hidden_size):
        raise ConfigError(f"{path!r}: mm_hidden_size {raw['mm_hidden_size']} != hidden size "
                          f"{vision_config.hidden_size} of the vision tower {tower_source!r}")

    added_ids = add_image_token(tokenizer)
    text_config = llama_text_config(raw)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    state = convert_state_dict(read_state_dict(folder))
    pad_embedding_rows(state, text_config.vocab_size)
    cells = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        image_seq_length=cells * cells, multimodal_projector_bias=True, pad_token_id=tokenizer.pad_token_id)
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                           attn_implementation=attn_implementation)
    state.update({f"model.vision_tower.{key}": value for key, value in tower.state_dict().items()})
    try:
        model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True,
                              assign=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights of {path!r} do not fit its config.json: {exc}") from None

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    else:
        model.generation_config = GenerationConfig.from_model_config(text_config)
    generation = model.generation_config
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if added_ids:
        generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(added_ids))

    processor = LlavaV1Processor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_V1_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    place_model(model, device)
    model.eval()
    log.info("loaded original-layout LLaVA %s (vision tower %s; %s, %s, %s)", path, tower_source, dtype,
             attn_implementation, device)
    image_token_id = int(config.image_token_id)
    return LoadedLMM(family="llava_original", path=path, model=model, processor=processor,
                     image_token_id=image_token_id,
                     image_layouts=uniform_layouts(image_token_id, (cells, cells)),
                     pad_to_square=raw.get("image_aspect_ratio") == "pad",
                     unpadded_grid_covers="centre_square")
