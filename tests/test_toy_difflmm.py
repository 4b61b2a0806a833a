"""The toy DiffLMM (stages/toy/difflmm.py): its SD pretraining writes SD-1.5's folder layout, its builder
and trainer write the self-contained difflmm layout, which loads through the registry (family difflmm)
and runs through the generate stage with attention capture on toy images; training sequences carry
the prompt ids the pipeline gives the model; the trained model is the loop's, reloaded exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages import generate
from stages.generate import GenerateConfig, LMMConfig, build_prompt
from stages.io.attention import open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.registry import load_lmm
from stages.toy import difflmm
from stages.toy.train_lmm import TrainLmmConfig, encode_example
from stages.toy.world import make_example

SD = difflmm.ToySdConfig(num_train_images=8, vae_steps=2, unet_steps=2, batch_size=4)
LMM = TrainLmmConfig(num_train_images=8, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return difflmm.pretrain_toy_sd(tmp_path_factory.mktemp("sd") / "toy-sd", SD)


@pytest.fixture(scope="module")
def trained(sd_folder, tmp_path_factory):
    return difflmm.train_toy_difflmm(tmp_path_factory.mktemp("lmm") / "toy-difflmm", sd_folder, LMM)


def test_sd_folder_has_sd15_layout(sd_folder):
    names = {path.name for path in sd_folder.iterdir()}
    assert names == {"vae", "unet", "scheduler", "text_encoder", "tokenizer", "model_index.json"}
    vae = json.loads((sd_folder / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4 and vae["scaling_factor"] != 0.18215   # factor 8, fitted


def test_trained_folder_is_the_self_contained_difflmm_layout(trained):
    names = {path.name for path in trained.iterdir()}
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin",
            "sd", "clip", "language_model"} <= names
    config = json.loads((trained / "config.json").read_text())
    assert config["mm_vision_tower"] == "sd" and config["mm_vision_sd_clip"] == "clip"
    assert config["mm_projector_type"] == "SDCLIPBlock" and config["mm_vision_sd_pe"] == 64
    adapter = json.loads((trained / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "language_model"
    from safetensors.torch import load_file

    lora = load_file(trained / "adapter_model.safetensors")
    assert all(not value.any() for key, value in lora.items() if "lora_B" in key)     # a zero adapter


def test_loads_through_registry_and_generate_captures_attention(trained, tmp_path):
    loaded = load_lmm("difflmm", str(trained), dtype=torch.float32, attn_implementation="sdpa",
                      device=torch.device("cpu"))
    assert loaded.image_layouts is not None
    rows = []
    for k in range(2):
        example = make_example(0, "test", k, (96, 104))
        Image.fromarray(example.pixels).save(tmp_path / f"img{k}.png")
        rows.append({"image_id": f"img{k}", "file": str(tmp_path / f"img{k}.png"),
                     "width": example.pixels.shape[1], "height": example.pixels.shape[0], "shard": 0,
                     "error": None})
    write_table(rows, tmp_path / "manifest.parquet", "manifest")
    generations, attention = tmp_path / "gen.parquet", tmp_path / "attn.zarr"
    generate.run(GenerateConfig(max_new_tokens=4, batch_size=2), LMMConfig(family="difflmm", path=str(trained)),
                 tmp_path / "manifest.parquet", 0, generations, attention, device="cpu")
    table = read_table(generations, "generations")
    assert table["error"].isna().all() and (table["num_tokens"] > 0).all()
    assert (table["grid_h"] == 8).all() and (table["grid_w"] == 8).all()
    values = read_rows(open_attention(attention), 0, int(table["num_tokens"].sum()), (8, 8))
    assert np.isfinite(values).all() and (values >= 0).all()


def test_training_prompt_ids_are_the_pipelines(trained):
    loaded = load_lmm("difflmm", str(trained), dtype=torch.float32, attn_implementation="sdpa",
                      device=torch.device("cpu"))
    processor = loaded.processor
    question, caption = "Describe the image in detail.", make_example(0, "train", 0, (96, 104)).caption
    ids, labels = encode_example(processor, question, caption)
    image = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))
    prompt_ids = processor(images=[image], text=[build_prompt(processor, question, None)])["input_ids"][0]
    assert ids[:len(prompt_ids)] == list(prompt_ids)
    assert all(label == -100 for label in labels[:len(prompt_ids)])
    assert ids.count(loaded.image_token_id) == 64
    assert processor.tokenizer.decode(ids[len(prompt_ids):-1]).strip() == caption


def test_frozen_sd_is_written_unchanged(trained, sd_folder):
    for part in ("vae", "unet"):
        for path in (sd_folder / part).iterdir():
            assert (trained / "sd" / part / path.name).read_bytes() == path.read_bytes()


def test_true_caption_diagnostic_reads_a_toy_difflmm(trained):
    """The diagnostics' teacher-forced attention runs on the difflmm family too (its loader, its release
    prompt ids, its language model switched to eager) and scores every object of the captions."""
    from stages.toy.diagnostics import true_caption_point_accuracy

    result = true_caption_point_accuracy(trained, split="train", num_images=2)   # words of its vocabulary
    objects = sum(len(make_example(0, "train", k, (96, 104)).scene.objects) for k in range(2))
    assert result["unscored_captions"] == 0 and result["phrases"] == objects
    assert 0.0 <= result["object_point_accuracy"] <= result["point_accuracy"] <= 1.0
