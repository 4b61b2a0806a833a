"""Placing an LMM over several GPUs (``lmm.gpus``): the device map, the devices a run resolves, and,
where two GPUs exist, a spread model that generates the tokens and captures the rows of one GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages import generate
from stages.config import ConfigError, from_mapping
from stages.devices import (InputDevices, input_devices, no_split_classes, place_model, plan_device_map,
                            pretrained_placement)
from stages.generate import GenerateConfig, LMMConfig, resolve_devices
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.toy.model import build_toy_llava

CAPTIONS = ["A red square sits left of a blue circle.", "Two green triangles, one small dog and a cat."]
GiB = 2 ** 30
TEXT_LAYERS = 8       # enough decoder layers for a balanced map to put some on each of two devices
TWO_GPUS = ["cuda:0", "cuda:1"]
PROMPTS = [f"{LLAVA_V1_SYSTEM} USER: <image>\nDescribe the image in detail. ASSISTANT:",
           "USER: <image>\nDescribe the image. ASSISTANT:"]


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return build_toy_llava(tmp_path_factory.mktemp("toy") / "llava", CAPTIONS, seed=1,
                           text_layers=TEXT_LAYERS, num_key_value_heads=2)


@pytest.fixture(scope="module")
def toy_model(toy_path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(toy_path).eval()


def device_of(device_map: dict, parameter: str):
    """The device ``device_map`` gives ``parameter``: the entry of its longest module prefix."""
    owners = [name for name in device_map
              if name == "" or parameter == name or parameter.startswith(name + ".")]
    return device_map[max(owners, key=len)]


# --- device maps (accelerate's planning runs on any machine: budgets are plain numbers) ------------

def test_device_map_spreads_decoder_layers_whole_and_in_order(toy_model):
    device_map = plan_device_map(toy_model, {0: 100 * GiB, 1: 100 * GiB})
    layers = [device_map[f"model.language_model.layers.{i}"] for i in range(TEXT_LAYERS)]  # one entry each
    assert set(layers) == {0, 1} and layers == sorted(layers)
    assert "LlamaDecoderLayer" in no_split_classes(toy_model)
    placed = {name: device_of(device_map, name) for name, _ in toy_model.named_parameters()}
    assert set(placed.values()) == {0, 1}
    assert placed["model.language_model.embed_tokens.weight"] == 0 and placed["lm_head.weight"] == 1


def test_keep_whole_keeps_a_module_on_one_device(toy_model):
    """With room for half the vision tower (plus the layer accelerate keeps free) on device 0, the
    tower is cut between the devices unless its class is kept whole (DiffLMM's tower)."""
    tower = [name for name, _ in toy_model.named_parameters() if name.startswith("model.vision_tower.")]
    size = sum(p.numel() * p.element_size() for p in toy_model.model.vision_tower.parameters())
    budgets = {0: size // 2 + 200_000, 1: 100 * GiB}
    cut = plan_device_map(toy_model, budgets)
    assert {device_of(cut, name) for name in tower} == {0, 1}
    whole = plan_device_map(toy_model, budgets, keep_whole=[type(toy_model.model.vision_tower).__name__])
    assert len({device_of(whole, name) for name in tower}) == 1


def test_a_model_too_big_for_its_devices_is_a_config_error(toy_model):
    with pytest.raises(ConfigError, match=r"does not fit .* 2 GPUs \(cuda:0, cuda:1\).*raise lmm.gpus"):
        plan_device_map(toy_model, {0: 50_000, 1: 50_000})


@pytest.mark.parametrize("placement", ["from_pretrained", "dispatch"])
def test_a_model_that_does_not_fit_its_gpus_is_refused_on_either_path(toy_path, toy_model, placement,
                                                                      monkeypatch):
    """With 20 kB free per GPU, the stock loaders' ``from_pretrained(device_map="auto")`` offloads the
    whole model to the disk (transformers reads offloaded safetensors in place) and the built models'
    planning would too: both are a ConfigError naming lmm.gpus, not a model silently run from disk."""
    from stages.models.registry import load_lmm

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (20_000, 16 * GiB))
    with pytest.raises(ConfigError, match=r"\['disk'\].*raise lmm.gpus"):
        if placement == "from_pretrained":
            load_lmm("llava", str(toy_path), dtype=torch.float32, attn_implementation="sdpa", device=TWO_GPUS)
        else:
            place_model(toy_model, TWO_GPUS)
    assert not hasattr(toy_model, "hf_device_map")


def test_one_device_is_a_plain_move(toy_model):
    assert pretrained_placement("cpu") == {} and pretrained_placement([torch.device("cpu")]) == {}
    place_model(toy_model, "cpu")
    assert not hasattr(toy_model, "hf_device_map")
    assert input_devices(toy_model) == InputDevices(torch.device("cpu"), torch.device("cpu"))


def test_several_devices_load_with_a_budget_of_exactly_those(monkeypatch):
    free = {0: 7 * GiB, 1: 9 * GiB, 2: 11 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (free[index], 16 * GiB))
    assert pretrained_placement(["cuda:2", "cuda:0"]) == {"device_map": "auto",
                                                          "max_memory": {2: 11 * GiB, 0: 7 * GiB}}


def test_capture_through_accelerate_hooks_gives_the_plain_rows(toy_path, toy_model):
    """A spread model runs behind accelerate's hooks, which wrap every block's forward to move its
    inputs (the mask among them) to the block's device. With the blocks of a two-GPU device map all
    on the CPU, the hooks wrap them but move nothing: the capture's per-step hooks and attention
    function work under them, and tokens and rows equal the model's without hooks."""
    from accelerate import dispatch_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from stages.capture import AttentionCapture, image_token_positions

    hooked = LlavaForConditionalGeneration.from_pretrained(toy_path).eval()
    device_map = plan_device_map(hooked, {0: 100 * GiB, 1: 100 * GiB})
    dispatch_model(hooked, {name: "cpu" for name in device_map}, force_hooks=True,
                   skip_keys=sorted(hooked._skip_keys_device_placement))
    assert hasattr(hooked.model.language_model.layers[TEXT_LAYERS - 1], "_hf_hook")
    processor = AutoProcessor.from_pretrained(toy_path)
    inputs = processor(images=noise_images(2), text=PROMPTS, padding=True, return_tensors="pt")
    positions = image_token_positions(inputs["input_ids"], toy_model.config.image_token_id)
    results = []
    for model in (toy_model, hooked):
        capture = AttentionCapture(model)
        with torch.no_grad(), capture.recording(positions):
            sequences = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        results.append((sequences, capture.rows()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# --- which devices a run uses ---------------------------------------------------------------------

def test_resolve_devices(monkeypatch):
    cpu, cuda = torch.device("cpu"), lambda i: torch.device("cuda", i)
    assert resolve_devices("cpu", 2) == [cpu]
    assert resolve_devices(["cuda:1", "cuda:0"], 1) == [cuda(1), cuda(0)]
    for bad in (["cpu", "cuda:0"], ["cuda:0", "cuda:0"], ["cuda", "cuda:1"], []):
        with pytest.raises(ValueError):
            resolve_devices(bad, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices(None, 2) == [cpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_devices(None, 1) == [cuda(0)] and resolve_devices(None, 3) == [cuda(0), cuda(1), cuda(2)]
    with pytest.raises(ConfigError, match="lmm.gpus is 4 but 3"):
        resolve_devices(None, 4)


@pytest.mark.parametrize("gpus", [0, -1, 1.5, True, "2"])
def test_lmm_gpus_must_be_a_positive_integer(gpus):
    with pytest.raises(ConfigError, match="lmm.gpus"):
        from_mapping(LMMConfig, {"gpus": gpus}, where="lmm")
    assert from_mapping(LMMConfig, {"gpus": 2}, where="lmm").gpus == 2


# --- two GPUs -------------------------------------------------------------------------------------

def needs_two_gpus() -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


def noise_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["from_pretrained", "dispatch"])
def test_two_gpus_give_the_tokens_and_rows_of_one(toy_path, placement):
    """float32: a model spread over two GPUs, by the stock loaders' ``device_map="auto"`` or by the
    built models' ``dispatch_model``, has decoder layers on both and generates the tokens and
    captures the rows of the same model on one GPU (rows to 1e-4)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from stages.capture import AttentionCapture, image_token_positions
    from stages.models.registry import load_lmm

    needs_two_gpus()
    one = load_lmm("llava", str(toy_path), dtype=torch.float32, attn_implementation="sdpa",
                   device="cuda:0").model
    if placement == "from_pretrained":
        two = load_lmm("llava", str(toy_path), dtype=torch.float32, attn_implementation="sdpa",
                       device=TWO_GPUS).model
    else:
        two = LlavaForConditionalGeneration.from_pretrained(toy_path, attn_implementation="sdpa").eval()
        place_model(two, TWO_GPUS)
    layer_devices = [next(layer.parameters()).device for layer in two.model.language_model.layers]
    assert set(layer_devices) == {torch.device("cuda:0"), torch.device("cuda:1")}, layer_devices
    assert input_devices(two).tokens == torch.device("cuda:0")

    processor = AutoProcessor.from_pretrained(toy_path)
    results = []
    for model in (one, two):
        at = input_devices(model)
        inputs = processor(images=noise_images(2), text=PROMPTS, padding=True, return_tensors="pt")
        inputs = inputs.to(at.tokens)
        inputs["pixel_values"] = inputs["pixel_values"].to(at.pixels)
        positions = image_token_positions(inputs["input_ids"], model.config.image_token_id)
        capture = AttentionCapture(model)
        with torch.no_grad(), capture.recording(positions):
            sequences = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        assert capture.rows().device == at.tokens
        results.append((sequences.cpu(), capture.rows().cpu()))
    (one_sequences, one_rows), (two_sequences, two_rows) = results
    assert torch.equal(one_sequences, two_sequences)
    # Peaked, not uniform over the prompt's keys (which any computation would match).
    assert float(one_rows.max()) > 3.0 / inputs["input_ids"].shape[1]
    torch.testing.assert_close(two_rows, one_rows, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_generate_stage_with_lmm_gpus_2(tmp_path, toy_path):
    """The generate stage with lmm.gpus 2 (no device given: cuda:0 and cuda:1) writes the tokens and
    maps of a run on one GPU (the store keeps float16)."""
    from stages.io.attention import open_attention
    from stages.io.tables import read_table, write_table

    needs_two_gpus()
    files = []
    for index, image in enumerate(noise_images(3)):
        files.append(tmp_path / f"{index}.png")
        image.crop((0, 0, 96, 60 + 10 * index)).save(files[-1])
    manifest = tmp_path / "manifest.parquet"
    write_table([{"image_id": str(i), "file": str(f), "width": None, "height": None, "shard": 0,
                  "error": None} for i, f in enumerate(files)], manifest, "manifest")
    outputs = []
    for name, gpus, device in (("one", 1, "cuda:0"), ("two", 2, None)):
        generations, attention = tmp_path / f"{name}.parquet", tmp_path / f"{name}.zarr"
        generate.run(GenerateConfig(max_new_tokens=6, batch_size=2),
                     LMMConfig(path=str(toy_path), gpus=gpus), manifest, 0, generations, attention,
                     device=device)
        outputs.append((read_table(generations, "generations"), open_attention(attention)[:]))
    (one_table, one_maps), (two_table, two_maps) = outputs
    assert one_table["token_ids"].map(list).tolist() == two_table["token_ids"].map(list).tolist()
    assert one_table["error"].isna().all() and one_maps.shape == two_maps.shape and one_maps.size > 0
    np.testing.assert_allclose(two_maps.astype(np.float32), one_maps.astype(np.float32), rtol=0, atol=1e-3)
