"""The embedded toy LMM: deterministic, stock llava-hf layout, exact tokenizer round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.toy import model as toy_model
from stages.toy.model import SPECIAL_TOKENS, build_toy_llava

CAPTIONS = ["A red square sits left of a blue circle.",
            "Two green triangles, one small dog's ball\nand a cat."]


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return build_toy_llava(tmp_path_factory.mktemp("toy") / "llava", CAPTIONS, seed=0)


def test_same_seed_gives_identical_files_and_another_seed_other_weights(toy_path, tmp_path):
    again = build_toy_llava(tmp_path / "again", CAPTIONS, seed=0)
    other = build_toy_llava(tmp_path / "other", CAPTIONS, seed=1)
    names = sorted(p.name for p in toy_path.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(names)
    for name in names:
        assert (toy_path / name).read_bytes() == (again / name).read_bytes(), name
    assert (toy_path / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (toy_path / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_loads_with_stock_classes_and_generates(toy_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(toy_path)
    model = LlavaForConditionalGeneration.from_pretrained(toy_path).eval()
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.text_config.model_type == "llama"
    assert model.config.vision_config.model_type == "clip_vision_model"
    special = [processor.tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))]
    assert special == list(SPECIAL_TOKENS)

    prompt = processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": LLAVA_V1_SYSTEM}]},
         {"role": "user",
          "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}],
        add_generation_prompt=True)
    assert prompt == f"{LLAVA_V1_SYSTEM} USER: <image>\nDescribe the image in detail. ASSISTANT:"
    image = Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144   # 12 x 12 grid
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tokenizer_round_trips_captions(toy_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    for caption in CAPTIONS:
        ids = tokenizer.encode(caption, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == caption
    assert tokenizer.encode("zebra", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_command_line_trains_on_the_caption_file(tmp_path):
    captions = tmp_path / "val_gcg_coco_caption_gt.json"
    captions.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "caption": "A purple zebra.", "labels": ["zebra"]}]}))
    toy_model.main(["--out", str(tmp_path / "model"), "--corpus-json", str(captions),
                    "--question", "Why so?"])
    vocabulary = json.loads((tmp_path / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"▁A", "A", "▁purple", "▁zebra", "▁Why", "Why", "▁so", "?"} <= set(vocabulary)
