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
- image token: the release splices the sentinel id -200 (``IMAGE_TOKEN_INDEX``) into the prompt ids
  and never puts an image token in the vocabulary. llava-hf needs a real id, so "<image>" is added
  to the tokenizer as a special added token when absent (id = the old vocabulary size, 32000 for
  Vicuna, as llava-hf's conversion does). The embedding and ``lm_head`` matrices gain one zero row
  per added id (the embedding row is never read: the model writes the image features over those
  positions), and the added ids go into ``generation_config.suppress_tokens``, so the logits of the
  original 32000 tokens and greedy decoding are exactly the release's;
- processor: ``LlavaProcessor`` = ``CLIPImageProcessor`` of ``mm_vision_tower`` + the tokenizer
  (pad token = unk when the tokenizer has none, as LLaVA's ``llava_v1`` training does) + the
  ``llava_v1`` chat template (:data:`LLAVA_V1_CHAT_TEMPLATE`); it expands "<image>" to one token per
  patch ((image_size / patch_size)**2 = 576 for CLIP ViT-L/14-336).

``image_aspect_ratio`` "pad" (expand2square with the image mean colour, every LLaVA-1.5 release) is
``LoadedLMM.pad_to_square``, applied by the generate stage (``generate.pad_to_square: auto``), not
by the processor; any other value (or none: the release's default) means no padding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.config import ConfigError
from stages.devices import place_model
from stages.models.registry import Devices, LoadedLMM, model_source, uniform_layouts

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# The release's conv_llava_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"): the system line (the given
# system message, else LLAVA_V1_SYSTEM), then per turn " USER: {text}" / " ASSISTANT: {text}</s>",
# images first in a turn as "<image>\n"; the generation prompt is " ASSISTANT:".
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
LLAVA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- ' ' + message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)

# Fields of a LLaVA-Llama config.json that are not Llama fields (besides every "mm_*" field).
_LLAVA_ONLY_FIELDS = frozenset({
    "model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length",
})

# Original key prefix -> llava-hf key prefix (the first matching prefix wins).
_KEY_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
_IGNORED_PREFIX = "model.vision_tower."


def resolve_checkpoint(path: str) -> Path:
    """The local folder of ``path``: the folder itself, or the hub snapshot of a hub id.

    Hub ids go through ``huggingface_hub.snapshot_download`` (config, weights, tokenizer files
    only), which honours ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (offline: the cached snapshot of
    ``refs/main``). Raises ConfigError naming ``path`` when neither exists.
    """
    source = model_source(path)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot find LLaVA checkpoint {path!r} (lmm.path): {exc}") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``folder`` (safetensors preferred, else ``.bin``; single file
    or shards listed by the index json), on the CPU in their stored dtypes."""
    import torch
    from safetensors.torch import load_file

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".safetensors"):
                state.update(load_file(folder / name))
            else:
                state.update(torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True))
        return state
    raise ConfigError(f"{folder} holds no model.safetensors, pytorch_model.bin or their *.index.json")


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LLaVA-Llama keys -> ``LlavaForConditionalGeneration`` keys (vision tower excluded).

    Keys under ``model.vision_tower.`` are dropped; any other unknown key raises ConfigError.
    """
    converted, unknown = {}, []
    for key, tensor in original.items():
        if key.startswith(_IGNORED_PREFIX):
            continue
        for old, new in _KEY_PREFIXES:
            if key.startswith(old):
                converted[new + key[len(old):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unexpected keys in a LLaVA-1.5 checkpoint: {unknown[:5]} ({len(unknown)} in all)")
    return converted


def _text_config(raw: dict[str, Any]):
    """The ``LlamaConfig`` of a LLaVA-Llama ``config.json`` (its Llama fields; a null ``rope_scaling``,
    as transformers 4.31 wrote it, is left out: it means the default rope)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{key: value for key, value in raw.items()
                          if key not in _LLAVA_ONLY_FIELDS and not key.startswith("mm_")
                          and not (key == "rope_scaling" and value is None)})


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


def _add_image_token(tokenizer: Any) -> list[int]:
    """Add "<image>" as a special added token when the tokenizer lacks it; pad = unk when unset.
    Returns the ids added (empty when "<image>" was already there)."""
    from transformers import AddedToken

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return []
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]


def _pad_rows(state: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Extend the embedding and lm_head matrices (V, hidden) with zero rows to ``vocab_size`` rows."""
    import torch

    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        matrix = state[key]
        if matrix.shape[0] < vocab_size:
            state[key] = torch.cat([matrix, matrix.new_zeros(vocab_size - matrix.shape[0], matrix.shape[1])])


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
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, GenerationConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.initialization import no_init_weights

    folder = resolve_checkpoint(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path!r} has no config.json")
    raw = json.loads(config_file.read_text())
    _check_mm_fields(raw, path)
    tower_source = raw["mm_vision_tower"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = CLIPImageProcessor.from_pretrained(tower_source)
        tower = CLIPVisionModel.from_pretrained(tower_source, dtype=dtype,
                                                attn_implementation=attn_implementation)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of {path!r} or its vision tower {tower_source!r}: "
                          f"{exc}") from None
    vision_config = tower.config
    if vision_config.hidden_size != raw.get("mm_hidden_size", vision_config.hidden_size):
        raise ConfigError(f"{path!r}: mm_hidden_size {raw['mm_hidden_size']} != hidden size "
                          f"{vision_config.hidden_size} of the vision tower {tower_source!r}")

    added_ids = _add_image_token(tokenizer)
    text_config = _text_config(raw)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    state = convert_state_dict(read_state_dict(folder))
    _pad_rows(state, text_config.vocab_size)
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

    processor = LlavaProcessor(
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
