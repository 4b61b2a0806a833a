"""The llava family (llava-hf layout, e.g. llava-hf/llava-1.5-7b-hf) with the real Vicuna tokenizer: the
prompt it renders for the release's llava_v1 conversation, with and without the system line, and its
ids, which are the llava-hf processor's own for that conversation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from real_tokenizers import write_vicuna_tokenizer
from test_llava_original import IMAGE_TOKEN_INDEX, sentencepiece_image_token, sentinel_ids

from stages.generate import build_prompt
from stages.models.llava_v1 import CLIP_MEAN, CLIP_STD, LLAVA_V1_SYSTEM
from stages.models.registry import load_lmm
from stages.toy.model import LLAVA_15_CHAT_TEMPLATE

IMAGE_SIZE, PATCH = 32, 8             # a 4 x 4 grid = 16 image tokens
QUESTION = "Describe the image in detail."


def write_llava_hf_checkpoint(folder, legacy: bool) -> None:
    """llava-hf/llava-1.5-7b-hf's layout with tiny random weights: the Vicuna tokenizer with "<image>"
    (32000) and "<pad>" (32001) added, a vocabulary padded to 32064 rows, the llava-hf processor
    (CLIP preprocessing, patch_size, one CLS feature dropped) and chat template."""
    from transformers import (AddedToken, AutoTokenizer, CLIPImageProcessor, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    write_vicuna_tokenizer(folder, legacy=legacy, sentencepiece_only=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_15_CHAT_TEMPLATE, image_token="<image>").save_pretrained(folder)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_SIZE,
                       "patch_size": PATCH, "projection_dim": 16},
        text_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32064},
        image_token_index=32000, pad_token_id=32001, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_llava_family_renders_the_llava_v1_conversation_and_ids_are_llava_hfs(tmp_path, legacy):
    from transformers import AutoProcessor

    write_llava_hf_checkpoint(tmp_path, legacy)
    lmm = load_lmm("llava", str(tmp_path), dtype=torch.float32, attn_implementation="sdpa",
                   device=torch.device("cpu"))
    llava_hf = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (10, 200, 30))
    conversation = f"USER: <image>\n{QUESTION} ASSISTANT:"
    # No system line by default (llava-hf's model card); generate.system_prompt = the llava_v1 line gives
    # exactly the release's llava_v1 conversation.
    for system, expected in ((None, conversation), (LLAVA_V1_SYSTEM, f"{LLAVA_V1_SYSTEM} {conversation}")):
        prompt = build_prompt(lmm.processor, QUESTION, system)
        assert prompt == expected
        ids = lmm.processor(images=[image], text=[prompt])["input_ids"][0]
        assert ids == llava_hf(images=[image], text=[expected])["input_ids"][0]
        assert ids.count(lmm.image_token_id) == (IMAGE_SIZE // PATCH) ** 2
        # Compared with the release's ids for the same conversation: equal with a legacy tokenizer; with
        # a non-legacy one transformers 5 drops the "▁" (29871) after the image, as llava-hf's processor
        # tokenises the whole prompt (the llava_original family does not: see test_llava_original).
        release = sentencepiece_image_token(expected)
        image_at = release.index(IMAGE_TOKEN_INDEX)
        assert release[image_at + 1:image_at + 3] == [29871, 13]
        ours = sentinel_ids(ids, lmm.image_token_id)
        assert ours == (release if legacy else release[:image_at + 1] + release[image_at + 2:])
