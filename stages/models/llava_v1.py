"""What the LLaVA-v1 layout families (``llava_original``, ``difflmm``) share: checkpoint files, the
Vicuna tokenizer with an added image token, the ``llava_v1`` conversation and the release's prompt ids.

The release (LLaVA 1.5, and groundLMM for DiffLMM) never puts an image token in the vocabulary: its
``tokenizer_image_token`` (``llava/mm_utils.py``) splits the prompt at "<image>", tokenises each
chunk alone (each gets its own "<s>" and sentencepiece's leading "▁"), drops the "<s>" of every chunk
but the first and joins the chunks with the sentinel id -200, where the model splices the image
features. llava-hf's ``LlavaForConditionalGeneration`` needs a real id instead, so:

- :func:`add_image_token` adds "<image>" to the tokenizer as a special added token (id = the old
  vocabulary size, 32000 for Vicuna, as llava-hf's conversion does) and :func:`pad_embedding_rows`
  gives the embedding and ``lm_head`` matrices a zero row for it (never read: the image features are
  written over those positions; the loaders also suppress the id in generation);
- :class:`LlavaV1Processor` expands the image into one "<image>" id per feature with
  :func:`encode_release_prompt`, the release's chunk-wise tokenisation, so the text ids are the
  release's whatever the tokenizer's ``legacy`` flag. Tokenising the whole prompt with the image
  tokens inside it (what ``LlavaProcessor`` does) differs when ``legacy`` is false (the published
  Vicuna ``tokenizer_config.json``): transformers 5's ``LlamaTokenizer`` then adds the leading "▁"
  only at the start of the text, so the chunk after the image starts with "\\n" (13) instead of
  "▁", "\\n" (29871, 13).

The ``llava_v1`` conversation (the release's ``conv_llava_v1``, ``SeparatorStyle.TWO``):
``"{system} USER: <image>\\n{question} ASSISTANT:"`` with :data:`LLAVA_V1_SYSTEM` unless a system
message is given (:data:`LLAVA_V1_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import LlavaProcessor

from stages.config import ConfigError
from stages.models.base import model_source
from stages.models.checkpoints import load_weights_only

if TYPE_CHECKING:
    import torch

IMAGE_TOKEN = "<image>"

# CLIP's image normalisation statistics (openai/clip-vit-large-patch14-336's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
LLAVA_ONLY_FIELDS = frozenset({
    "model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length",
})

# Original key prefix -> llava-hf key prefix (the first matching prefix wins).
KEY_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
IGNORED_PREFIX = "model.vision_tower."

# Python modules transformers needs to read a tokenizer shipped only as tokenizer.model -> pip package.
SENTENCEPIECE_MODULES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}


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
        raise ConfigError(f"cannot find checkpoint {path!r} (lmm.path): {exc}") from None


def read_checkpoint_config(path: str) -> tuple[Path, dict[str, Any]]:
    """The local folder of ``path`` (:func:`resolve_checkpoint`) and its ``config.json`` as a dict;
    ConfigError naming ``path`` when it has none."""
    folder = resolve_checkpoint(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path!r} has no config.json")
    return folder, json.loads(config_file.read_text())


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``folder`` (safetensors preferred, else ``.bin``; single file
    or shards listed by the index json), on the CPU in their stored dtypes."""
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
                state.update(load_weights_only(folder / name, what="LLaVA weights", mmap=True))
        return state
    raise ConfigError(f"{folder} holds no model.safetensors, pytorch_model.bin or their *.index.json")


def rename_keys(original: Mapping[str, torch.Tensor], prefixes: Sequence[tuple[str, str]], ignored: str,
                what: str) -> dict[str, torch.Tensor]:
    """``original`` with each key's first matching ``(old, new)`` prefix of ``prefixes`` replaced; keys
    starting with ``ignored`` are dropped; any other key raises ConfigError naming ``what`` (the checkpoint)."""
    converted, unknown = {}, []
    for key, tensor in original.items():
        if key.startswith(ignored):
            continue
        for old, new in prefixes:
            if key.startswith(old):
                converted[new + key[len(old):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unexpected keys in {what}: {unknown[:5]} ({len(unknown)} in all)")
    return converted


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LLaVA-Llama keys -> ``LlavaForConditionalGeneration`` keys (vision tower excluded).

    Keys under ``model.vision_tower.`` are dropped; any other unknown key raises ConfigError.
    """
    return rename_keys(original, KEY_PREFIXES, IGNORED_PREFIX, "a LLaVA-1.5 checkpoint")


def llama_text_config(raw: dict[str, Any]):
    """The ``LlamaConfig`` of a LLaVA-Llama ``config.json`` (its Llama fields; a null ``rope_scaling``,
    as transformers 4.31 wrote it, is left out: it means the default rope)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{key: value for key, value in raw.items()
                          if key not in LLAVA_ONLY_FIELDS and not key.startswith("mm_")
                          and not (key == "rope_scaling" and value is None)})


def load_tokenizer(folder: Path, path: str):
    """The tokenizer of the checkpoint ``folder`` (``AutoTokenizer``; ``path``: the ``lmm.path`` or
    ``lmm.base`` it came from, for messages).

    A folder whose tokenizer is only ``tokenizer.model`` (sentencepiece; the published
    ``liuhaotian/llava-v1.5-*`` and ``lmsys/vicuna-7b-v1.5`` folders) needs the ``sentencepiece`` and
    ``protobuf`` packages: without them ConfigError names ``path`` and the missing packages (rather
    than transformers' fallback error about tiktoken). Any other failure to load is a ConfigError
    naming ``path``.
    """
    from transformers import AutoTokenizer

    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        missing = []
        for module, package in SENTENCEPIECE_MODULES.items():
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(package)
        if missing:
            raise ConfigError(f"the tokenizer of {path!r} is a sentencepiece tokenizer.model only; "
                              f"reading it needs the Python package(s) {', '.join(missing)} (pip install "
                              f"{' '.join(missing)})")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {path!r} ({folder}): {exc}") from None


def add_image_token(tokenizer: Any) -> list[int]:
    """Add "<image>" as a special added token when the tokenizer lacks it; pad = unk when unset (as
    LLaVA's ``llava_v1`` training does). Returns the ids added (empty when "<image>" was there)."""
    from transformers import AddedToken

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return []
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]


def pad_embedding_rows(state: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Extend ``state``'s embedding and lm_head matrices (``model.language_model.embed_tokens.weight``,
    ``lm_head.weight``; (V, hidden)) in place with zero rows to ``vocab_size`` rows."""
    import torch

    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        matrix = state[key]
        if matrix.shape[0] < vocab_size:
            state[key] = torch.cat([matrix, matrix.new_zeros(vocab_size - matrix.shape[0], matrix.shape[1])])


def encode_release_prompt(tokenizer: Any, prompt: str, image_token_id: int, image_tokens: int) -> list[int]:
    """The release's ``tokenizer_image_token`` ids of ``prompt``, with each "<image>" expanded to
    ``image_tokens`` copies of ``image_token_id`` instead of the sentinel -200.

    The prompt is split at "<image>"; each chunk is tokenised alone with the tokenizer's default
    special tokens (Vicuna: "<s>" in front; sentencepiece's leading "▁" at the start of every chunk);
    every chunk after the first loses its first token when that token is "<s>" (the release drops it
    unconditionally once the first chunk starts with "<s>", which every Vicuna chunk does).
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        if chunk and chunk[0] == tokenizer.bos_token_id:
            chunk = chunk[1:]
        ids += [image_token_id] * image_tokens + list(chunk)
    return ids


class LlavaV1Processor(LlavaProcessor):
    """``LlavaProcessor`` whose text ids are the release's (:func:`encode_release_prompt`).

    Built like ``LlavaProcessor`` (image processor, tokenizer with "<image>", ``patch_size``,
    ``vision_feature_select_strategy``, ``num_additional_image_tokens``, the llava_v1 chat template).
    Calling it takes ``images`` (one per text) and ``text`` (one string or a list, one "<image>" each)
    and returns ``input_ids`` / ``attention_mask`` (B, L) int64, padded on the tokenizer's
    ``padding_side`` when ``padding``, and the image processor's ``pixel_values`` (B, 3, H, W).
    Every image becomes (H / patch_size) * (W / patch_size) + num_additional_image_tokens "<image>"
    ids, one fewer for strategy "default" (the CLS feature is dropped), as ``LlavaProcessor`` counts.
    """

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, *, padding: bool = False,
                 return_tensors: str | None = None, **kwargs: Any):
        from transformers import BatchFeature

        if kwargs:
            raise TypeError("LlavaV1Processor takes images, text, padding and return_tensors; "
                            f"got {sorted(kwargs)}")
        texts = [text] if isinstance(text, str) else list(text or [])
        image_inputs = self.image_processor(images, return_tensors="pt")
        if [t.count(IMAGE_TOKEN) for t in texts] != [1] * len(image_inputs["pixel_values"]):
            raise ValueError(f"LlavaV1Processor needs one {IMAGE_TOKEN!r} per text and one image per text; "
                             f"got {[t.count(IMAGE_TOKEN) for t in texts]} placeholders for "
                             f"{len(image_inputs['pixel_values'])} images")
        height, width = image_inputs["pixel_values"].shape[-2:]
        image_tokens = ((height // self.patch_size) * (width // self.patch_size)
                        + self.num_additional_image_tokens)
        if self.vision_feature_select_strategy == "default":
            image_tokens -= 1
        ids = [encode_release_prompt(self.tokenizer, t, self.image_token_id, image_tokens) for t in texts]
        text_inputs = self.tokenizer.pad({"input_ids": ids}, padding=padding, return_attention_mask=True)
        return BatchFeature(data={**text_inputs, "pixel_values": image_inputs["pixel_values"]},
                            tensor_type=return_tensors)
