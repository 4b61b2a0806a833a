"""The llava_next family: tiny LLaVA-NeXT checkpoints fabricated under the real llava-hf hub ids, in
the published on-disk layout (config.json with the real field names, sharded safetensors with the
published key names + model.safetensors.index.json, tokenizer files, preprocessor_config.json,
processor_config.json, chat_template.json, generation_config.json), read from a fake hub cache with
HF_HUB_OFFLINE=1 and loaded through the registry as a user would.

The grid mapping is checked with planted features: the projector's output is replaced by vectors
that encode (tile, patch row, patch column) of their own vision feature, the model's own packing
(``pack_image_features``: base image, unpadding, newline features) places them in the sequence,
and every ``ImageLayout`` cell must carry the feature of that cell, for both grids. The canvas
pixels the processor produced tell where the image lies; the high-resolution grid must cover it.
Captured rows of the generate stage on non-square images must equal eager ``output_attentions``
rows.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from fake_hub import save_shards, snapshot, use_offline_cache
from real_tokenizers import write_llama3_tokenizer, write_mistral_tokenizer, write_vicuna_tokenizer

from stages import generate
from stages.capture import eager_reference_rows
from stages.config import ConfigError
from stages.generate import GenerateConfig, LMMConfig, build_prompt
from stages.io.attention import attention_attrs, open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.llava_next import anyres_layouts
from stages.models.registry import LMM_FAMILIES, load_lmm

IMAGE_SIZE, PATCH = 32, 4                     # CLIP tile 32 px, 4 px patches: an 8 x 8 grid per tile
SIDE = IMAGE_SIZE // PATCH
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]   # the published ones (336 px) / 10.5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION = "Describe the image in detail."
# Non-square test images (H, W) and their unpadded high-resolution grids (rows, columns):
# 50 x 90 -> canvas 64 x 64 (2 x 2 tiles, 16 x 16 cells), 8 padded rows cut -> 8 x 16;
# 90 x 40 -> canvas 96 x 32 (3 x 1 tiles, 24 x 8 cells), 6 padded rows cut -> 18 x 8.
IMAGES = {"wide": ((50, 90), (8, 16)), "tall": ((90, 40), (18, 8))}

MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
    "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] "
    "| selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
@dataclasses.dataclass(frozen=True)
class Release:
    """What differs between the three published checkpoints (the tiny versions)."""

    text_model: str             # text_config.model_type
    architecture: str           # text_config.architectures[0]
    tokenizer: str              # the real one: "mistral", "vicuna" (both Llama-2 format) or "llama3"
    template: str
    prompt: str                 # build_prompt(processor, QUESTION, None)
    prompt_head: tuple[int, ...]  # its first ids: <s> ▁[ INST ] / <s> ▁US ER : / Llama 3's user header
    kv_heads: int
    shards: int


RELEASES = {
    "llava-hf/llava-v1.6-mistral-7b-hf": Release(
        "mistral", "MistralForCausalLM", "mistral", MISTRAL_TEMPLATE, f"[INST] <image>\n{QUESTION} [/INST]",
        (1, 733, 16289, 28793), kv_heads=2, shards=4),
    "llava-hf/llava-v1.6-vicuna-7b-hf": Release(
        "llama", "LlamaForCausalLM", "vicuna", VICUNA_TEMPLATE, f"USER: <image>\n{QUESTION} ASSISTANT:",
        (1, 3148, 1001, 29901), kv_heads=4, shards=3),
    "llava-hf/llama3-llava-next-8b-hf": Release(
        "llama", "LlamaForCausalLM", "llama3", LLAMA3_TEMPLATE,
        f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n", (128000, 128006, 882, 128007, 271),
        kv_heads=2, shards=4),
}
HUB_IDS = list(RELEASES)


def write_tokenizer(folder, release: Release) -> None:
    """The release's real tokenizer files (Mistral-7B's, Vicuna-7B-v1.5's as tokenizer.json with
    ``"legacy": false``, or Llama-3-8B's with <|eot_id|> ending a turn)."""
    if release.tokenizer == "mistral":
        write_mistral_tokenizer(folder)
    elif release.tokenizer == "vicuna":
        write_vicuna_tokenizer(folder, legacy=False, sentencepiece_only=False)
    else:
        write_llama3_tokenizer(folder, {"eos_token": "<|eot_id|>"})


def legacy_key(key: str) -> str:
    """transformers 5 parameter name -> the name in the published llava-hf checkpoints."""
    for new, old in (("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if key.startswith(new):
            return old + key[len(new):]
    raise KeyError(key)


def write_checkpoint(folder, release: Release, seed: int) -> None:
    from transformers import AddedToken, AutoTokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration

    write_tokenizer(folder, release)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(folder)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = -(-len(tokenizer) // 64) * 64          # padded to 64 rows, as llava-hf's conversion does
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
        "image_grid_pinpoints": PINPOINTS, "image_token_index": image_id, "model_type": "llava_next",
        "pad_token_id": tokenizer.pad_token_id, "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "tiny", "architectures": [release.architecture], "bos_token_id": bos,
            "eos_token_id": eos, "hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.2,
            "max_position_embeddings": 4096, "model_type": release.text_model, "num_attention_heads": 4,
            "num_hidden_layers": 2, "num_key_value_heads": release.kv_heads, "rms_norm_eps": 1e-05,
            "torch_dtype": "bfloat16", "vocab_size": vocab_size,
            **({"sliding_window": None, "rope_theta": 1000000.0} if release.text_model == "mistral" else {})},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.42.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": {"hidden_size": 32, "image_size": IMAGE_SIZE, "initializer_range": 0.2,
                          "intermediate_size": 64, "model_type": "clip_vision_model",
                          "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": PATCH,
                          "projection_dim": 32, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
         "transformers_version": "4.42.0.dev0"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "aspect_ratio_setting": "anyres", "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True, "image_grid_pinpoints": PINPOINTS, "image_mean": CLIP_MEAN,
        "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": IMAGE_SIZE}}, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": PATCH,
        "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": release.template}, indent=2))

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_pretrained(folder))
    state = {legacy_key(key): value.contiguous() for key, value in model.state_dict().items()}
    save_shards(folder, state, release.shards)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    for seed, (repo_id, release) in enumerate(RELEASES.items()):
        write_checkpoint(snapshot(cache, repo_id), release, seed)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    use_offline_cache(monkeypatch, hub_cache)
    return hub_cache


def load(repo_id: str, grid: str | None = None, attn_implementation: str = "sdpa"):
    return load_lmm("llava_next", repo_id, dtype=torch.float32, attn_implementation=attn_implementation,
                    device=torch.device("cpu"), grid=grid)


def bright_image(name: str, seed: int) -> Image.Image:
    """A noise image of the size IMAGES gives ``name``, every channel in 128..255: no pixel is as dark
    as the processor's black canvas padding."""
    height, width = IMAGES[name][0]
    return Image.fromarray(np.random.default_rng(seed).integers(128, 256, (height, width, 3), dtype=np.uint8))


def test_family_is_registered():
    assert "llava_next" in LMM_FAMILIES


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_published_layout_loads_through_the_registry(offline_hub, repo_id):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    release = RELEASES[repo_id]
    loaded = load(repo_id)
    assert loaded.family == "llava_next" and loaded.pad_to_square is False
    assert type(loaded.model) is LlavaNextForConditionalGeneration
    assert type(loaded.processor) is LlavaNextProcessor
    assert loaded.model.config.text_config.model_type == release.text_model
    assert loaded.model.config.get_text_config()._attn_implementation == "sdpa"
    tokenizer = loaded.processor.tokenizer
    assert loaded.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.image_token_id == loaded.processor.image_token_id
    # the published weight names were mapped onto every parameter (nothing left at its initialisation)
    folder = next(offline_hub.glob(f"models--{repo_id.replace('/', '--')}/snapshots/*"))
    from safetensors.torch import load_file

    parameters = {legacy_key(key): value for key, value in loaded.model.state_dict().items()}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(parameters)
    for shard in sorted(folder.glob("model-*-of-*.safetensors")):
        for key, value in load_file(shard).items():
            assert torch.equal(parameters[key], value), key
    prompt = build_prompt(loaded.processor, QUESTION, None)
    assert prompt == release.prompt
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(loaded.image_token_id) == 1
    assert tuple(ids[:len(release.prompt_head)]) == release.prompt_head


def planted_embeddings(loaded, inputs):
    """Prefill ``inputs`` with the projector's output replaced by (global tile + 1, patch row, patch
    column, 0, ...) per vision feature; return the language model's input embeddings (B, L, D)."""
    model = loaded.model
    captured = {}

    def plant(module, args, output):
        tiles, patches, _ = output.shape
        planted = torch.zeros_like(output)
        planted[..., 0] = torch.arange(1, tiles + 1, dtype=output.dtype)[:, None]
        planted[..., 1] = (torch.arange(patches) // SIDE).to(output.dtype)
        planted[..., 2] = (torch.arange(patches) % SIDE).to(output.dtype)
        return planted

    def keep(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hooks = [model.model.multi_modal_projector.register_forward_hook(plant),
             model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["embeds"]


def canvas_content(pixel_values: torch.Tensor, tiles: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of the anyres canvas (re-assembled from its tiles, pixel
    units) that hold image content, not the black padding."""
    tiles_h, tiles_w = tiles
    canvas = pixel_values[1:1 + tiles_h * tiles_w].reshape(tiles_h, tiles_w, 3, IMAGE_SIZE, IMAGE_SIZE)
    canvas = canvas.permute(2, 0, 3, 1, 4).reshape(3, tiles_h * IMAGE_SIZE, tiles_w * IMAGE_SIZE)
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])[:, None, None]
    content = ~torch.isclose(canvas, black, atol=1e-4).all(dim=0)
    ys, xs = torch.nonzero(content, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_layout_cells_carry_their_own_features(offline_hub, repo_id):
    """Both grids, two non-square images in one batch (different numbers of image tokens)."""
    from transformers.image_processing_utils import select_best_resolution

    loaded = load(repo_id)
    processor, model = loaded.processor, loaded.model
    processor.tokenizer.padding_side = "left"
    names = list(IMAGES)
    images = [bright_image(name, seed) for seed, name in enumerate(names)]
    inputs = processor(images=images, text=[build_prompt(processor, QUESTION, None)] * 2, padding=True,
                       return_tensors="pt")
    embeds = planted_embeddings(loaded, inputs)
    newline = model.model.image_newline.detach()
    highres = loaded.image_layouts(inputs)
    base = anyres_layouts(model.config, "base")(inputs)
    for b, name in enumerate(names):
        (height, width), (rows, columns) = IMAGES[name]
        where = (inputs["input_ids"][b] == loaded.image_token_id).nonzero()[:, 0]
        assert len(where) == SIDE * SIDE + rows * (columns + 1)
        decoded = embeds[b, :, :3].round().long()
        base_tile = int(decoded[where[0], 0])

        # base grid: the first SIDE * SIDE image tokens, base tile, patch (r, c) at cell (r, c)
        assert base[b].grid == (SIDE, SIDE) and torch.equal(base[b].positions, where[:SIDE * SIDE])
        cells = decoded[base[b].positions].view(SIDE, SIDE, 3)
        assert (cells[..., 0] == base_tile).all()
        assert torch.equal(cells[..., 1], torch.arange(SIDE)[:, None].expand(SIDE, SIDE))
        assert torch.equal(cells[..., 2], torch.arange(SIDE)[None, :].expand(SIDE, SIDE))

        # high-resolution grid: canvas patch (R, C) of tile (R // SIDE, C // SIDE) at cell (r, c),
        # with (R - r, C - c) the same for every cell: the symmetric cut of the canvas padding
        layout = highres[b]
        assert layout.grid == (rows, columns) and len(set(layout.positions.tolist())) == rows * columns
        canvas_h, canvas_w = select_best_resolution((height, width), PINPOINTS)
        tiles_h, tiles_w = canvas_h // IMAGE_SIZE, canvas_w // IMAGE_SIZE
        cells = decoded[layout.positions].view(rows, columns, 3)
        tile = cells[..., 0] - base_tile - 1
        assert bool((tile >= 0).all()) and bool((tile < tiles_h * tiles_w).all())
        canvas_row = tile // tiles_w * SIDE + cells[..., 1]
        canvas_col = tile % tiles_w * SIDE + cells[..., 2]
        top = canvas_row - torch.arange(rows)[:, None]
        left = canvas_col - torch.arange(columns)[None, :]
        assert len(top.unique()) == 1 and len(left.unique()) == 1
        top, left = int(top[0, 0]), int(left[0, 0])
        assert 2 * top + rows == tiles_h * SIDE and 2 * left + columns == tiles_w * SIDE
        # ... and it covers the image content of the canvas up to less than one cell at each edge
        y0, y1, x0, x1 = canvas_content(inputs["pixel_values"][b], (tiles_h, tiles_w))
        for grid_edge, content_edge in ((top, y0), (top + rows, y1), (left, x0), (left + columns, x1)):
            assert abs(grid_edge * PATCH - content_edge) < PATCH, (name, grid_edge, content_edge)
        # the row-end newline tokens carry image_newline and are no cell
        row_ends = where[SIDE * SIDE + torch.arange(rows) * (columns + 1) + columns]
        assert torch.equal(embeds[b, row_ends], newline.expand(rows, -1))
        assert not set(row_ends.tolist()) & set(layout.positions.tolist())


def write_manifest(folder, names) -> str:
    rows = []
    for seed, name in enumerate(names):
        file = folder / f"{name}.png"
        bright_image(name, seed).save(file)
        (height, width), _ = IMAGES[name]
        rows.append({"image_id": name, "file": str(file), "width": width, "height": height, "shard": 0,
                     "error": None})
    write_table(rows, folder / "manifest.parquet", "manifest")
    return str(folder / "manifest.parquet")


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_generate_stage_captures_eager_rows_on_each_images_grid(offline_hub, tmp_path, repo_id):
    """Two non-square images in one batch through stages.generate.run, for both grids: each image's
    rows are stored on its own grid and equal the eager output_attentions rows at its layout."""
    names = list(IMAGES)
    manifest = write_manifest(tmp_path, names)
    max_new = 4
    eager = load(repo_id, attn_implementation="eager")
    eager.processor.tokenizer.padding_side = "left"
    images = [Image.open(tmp_path / f"{name}.png").convert("RGB") for name in names]
    inputs = eager.processor(images=images, text=[build_prompt(eager.processor, QUESTION, None)] * 2,
                             padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=max_new, output_attentions=True,
                                   return_dict_in_generate=True)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]

    peak = 0.0
    for grid in ("highres", "base"):
        generations, attention = tmp_path / f"{grid}.parquet", tmp_path / f"{grid}.zarr"
        generate.run(GenerateConfig(max_new_tokens=max_new, batch_size=2),
                     LMMConfig(family="llava_next", path=repo_id, grid=None if grid == "highres" else grid),
                     manifest, 0, generations, attention, device="cpu")
        table = read_table(generations, "generations")
        store = open_attention(attention)
        assert table["image_id"].tolist() == names and table["error"].isna().all()
        assert attention_attrs(attention)["grid_covers"] == "image"      # LLaVA-NeXT does not pad
        layouts = anyres_layouts(eager.model.config, grid)(inputs)
        expected = eager_reference_rows(out.attentions, [layout.positions for layout in layouts])
        for b, row in enumerate(table.itertuples()):
            want = IMAGES[row.image_id][1] if grid == "highres" else (SIDE, SIDE)
            assert (row.grid_h, row.grid_w) == want == layouts[b].grid
            assert list(row.token_ids) == generated[b, :row.num_tokens].tolist()
            stored = read_rows(store, row.attention_offset, row.num_tokens, want)
            reference = expected[b, :row.num_tokens, :want[0] * want[1]].reshape(-1, *want).numpy()
            np.testing.assert_allclose(stored, reference, rtol=1e-2, atol=1e-4)
            assert (stored >= 0).all() and (stored.reshape(len(stored), -1).sum(axis=1) <= 1 + 1e-2).all()
            peak = max(peak, float(stored.max()))
    assert peak > 3.0 / inputs["input_ids"].shape[1]          # peaked, not uniform


def test_padding_to_square_on_request_gives_square_grids_over_the_padded_square(offline_hub, tmp_path):
    repo_id = HUB_IDS[0]
    manifest = write_manifest(tmp_path, list(IMAGES))
    generations, attention = tmp_path / "g.parquet", tmp_path / "a.zarr"
    generate.run(GenerateConfig(max_new_tokens=2, batch_size=2, pad_to_square=True),
                 LMMConfig(family="llava_next", path=repo_id), manifest, 0, generations, attention,
                 device="cpu")
    table = read_table(generations, "generations")
    assert attention_attrs(attention)["grid_covers"] == "padded_square"
    # 90 x 90 and 90 x 90 squares: canvas 64 x 64, nothing to cut: 16 x 16 cells
    assert table["grid_h"].tolist() == [16, 16] and table["grid_w"].tolist() == [16, 16]


def test_config_errors_name_the_key_or_file(offline_hub, tmp_path):
    repo_id = HUB_IDS[0]
    with pytest.raises(ConfigError, match="lmm.base"):
        load_lmm("llava_next", repo_id, dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"), base="lmsys/vicuna-7b-v1.5")
    with pytest.raises(ConfigError, match="someone/not-a-model"):
        load("someone/not-a-model")
    folder = next(offline_hub.glob(f"models--{repo_id.replace('/', '--')}/snapshots/*"))
    local = tmp_path / "llava-next"
    shutil.copytree(folder, local)
    config = json.loads((local / "config.json").read_text())
    config["image_grid_pinpoints"] = PINPOINTS[:3]
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        load(str(local))
    with pytest.raises(ValueError, match=r"an image of 50 x 90 px needs 200 image tokens"):
        loaded = load(repo_id)
        ids = torch.tensor([[loaded.image_token_id] * 10])
        loaded.image_layouts({"input_ids": ids, "image_sizes": torch.tensor([[50, 90]])})


def test_forced_answers_get_the_eager_own_position_rows(offline_hub, tmp_path):
    """Teacher forcing in the generate stage for LLaVA-NeXT (anyres: per-image high-resolution grids): two
    non-square images in one left-padded batch, each forcing the same narrative, get the rows a plain eager
    forward of each alone gives at the answer's own positions."""
    from test_generate_samples import eager_forced_rows, forced_stage_rows

    repo_id = HUB_IDS[0]
    images = {name: bright_image(name, seed) for seed, name in enumerate(IMAGES)}
    found = forced_stage_rows(tmp_path, "llava_next", repo_id, images, ["A red circle", " on the grass."],
                              QUESTION)
    eager = load(repo_id, attn_implementation="eager")
    for name, image in images.items():
        ids, stored = found[name]
        reference = eager_forced_rows(eager, image.convert("RGB"), QUESTION, ids)
        assert stored.shape == reference.shape and stored.shape[1:] == IMAGES[name][1]
        np.testing.assert_allclose(stored, reference, rtol=1e-2, atol=1e-4)      # float16 store
