"""The difflmm family: tiny SD-1.5, CLIP, Vicuna (tiny weights, the real tokenizer) and a DiffLMM LoRA
checkpoint in the published layouts, fabricated into a fake Hugging Face cache, loaded through the
registry by the LoRA's hub id, checked against an independent reimplementation of DiffLMM
(docs/method.md, section 6) and the release's SDCLIPBlock (full diffusers UNet forward hooked at
up-block 1, DDIMScheduler.add_noise, LoRA merged by hand W + alpha/r * B @ A) and the release's prompt
ids, then run through the generate stage with attention capture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from difflmm_hub import (
    BASE_ID,
    CLIP_HIDDEN,
    CLIP_ID,
    CLIP_SIDE,
    GRID,
    LORA_ALPHA,
    LORA_ID,
    LORA_R,
    QUESTION,
    RESOLUTION,
    SD_CHANNELS,
    SD_ID,
    TARGETS,
    TIMESTEP,
    fabricate_difflmm_hub,
)
from fake_hub import use_offline_cache
from PIL import Image
from test_llava_original import (
    RELEASE_IDS_AROUND_THE_IMAGE,
    llama_fields,
    sentencepiece_image_token,
    sentinel_ids,
    tokenizer_image_token,
)

from stages import generate
from stages.capture import eager_reference_rows, image_token_positions
from stages.config import ConfigError
from stages.generate import GenerateConfig, LMMConfig, build_prompt
from stages.io.attention import open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.difflmm import NOISE_SEED
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.models.registry import load_lmm


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(cache, {repo id: snapshot folder}) holding SD, CLIP, Vicuna and the DiffLMM LoRA."""
    cache = tmp_path_factory.mktemp("hub")
    return cache, fabricate_difflmm_hub(cache)


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    use_offline_cache(monkeypatch, hub_cache[0])
    return hub_cache[1]


@pytest.fixture
def loaded(offline_hub):
    return load_lmm("difflmm", LORA_ID, dtype=torch.float32, attn_implementation="sdpa",
                    device=torch.device("cpu"))


class ReferenceDiffLMM:
    """DiffLMM (docs/method.md, section 6) with the release's SDCLIPBlock, from the published layouts."""

    def __init__(self, folders):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        sd = folders[SD_ID]
        self.vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
        self.unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
        self.scheduler = DDIMScheduler.from_pretrained(sd / "scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
        ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            text = CLIPTextModel.from_pretrained(sd / "text_encoder")(ids).last_hidden_state
        self.null = text.mean(1, keepdim=True)
        self.clip = CLIPVisionModel.from_pretrained(folders[CLIP_ID]).eval()
        raw = torch.load(folders[LORA_ID] / "non_lora_trainables.bin", weights_only=True)
        self.p = {key.removeprefix("base_model.model.model.mm_projector."): value
                  for key, value in raw.items()}
        vocab_size = json.loads((folders[LORA_ID] / "config.json").read_text())["vocab_size"]
        self.vocab_size = vocab_size
        self.llm = LlamaForCausalLM.from_pretrained(folders[BASE_ID],
                                                    config=LlamaConfig(**llama_fields(vocab_size)),
                                                    attn_implementation="eager").eval()
        adapter = load_file(folders[LORA_ID] / "adapter_model.safetensors")
        merged = 0
        with torch.no_grad():
            for name, module in self.llm.named_modules():
                key = f"base_model.model.{name}"
                if f"{key}.lora_A.weight" in adapter:
                    a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
                    module.weight += LORA_ALPHA / LORA_R * b @ a
                    merged += 1
        assert merged == len(TARGETS) * llama_fields(0)["num_hidden_layers"]

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, 3, R, R) -> (N, hidden)."""
        gelu, norm = torch.nn.functional.gelu, torch.nn.functional.layer_norm
        p = self.p
        small = torch.nn.functional.interpolate(pixel_values, size=(CLIP_SIDE, CLIP_SIDE), mode="bilinear")
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        clip_input = ((small * 0.5 + 0.5) - mean) / std
        clip = self.clip(clip_input, output_hidden_states=True).hidden_states[-2][:, 1:]
        caption = (gelu(clip @ p["clip_projector.0.weight"].T + p["clip_projector.0.bias"])
                   @ p["clip_projector.2.weight"].T + p["clip_projector.2.bias"] + p["clip_pe"] + self.null)
        posterior = self.vae.encode(pixel_values).latent_dist
        generator = torch.Generator().manual_seed(NOISE_SEED)
        eps = torch.randn(posterior.mean.shape[1:], generator=generator)[None]
        noise = torch.randn(posterior.mean.shape[1:], generator=generator)[None]
        latents = (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor
        noisy = self.scheduler.add_noise(latents, noise, torch.tensor([TIMESTEP]))
        captured = []
        hook = self.unet.up_blocks[1].register_forward_hook(lambda module, args, out: captured.append(out))
        self.unet(noisy, TIMESTEP, encoder_hidden_states=caption)
        hook.remove()
        sd = captured[0].permute(0, 2, 3, 1).reshape(1, GRID * GRID, SD_CHANNELS)
        sd_normed = norm(sd, (SD_CHANNELS,), p["sd_norm_layer.weight"], p["sd_norm_layer.bias"])
        clip_normed = norm(clip, (CLIP_HIDDEN,), p["clip_norm_layer.weight"], p["clip_norm_layer.bias"])
        joined = torch.cat([sd_normed, clip_normed], -1)
        joined = joined + p["vt_pe"]
        return (gelu(joined @ p["linear.0.weight"].T + p["linear.0.bias"]) @ p["linear.2.weight"].T
                + p["linear.2.bias"])[0]

    @torch.no_grad()
    def logits(self, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        cut = ids.index(-200)
        embed = self.llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), self.image_tokens(pixel_values),
                            embed(torch.tensor(ids[cut + 1:]))])
        return self.llm(inputs_embeds=embeds[None]).logits[0]


def noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_loaded_model_layout(loaded):
    model = loaded.model
    assert loaded.family == "difflmm" and loaded.pad_to_square    # config.json: image_aspect_ratio "pad"
    ids = torch.tensor([[5, *[loaded.image_token_id] * (GRID * GRID), 6]])
    [layout] = loaded.image_layouts({"input_ids": ids})
    assert layout.grid == (GRID, GRID) and layout.positions.tolist() == list(range(1, GRID * GRID + 1))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "DiffusionVisionTower"
    assert model.generation_config.suppress_tokens == [loaded.image_token_id]
    assert build_prompt(loaded.processor, QUESTION, None) == \
        f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"


def test_logits_equal_the_reference_reimplementation(loaded, offline_hub):
    processor = loaded.processor
    prompt = build_prompt(processor, QUESTION, None)
    inputs = processor(images=[noise_image(0)], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(loaded.image_token_id) == GRID * GRID
    # The release's prompt ids (its tokenizer_image_token), with the published non-legacy tokenizer.
    release_ids = sentinel_ids(ids, loaded.image_token_id)
    assert release_ids == tokenizer_image_token(processor.tokenizer, prompt)
    assert release_ids == sentencepiece_image_token(prompt)
    around = release_ids.index(-200)
    assert release_ids[around - 4:around + 3] == RELEASE_IDS_AROUND_THE_IMAGE

    reference = ReferenceDiffLMM(offline_hub)
    expected = reference.logits(release_ids, inputs["pixel_values"])
    with torch.no_grad():
        actual = loaded.model(**inputs).logits[0]
    torch.testing.assert_close(actual[:, :reference.vocab_size], expected, rtol=1e-4, atol=1e-4)
    assert expected[-1].std() > 0.5


def test_image_features_do_not_depend_on_the_batch(loaded):
    processor, model = loaded.processor, loaded.model
    pixels = processor.image_processor([noise_image(1), noise_image(2)], return_tensors="pt").pixel_values
    with torch.no_grad():
        pair = model.model.vision_tower(pixels).last_hidden_state
        alone = model.model.vision_tower(pixels[1:]).last_hidden_state
    assert pair.shape == (2, GRID * GRID, SD_CHANNELS + CLIP_HIDDEN)
    torch.testing.assert_close(pair[1:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pair[0], pair[1])


def test_generate_stage_runs_with_capture(offline_hub, tmp_path):
    rows = []
    for k in range(2):
        noise_image(10 + k).save(tmp_path / f"img{k}.png")
        rows.append({"image_id": f"img{k}", "file": str(tmp_path / f"img{k}.png"), "width": RESOLUTION,
                     "height": RESOLUTION, "shard": 0, "error": None})
    write_table(rows, tmp_path / "manifest.parquet", "manifest")
    generations, attention = tmp_path / "gen.parquet", tmp_path / "attn.zarr"
    generate.run(GenerateConfig(max_new_tokens=4, batch_size=2), LMMConfig(family="difflmm", path=LORA_ID),
                 tmp_path / "manifest.parquet", 0, generations, attention, device="cpu")
    table = read_table(generations, "generations")
    store = open_attention(attention)
    assert table["error"].isna().all() and (table["num_tokens"] > 0).all()
    assert (table["grid_h"] == GRID).all() and (table["grid_w"] == GRID).all()
    assert store.shape == (int(table["num_tokens"].sum()) * GRID * GRID,)
    values = read_rows(store, 0, int(table["num_tokens"].sum()), (GRID, GRID))
    assert (values >= 0).all() and (values.reshape(len(values), -1).sum(axis=1) <= 1 + 1e-2).all()

    # The stored rows are the eager output_attentions rows of the same model (the release's way).
    eager = load_lmm("difflmm", LORA_ID, dtype=torch.float32, attn_implementation="eager",
                     device=torch.device("cpu"))
    prompt = build_prompt(eager.processor, QUESTION, None)
    images = [Image.open(tmp_path / f"{image_id}.png").convert("RGB") for image_id in table["image_id"]]
    inputs = eager.processor(images=images, text=[prompt] * 2, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=4, output_attentions=True,
                                   return_dict_in_generate=True)
    positions = image_token_positions(inputs["input_ids"], eager.image_token_id)
    expected = eager_reference_rows(out.attentions, positions)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    for b, row in enumerate(table.itertuples()):
        assert list(row.token_ids) == generated[b, :row.num_tokens].tolist()
        stored = read_rows(store, row.attention_offset, row.num_tokens, (GRID, GRID))
        np.testing.assert_allclose(stored, expected[b, :row.num_tokens].reshape(-1, GRID, GRID).numpy(),
                                   rtol=1e-2, atol=1e-4)
    assert float(values.max()) > 3.0 / inputs["input_ids"].shape[1]      # peaked, not uniform


def test_wrong_projector_type_is_a_config_error(offline_hub, tmp_path):
    local = tmp_path / "lora"
    local.mkdir()
    for item in offline_hub[LORA_ID].iterdir():
        (local / item.name).write_bytes(item.read_bytes())
    config = json.loads((local / "config.json").read_text())
    config["mm_projector_type"] = "mlp2x_gelu"
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="SDCLIPBlock"):
        load_lmm("difflmm", str(local), dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))


def test_base_model_can_be_named_like_the_release_model_base(offline_hub, tmp_path, loaded):
    """lmm.base (the release's --model-base) overrides adapter_config's base; a missing one is named."""
    local = tmp_path / "lora"
    local.mkdir()
    for item in offline_hub[LORA_ID].iterdir():
        (local / item.name).write_bytes(item.read_bytes())
    adapter = json.loads((local / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = None
    (local / "adapter_config.json").write_text(json.dumps(adapter))
    with pytest.raises(ConfigError, match="set lmm.base"):
        load_lmm("difflmm", str(local), dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))
    named = load_lmm("difflmm", str(local), dtype=torch.float32, attn_implementation="sdpa",
                     device=torch.device("cpu"), base=BASE_ID)
    reference = loaded.model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in named.model.state_dict().items())


def test_base_is_refused_for_full_checkpoints():
    with pytest.raises(ConfigError, match="lmm.base"):
        load_lmm("llava", "results/models/toy-llava", dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"), base=BASE_ID)
