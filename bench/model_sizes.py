"""Parameter counts and fp16/bf16 weight memory of the supported real checkpoints, without weights.

Each model is instantiated on the meta device (no memory, no download) from the size fields of its
published ``config.json`` (copied below: the hub is not reachable from every machine), with the
stock transformers class the loaders use; weights = parameters x 2 bytes (float16 / bfloat16).

    python bench/model_sizes.py
"""

from __future__ import annotations

import torch

CLIP_L_336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064}
LLAMA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
             "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064}
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064}
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128320}


def qwen(hidden, intermediate, layers, heads, kv_heads, vocab, tied):
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                              "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}}


INTERNVIT_300M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm"}
INTERNVIT_6B = {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25, "intermediate_size": 12800,
                "attention_bias": False, "use_qk_norm": True, "norm_type": "rms_norm"}


def internvl(vision: dict, text: dict) -> dict:
    """An InternVL2.5 checkpoint's sizes: its vision_config and llm_config (InternLM2 counted as the Llama
    model the internvl2_5 loader converts it into)."""
    return {"vision_config": vision, "text_config": {**text, "tie_word_embeddings": False}}


MODELS = {
    "llava-hf/llava-1.5-7b-hf": ("llava", LLAMA_7B),
    "llava-hf/llava-1.5-13b-hf": ("llava", LLAMA_13B),
    "llava-hf/llava-v1.6-mistral-7b-hf": ("llava_next", MISTRAL_7B),
    "llava-hf/llava-v1.6-vicuna-7b-hf": ("llava_next", LLAMA_7B),
    "llava-hf/llava-v1.6-vicuna-13b-hf": ("llava_next", LLAMA_13B),
    "llava-hf/llama3-llava-next-8b-hf": ("llava_next", LLAMA3_8B),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen", qwen(2048, 11008, 36, 16, 2, 151936, True)),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen", qwen(3584, 18944, 28, 28, 4, 152064, False)),
    "Qwen/Qwen2.5-VL-72B-Instruct": ("qwen", qwen(8192, 29568, 80, 64, 8, 152064, False)),
    "OpenGVLab/InternVL2_5-1B": ("internvl", internvl(INTERNVIT_300M, {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151674})),
    "OpenGVLab/InternVL2_5-8B": ("internvl", internvl(INTERNVIT_300M, {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92553})),
    "OpenGVLab/InternVL2_5-26B": ("internvl", internvl(INTERNVIT_6B, {
        "model_type": "llama", "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 48,
        "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": 92553})),
    "OpenGVLab/InternVL2_5-78B": ("internvl", internvl(INTERNVIT_6B, {
        "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 151674})),
}


def build(kind: str, text: dict):
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )
    from transformers.models.auto import CONFIG_MAPPING

    if kind == "qwen":
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text))
    if kind == "internvl":
        language = dict(text["text_config"])
        return InternVLForConditionalGeneration(InternVLConfig(
            vision_config=InternVLVisionConfig(**text["vision_config"]),
            text_config=CONFIG_MAPPING[language.pop("model_type")](**language), tie_word_embeddings=False))
    text = dict(text)
    text_config = CONFIG_MAPPING[text.pop("model_type")](**text)
    common = {"vision_config": CLIPVisionConfig(**CLIP_L_336), "text_config": text_config,
              "image_token_index": 32000, "vision_feature_layer": -2, "tie_word_embeddings": False}
    if kind == "llava":
        return LlavaForConditionalGeneration(LlavaConfig(**common))
    return LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS))


def main() -> None:
    for name, (kind, text) in MODELS.items():
        with torch.device("meta"):
            model = build(kind, text)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:40s} {params / 1e9:7.3f} B params  {params * 2 / 2**30:6.1f} GiB fp16/bf16")


if __name__ == "__main__":
    main()
