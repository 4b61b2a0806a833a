"""The qwen2_5_vl family: a tiny Qwen2.5-VL checkpoint in the published layout of
Qwen/Qwen2.5-VL-7B-Instruct (flat pre-transformers-5 config, ``visual.*`` / ``model.layers.*`` keys in
sharded safetensors, the real Qwen2.5 byte-level BPE tokenizer files, preprocessor and chat template; tiny
random weights with the published 152064-row vocabulary), fabricated into a
fake Hugging Face cache and loaded through the registry by its hub id. Checked: the grid of each image
(dynamic resolution), that image-grid cell (r, c) lands on ``ImageLayout`` position r * C + c (through
the processor, the vision tower's window reordering and the model's own splicing, on non-square
images), left-padded batches of images of different sizes, captured attention rows against eager
``output_attentions`` rows, and the generate and segment stages end to end on two non-square images of
different sizes in one batch."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fake_hub import save_shards, snapshot, use_offline_cache
from real_tokenizers import write_qwen2_5_tokenizer

from stages.capture import AttentionCapture, eager_reference_rows
from stages.config import ConfigError
from stages.generate import build_prompt, token_char_spans
from stages.models.qwen2_5_vl import qwen_image_layouts
from stages.models.registry import LMM_FAMILIES, load_lmm

REPO_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
QUESTION = "Describe the image in detail."
PATCH, MERGE = 14, 2
CELL = PATCH * MERGE                       # 28 px of the resized image per merged grid cell
MIN_PIXELS, MAX_PIXELS = 4 * CELL * CELL, 40 * CELL * CELL    # 4 to 40 image tokens
MAX_NEW_TOKENS = 6

# The published chat_template.json (also in tokenizer_config.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value "
    "= image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's added tokens in the published order (ids 151643..151664, right after the 151643 BPE tokens);
# the last eight are not special.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
BPE_SIZE = 151643


def token_ids() -> dict[str, int]:
    """Ids of the added tokens: right after the BPE vocabulary, in the published order."""
    return {token: BPE_SIZE + i for i, token in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS)}


def write_tokenizer(folder) -> None:
    """Qwen2.5's real tokenizer files (:func:`real_tokenizers.write_qwen2_5_tokenizer`): tokenizer.json
    (byte-level BPE, NFC, the Qwen2 split regex, added tokens), vocab.json + merges.txt (the BPE alone),
    tokenizer_config.json (Qwen2Tokenizer, eos <|im_end|>, pad <|endoftext|>, no bos, the chat template)."""
    write_qwen2_5_tokenizer(folder, {"chat_template": CHAT_TEMPLATE})
    bpe = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(bpe["vocab"]) == BPE_SIZE
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def published_config() -> dict:
    """config.json as published for the 7B (flat text fields, vision_config, mrope rope_scaling), sizes
    shrunk, token ids and vocabulary size as published."""
    ids = token_ids()
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.1, "intermediate_size": 128, "max_position_embeddings": 128000,
        "max_window_layers": 3, "model_type": "qwen2_5_vl", "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 4, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48,
                          "num_heads": 4, "in_chans": 3, "out_hidden_size": 64, "patch_size": PATCH,
                          "spatial_merge_size": MERGE, "spatial_patch_size": PATCH, "window_size": 112,
                          "fullatt_block_indexes": [1, 3], "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": 152064,                 # padded beyond the tokenizer's 151665
    }


def published_key(key: str) -> str:
    """A transformers-5 state-dict key -> the published checkpoint's key."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def write_checkpoint(folder) -> None:
    """The 7B's file list: config.json, generation_config.json, preprocessor_config.json,
    chat_template.json, the tokenizer files and model-0000k-of-00005.safetensors + index (bfloat16,
    published key names)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    write_tokenizer(folder)
    config = published_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    ids = token_ids()
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05,
        "temperature": 0.1, "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": PATCH, "temporal_patch_size": 2,
        "merge_size": MERGE, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))

    torch.manual_seed(3)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    state = {published_key(key): value.to(torch.bfloat16).contiguous()
             for key, value in model.state_dict().items()}
    save_shards(folder, state, 5)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A fake hub cache holding the checkpoint; returns (cache, snapshot folder)."""
    cache = tmp_path_factory.mktemp("hub")
    folder = snapshot(cache, REPO_ID)
    write_checkpoint(folder)
    return cache, folder


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """The fake cache, read offline."""
    use_offline_cache(monkeypatch, hub_cache[0])
    return hub_cache


@pytest.fixture
def loaded(offline_hub):
    lmm = load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                   device=torch.device("cpu"))
    lmm.processor.tokenizer.padding_side = "left"
    return lmm


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def model_inputs(lmm, images: list[Image.Image]):
    prompt = build_prompt(lmm.processor, QUESTION, None)
    return lmm.processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")


def test_family_is_registered():
    assert "qwen2_5_vl" in LMM_FAMILIES


def test_published_layout_loads_through_the_registry(loaded, offline_hub):
    from safetensors.torch import load_file

    folder = offline_hub[1]
    ids = token_ids()
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Qwen2_5_VLProcessor"
    assert loaded.family == "qwen2_5_vl" and loaded.path == REPO_ID
    assert loaded.image_token_id == ids["<|image_pad|>"] == loaded.processor.image_token_id
    assert loaded.pad_to_square is False
    assert loaded.processor.image_processor.size["longest_edge"] == MAX_PIXELS
    assert loaded.model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = loaded.model.config
    assert config.get_text_config()._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "sdpa"
    assert config.get_text_config().num_hidden_layers == 3 and config.vision_config.depth == 4
    assert config.get_text_config().rope_parameters["mrope_section"] == [2, 3, 3]
    # Every published tensor landed, renamed by transformers' conversion mapping, and nothing else is missing.
    state = loaded.model.state_dict()
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    published = {}
    for name in sorted(set(index.values())):
        published.update(load_file(folder / name))
    assert any(key.startswith("visual.blocks.") for key in published)
    assert any(key.startswith("model.layers.") for key in published)
    assert sorted(published_key(key) for key in state) == sorted(published)
    for key, value in state.items():
        assert torch.equal(value, published[published_key(key)].float()), key


def test_prompt_is_the_qwen_chat_template(loaded):
    assert build_prompt(loaded.processor, QUESTION, None) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(loaded.processor, QUESTION, "Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    # The published ids: "system", "\n", "You are a helpful assistant.", ..., "Describe the image in detail."
    ids = model_inputs(loaded, [noise_image(56, 84)])["input_ids"][0].tolist()
    image_pad = token_ids()["<|image_pad|>"]
    assert ids.count(image_pad) == 2 * 3
    assert ids[:ids.index(image_pad)] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                                          151644, 872, 198, 151652]
    after_image = ids[len(ids) - ids[::-1].index(image_pad):]
    assert after_image == [151653, 74785, 279, 2168, 304, 7716, 13, 151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize(("size", "grid"), [
    ((140, 196), (5, 7)),        # multiples of 28: kept
    ((100, 150), (4, 5)),        # rounded to multiples of 28: 112 x 140
    ((600, 900), (5, 7)),        # above max_pixels: shrunk (floor) to 140 x 196
    ((20, 30), (2, 3)),          # below min_pixels: grown (ceil) to 56 x 84
    ((196, 84), (7, 3)),         # portrait
])
def test_each_image_gets_its_own_grid(loaded, size, grid):
    inputs = model_inputs(loaded, [noise_image(*size)])
    rows, columns = grid
    assert inputs["image_grid_thw"].tolist() == [[1, rows * MERGE, columns * MERGE]]
    assert inputs["pixel_values"].shape == (rows * columns * MERGE * MERGE, 3 * 2 * PATCH * PATCH)
    (layout,) = loaded.image_layouts(inputs)
    assert layout.grid == grid and layout.positions.dtype == torch.int64
    ids = inputs["input_ids"][0]
    assert (ids[layout.positions] == loaded.image_token_id).all()
    assert int((ids == loaded.image_token_id).sum()) == rows * columns
    assert ids[layout.positions[0] - 1] == token_ids()["<|vision_start|>"]
    assert ids[layout.positions[-1] + 1] == token_ids()["<|vision_end|>"]


def expected_cell_features(visual, image: Image.Image, mean, std) -> torch.Tensor:
    """The vision tower's feature of each 28 x 28 cell of ``image`` (already a multiple of 28 in both
    sides, within min/max pixels, so the processor does not resize it) when its blocks are identities:
    the cell's 2 x 2 patches of 14 px (row-major, each repeated over the 2 temporal frames) through the
    patch embedding, then the merger. Returns (R, C, out_hidden) float32, indexed by (row, column)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = ((pixels - torch.tensor(mean)) / torch.tensor(std)).permute(2, 0, 1)      # (3, H, W)
    rows, columns = pixels.shape[1] // CELL, pixels.shape[2] // CELL
    features = torch.empty(rows, columns, visual.merger.mlp[-1].out_features)
    for r in range(rows):
        for c in range(columns):
            patches = [pixels[:, CELL * r + PATCH * dr: CELL * r + PATCH * (dr + 1),
                              CELL * c + PATCH * dc: CELL * c + PATCH * (dc + 1)]
                       for dr in range(MERGE) for dc in range(MERGE)]
            frames = torch.stack([torch.stack([p, p], dim=1) for p in patches])      # (4, 3, 2, 14, 14)
            embedded = visual.patch_embed.proj(frames).flatten(1)                   # (4, hidden)
            features[r, c] = visual.merger(embedded)[0]
    return features


def test_vision_tower_output_row_k_is_cell_k_row_major(loaded):
    """Processor patch order + the tower's window reordering and its undoing: with every block reduced to
    the identity (attention and MLP outputs zeroed), row r * C + c of the tower's output is the merger of
    cell (r, c)'s own patches. A 5 x 7 grid spans 2 x 2 attention windows of 4 x 4 cells, so the window
    order differs from the row-major order."""
    model = copy.deepcopy(loaded.model)
    visual = model.model.visual
    with torch.no_grad():
        for block in visual.blocks:
            for linear in (block.attn.proj, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()
    image = noise_image(140, 196, seed=4)
    inputs = model_inputs(loaded, [image])
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 14]]
    image_processor = loaded.processor.image_processor
    expected = expected_cell_features(visual, image, image_processor.image_mean, image_processor.image_std)
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    (features,) = output.pooler_output
    assert features.shape == (5 * 7, 64)
    torch.testing.assert_close(features.view(5, 7, -1), expected, rtol=1e-4, atol=1e-4)
    # The tower's window order is not row-major here, and the cells differ, so a leftover permutation
    # would show.
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], MERGE, 112, PATCH)
    assert not torch.equal(window_index, torch.arange(35))
    assert torch.cdist(expected.view(35, -1), expected.view(35, -1)).add(torch.eye(35)).min() > 1e-2


def plant_cell_features(model, monkeypatch) -> list[torch.Tensor]:
    """Replace the model's image-feature function by one that returns, for image i with merged grid
    R x C, features whose first three channels are (i + 1, row, column) of each cell, in row-major
    order (the tower's order, test above). Returns the list the language model's ``inputs_embeds``
    are appended to, one per forward call."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden = model.config.get_text_config().hidden_size

    def planted(pixel_values, image_grid_thw=None, **kwargs):
        features = []
        for i, (_, height, width) in enumerate(image_grid_thw.tolist()):
            rows, columns = height // MERGE, width // MERGE
            cells = torch.zeros(rows, columns, hidden)
            cells[..., 0] = i + 1
            cells[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
            cells[..., 2] = torch.arange(columns, dtype=torch.float32)[None, :]
            features.append(cells.view(rows * columns, hidden))
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    monkeypatch.setattr(model.model, "get_image_features", planted)
    seen: list[torch.Tensor] = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("sizes", [[(100, 150)], [(140, 196), (84, 112)], [(84, 112), (196, 84)]],
                         ids=["non-square", "batch-wide-then-small", "batch-small-then-portrait"])
def test_planted_cell_features_land_on_their_layout_positions(loaded, monkeypatch, sizes):
    model = copy.deepcopy(loaded.model)
    seen = plant_cell_features(model, monkeypatch)
    inputs = model_inputs(loaded, [noise_image(*size, seed=k) for k, size in enumerate(sizes)])
    with torch.no_grad():
        model(**inputs)
    (embeds,) = seen
    layouts = loaded.image_layouts(inputs)
    text_embeds = model.get_input_embeddings()(inputs["input_ids"])
    for b, layout in enumerate(layouts):
        rows, columns = layout.grid
        cells = embeds[b, layout.positions].view(rows, columns, -1)
        assert (cells[..., 0] == b + 1).all()
        row_index, column_index = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                                                 torch.arange(columns, dtype=torch.float32), indexing="ij")
        assert torch.equal(cells[..., 1], row_index) and torch.equal(cells[..., 2], column_index)
        others = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
        others[layout.positions] = False
        assert torch.equal(embeds[b, others], text_embeds[b, others])
    if len(sizes) == 2:
        # Left padding: the shorter sequence's positions are its own, shifted by its padding.
        padding = (inputs["attention_mask"] == 0).sum(dim=1)
        assert int(padding.min()) == 0 and int(padding.max()) > 0
        for b, layout in enumerate(layouts):
            (alone,) = loaded.image_layouts(model_inputs(loaded, [noise_image(*sizes[b], seed=b)]))
            assert alone.grid == layout.grid
            assert torch.equal(layout.positions, alone.positions + padding[b])


def padded_positions(layouts) -> torch.Tensor:
    """(B, N_max) int64 key positions for the capture's rectangular gather: each item's layout positions,
    padded by repeating its last one; item b's row values are the first rows * columns columns."""
    longest = max(layout.positions.numel() for layout in layouts)
    return torch.stack([torch.cat([p, p[-1:].expand(longest - p.numel())])
                        for p in (layout.positions for layout in layouts)])


def captured_generation(lmm, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation with attention capture; returns (sequences, per item (steps, R, C) rows).
    Checks that the capture swaps the language model's attention only, and restores it."""
    layouts = lmm.image_layouts(inputs)
    capture = AttentionCapture(lmm.model, layers="all", heads="all")
    config = lmm.model.config
    implementation = config.get_text_config()._attn_implementation
    with torch.no_grad(), capture.recording(padded_positions(layouts).to(lmm.model.device)):
        assert config.get_text_config()._attn_implementation == f"aas_capture_{implementation}"
        assert config.vision_config._attn_implementation == implementation
        sequences = lmm.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert config.get_text_config()._attn_implementation == implementation
    rows = capture.rows().cpu()
    return sequences, [rows[b, :, :layout.positions.numel()].reshape(rows.shape[1], *layout.grid)
                       for b, layout in enumerate(layouts)]


@pytest.fixture
def eager(offline_hub):
    return load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="eager",
                    device=torch.device("cpu"))


@pytest.mark.parametrize("sizes", [[(100, 150)], [(140, 196), (84, 112)]],
                         ids=["batch1", "left-padded-batch2"])
def test_captured_rows_equal_eager_output_attentions_rows(loaded, eager, sizes):
    inputs = model_inputs(loaded, [noise_image(*size, seed=k) for k, size in enumerate(sizes)])
    with torch.no_grad():
        plain = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    sequences, rows = captured_generation(loaded, inputs)
    assert torch.equal(sequences, plain)                    # capture leaves the generation unchanged

    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                   output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, sequences)
    layouts = loaded.image_layouts(inputs)
    expected = eager_reference_rows(out.attentions, padded_positions(layouts))
    steps = sequences.shape[1] - inputs["input_ids"].shape[1]
    assert steps == MAX_NEW_TOKENS
    for b, layout in enumerate(layouts):
        assert rows[b].shape == (steps, *layout.grid)
        reference = expected[b, :, :layout.positions.numel()].reshape(steps, *layout.grid)
        torch.testing.assert_close(rows[b], reference, rtol=1e-4, atol=1e-6)
        assert (rows[b] >= 0).all() and (rows[b].flatten(1).sum(dim=1) <= 1 + 1e-5).all()
        spread = rows[b].flatten(1).std(dim=1) / rows[b].flatten(1).mean(dim=1)
        assert (spread > 0.05).all()            # the cells differ: a wrong position would show


def test_left_padded_batch_gives_each_image_its_rows_alone(loaded):
    sizes = [(140, 196), (84, 112)]
    images = [noise_image(*size, seed=k) for k, size in enumerate(sizes)]
    sequences, rows = captured_generation(loaded, model_inputs(loaded, images))
    prompt_length = model_inputs(loaded, images)["input_ids"].shape[1]
    for b, image in enumerate(images):
        inputs = model_inputs(loaded, [image])
        alone_sequences, (alone_rows,) = captured_generation(loaded, inputs)
        alone_length = inputs["input_ids"].shape[1]
        assert sequences[b, prompt_length:].tolist() == alone_sequences[0, alone_length:].tolist()
        torch.testing.assert_close(rows[b], alone_rows, rtol=1e-4, atol=1e-5)


def test_layouts_reject_inputs_without_one_grid_of_image_tokens(loaded):
    inputs = model_inputs(loaded, [noise_image(100, 150)])
    image_token_id = loaded.image_token_id
    with pytest.raises(ValueError, match="image_grid_thw"):
        qwen_image_layouts({"input_ids": inputs["input_ids"]}, image_token_id, MERGE)
    with pytest.raises(ValueError, match="one image"):
        qwen_image_layouts({**inputs, "image_grid_thw": torch.tensor([[2, 8, 10]])}, image_token_id, MERGE)
    with pytest.raises(ValueError, match="one .* row per batch item"):
        qwen_image_layouts({**inputs, "image_grid_thw": inputs["image_grid_thw"].repeat(2, 1)},
                           image_token_id, MERGE)
    truncated = inputs["input_ids"].clone()
    truncated[0, (truncated[0] == image_token_id).nonzero()[0, 0]] = token_ids()["<|vision_start|>"]
    with pytest.raises(ValueError, match="19 image tokens"):
        qwen_image_layouts({**inputs, "input_ids": truncated}, image_token_id, MERGE)
    split = inputs["input_ids"].clone()
    split[0, (split[0] == image_token_id).nonzero()[5, 0]] = token_ids()["<|vision_start|>"]
    split = torch.cat([split, torch.tensor([[image_token_id]])], dim=1)
    with pytest.raises(ValueError, match="one run of 4 x 5"):
        qwen_image_layouts({**inputs, "input_ids": split}, image_token_id, MERGE)


def local_copy(folder, destination, file: str, changes: dict, replace: bool):
    """A copy of the checkpoint folder whose JSON ``file`` gets ``changes`` (``replace``: becomes them)."""
    destination.mkdir()
    for item in folder.iterdir():
        (destination / item.name).write_bytes(item.read_bytes())
    content = {} if replace else json.loads((destination / file).read_text())
    (destination / file).write_text(json.dumps({**content, **changes}))
    return str(destination)


@pytest.mark.parametrize(("file", "changes", "replace", "message"), [
    ("preprocessor_config.json", {"merge_size": 1}, False, r"\(14, 1, 151655\), the model \(14, 2, 151655\)"),
    # Snapshots taken before the hub's preprocessor_config.json named Qwen2VLImageProcessor.
    ("preprocessor_config.json", {"image_processor_type": "Qwen2_5_VLImageProcessor"}, False,
     "cannot load the processor of Qwen2.5-VL model .*Unrecognized image processor"),
    ("config.json", {"model_type": "llava"}, True, "model of type 'llava', not 'qwen2_5_vl'"),
], ids=["merge-size", "old-image-processor-type", "not-qwen"])
def test_mismatched_checkpoint_files_are_config_errors(offline_hub, tmp_path, file, changes, replace,
                                                       message):
    local = local_copy(offline_hub[1], tmp_path / "qwen", file, changes, replace)
    with pytest.raises(ConfigError, match=message):
        load_lmm("qwen2_5_vl", local, dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))


def test_missing_checkpoint_and_base_are_config_errors(offline_hub):
    with pytest.raises(ConfigError, match="someone/not-a-model"):
        load_lmm("qwen2_5_vl", "someone/not-a-model", dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="lmm.base"):
        load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"), base="Qwen/Qwen2.5-7B-Instruct")


def test_answer_spans_follow_the_byte_level_tokenizer(loaded):
    """The generate stage's token -> character spans work on Qwen2's byte-level BPE: a character split
    over byte tokens shares one span, the end-of-turn token is special."""
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer("A red café, a blue circle near 镇.", add_special_tokens=False)["input_ids"] + \
        [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    answer, starts, ends, special = token_char_spans(tokenizer, ids)
    assert answer == "A red café, a blue circle near 镇."
    assert special == [False] * (len(ids) - 1) + [True]
    spans = [(start, end) for start, end, is_special in zip(starts, ends, special) if not is_special]
    distinct = list(dict.fromkeys(spans))
    assert "".join(answer[start:end] for start, end in distinct) == answer       # in order, no gaps
    assert answer[starts[2]:ends[2]] == " café"                                 # one token of the vocabulary
    character = answer.index("镇")
    assert sum(start <= character < end for start, end in spans) == 3     # " " + its 3 bytes in 3 tokens


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_capture_on_gpu_matches_eager(offline_hub, implementation):
    """bfloat16 on CUDA, a left-padded batch of two grids: step 0 reads the same prompt either way;
    bf16 kernels may make later tokens diverge, so later rows are compared only when they do not."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn")
    device = torch.device("cuda")
    lmm, eager = (load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.bfloat16, attn_implementation=name,
                           device=device) for name in (implementation, "eager"))
    lmm.processor.tokenizer.padding_side = "left"
    inputs = model_inputs(lmm, [noise_image(140, 196), noise_image(84, 112, seed=1)]).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    sequences, rows = captured_generation(lmm, inputs)
    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                   output_attentions=True, return_dict_in_generate=True)
    layouts = lmm.image_layouts(inputs)
    expected = eager_reference_rows(out.attentions, padded_positions(layouts).to(device)).cpu()
    same_tokens = torch.equal(sequences, out.sequences)
    for b, layout in enumerate(layouts):
        reference = expected[b, :, :layout.positions.numel()].reshape(-1, *layout.grid)
        torch.testing.assert_close(rows[b][:1], reference[:1], rtol=2e-2, atol=2e-3)
        if same_tokens:
            torch.testing.assert_close(rows[b], reference, rtol=2e-2, atol=2e-3)


# --- the generate and segment stages end to end ------------------------------------------------------

# Two non-square images of different sizes (H, W) -> merged grids (rows, columns) = (H', W') / 28 of the
# processor's resize: 100 x 150 -> 112 x 140 px -> 4 x 5; 196 x 112 (portrait, kept) -> 7 x 4.
STAGE_IMAGES = {"wide": ((100, 150), (4, 5)), "tall": ((196, 112), (7, 4))}
# An interior cell per image (an edge cell's bicubic peak drifts to the border) whose centre differs by
# more than a pixel between the whole-image geometry and LLaVA-1.5's padded square: wide (1, 2), centre
# row 37.5 vs 31.25; tall (3, 1), centre column 42 vs 31.5.
PLANTED = {"wide": (1, 2), "tall": (3, 1)}
PLANTED_TOKEN, PLANTED_VALUE = 1, 0.5


def cell_box(cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, ...]:
    """Pixels of the original ``size`` (H, W) image covered by grid ``cell`` (r, c) of a (rows, columns)
    grid over the whole image (Qwen2.5-VL: the resize is a stretch, no padding): returns (x0, x1, y0, y1),
    columns in [x0, x1) and rows in [y0, y1)."""
    (r, c), (rows, columns), (height, width) = cell, grid, size
    return c * width / columns, (c + 1) * width / columns, r * height / rows, (r + 1) * height / rows


def test_generate_and_segment_stages_on_each_images_own_grid(offline_hub, eager, tmp_path):
    """stages.generate.run on two non-square images of different sizes in one batch (batch_size 2):
    each image's grid in the generations table is the processor's image_grid_thw / merge_size, its
    stored rows equal eager output_attentions rows at its layout positions, the store says the grids
    cover the whole image. Then stages.segment.run (toy SAM, point prompts, upsample auto) puts every
    point inside its image and, where a map of the model clearly peaks in one cell, inside that cell
    stretched over the whole image (as Qwen2.5-VL's resize stretches it); a peak planted in one stored
    map per image (through the table's offset and grid) gives a point at its cell's centre under the
    whole-image geometry, more than 3 px from where the padded-square geometry would put it."""
    from stages import generate, segment
    from stages.generate import GenerateConfig, LMMConfig
    from stages.io.attention import attention_attrs, open_attention, read_rows
    from stages.io.tables import read_arrow, read_table, write_table
    from stages.models.sam import build_toy_sam

    names = list(STAGE_IMAGES)
    manifest = []
    for seed, name in enumerate(names):
        (height, width), _ = STAGE_IMAGES[name]
        noise_image(height, width, seed=seed).save(tmp_path / f"{name}.png")
        manifest.append({"image_id": name, "file": str(tmp_path / f"{name}.png"), "width": width,
                         "height": height, "shard": 0, "error": None})
    write_table(manifest, tmp_path / "manifest.parquet", "manifest")

    # The reference: the same batch through eager attention, output_attentions, the same generation config.
    eager.processor.tokenizer.padding_side = "left"
    images = [Image.open(tmp_path / f"{name}.png").convert("RGB") for name in names]
    inputs = model_inputs(eager, images)
    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                   output_attentions=True, return_dict_in_generate=True)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    layouts = eager.image_layouts(inputs)
    expected = eager_reference_rows(out.attentions, padded_positions(layouts))
    processor_grids = (inputs["image_grid_thw"][:, 1:] // MERGE).tolist()
    assert int((inputs["attention_mask"] == 0).sum()) > 0              # the smaller image is left-padded
    assert processor_grids == [list(STAGE_IMAGES[name][1]) for name in names]

    paths = {name: tmp_path / f"{name}.parquet" for name in ("generations", "phrases", "masks")}
    attention = tmp_path / "attention.zarr"
    generate.run(GenerateConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=2),
                 LMMConfig(family="qwen2_5_vl", path=REPO_ID), tmp_path / "manifest.parquet", 0,
                 paths["generations"], attention, device="cpu")
    table = read_table(paths["generations"], "generations")
    store = open_attention(attention)
    assert table["image_id"].tolist() == names and table["error"].isna().all()
    assert attention_attrs(attention)["grid_covers"] == "image"          # Qwen2.5-VL does not pad
    stored_rows = {}
    for b, row in enumerate(table.itertuples()):
        grid = (row.grid_h, row.grid_w)
        assert list(grid) == processor_grids[b] == list(layouts[b].grid)
        assert list(row.token_ids) == generated[b, :row.num_tokens].tolist()
        stored = read_rows(store, row.attention_offset, row.num_tokens, grid)
        reference = expected[b, :row.num_tokens, :grid[0] * grid[1]].reshape(-1, *grid).numpy()
        np.testing.assert_allclose(stored, reference, rtol=1e-2, atol=1e-4)      # float16 store
        stored_rows[row.image_id] = stored

    # 1. The model's own maps: one phrase per image and generated token, point prompts.
    sam = segment.SamConfig(type="tiny", checkpoint=str(build_toy_sam(tmp_path / "sam.safetensors", seed=0)))

    def segment_tokens(tokens: dict[str, list[int]]) -> list[dict]:
        """segment.run (point prompts, upsample auto) with phrase j of an image = its token tokens[j]."""
        write_table([{"image_id": name, "phrase_index": j, "text": f"token {j}", "token_indices": [j],
                      "category_id": 1} for name in names for j in tokens[name]], paths["phrases"], "phrases")
        segment.run(segment.SegmentConfig(prompt="point"), sam, tmp_path / "manifest.parquet",
                    paths["generations"], attention, paths["phrases"], paths["masks"], device="cpu")
        masks = read_arrow(paths["masks"], "masks").to_pylist()
        assert len(masks) == sum(map(len, tokens.values())) and all(m["error"] is None for m in masks)
        for mask in masks:
            height, width = STAGE_IMAGES[mask["image_id"]][0]
            assert (mask["height"], mask["width"]) == (height, width)
            assert 0 <= mask["point_x"] < width and 0 <= mask["point_y"] < height
        return masks

    checked = 0
    for mask in segment_tokens({name: list(range(len(stored_rows[name]))) for name in names}):
        (height, width), grid = STAGE_IMAGES[mask["image_id"]]
        # The map as the stage makes it (the row minus the image's mean row): the point lies in its top
        # cell, checked where that cell clearly stands out (bicubic upsampling of two near-equal
        # neighbouring cells may peak in either, or between them).
        rows = stored_rows[mask["image_id"]]
        phrase_map = rows[mask["phrase_index"]] - rows.mean(axis=0)
        second, first = np.sort(phrase_map.ravel())[-2:]
        if first - second < 0.2 * (first - phrase_map.min()):
            continue
        cell = np.unravel_index(int(phrase_map.argmax()), grid)
        x0, x1, y0, y1 = cell_box(cell, grid, (height, width))
        assert x0 <= mask["point_x"] < x1 and y0 <= mask["point_y"] < y1, (mask, cell)
        checked += 1
    assert checked > 0, "no model map with a clearly peaked cell: that check checked nothing"

    # 2. A peak planted in one stored map per image, through the table's own offset and grid: segment
    # finds it at its cell's centre (a wrong offset, a transposed grid or the padded-square geometry
    # would not).
    import zarr

    values = zarr.open_group(str(attention), mode="r+")["values"]
    for row in table.itertuples():
        r, c = PLANTED[row.image_id]
        index = row.attention_offset + (PLANTED_TOKEN * row.grid_h + r) * row.grid_w + c
        values[index] = values[index] + PLANTED_VALUE
    for mask in segment_tokens({name: [PLANTED_TOKEN] for name in names}):
        (height, width), grid = STAGE_IMAGES[mask["image_id"]]
        (r, c) = PLANTED[mask["image_id"]]
        x0, x1, y0, y1 = cell_box((r, c), grid, (height, width))
        assert abs(mask["point_x"] + 0.5 - (x0 + x1) / 2) <= 1, (mask, (r, c))
        assert abs(mask["point_y"] + 0.5 - (y0 + y1) / 2) <= 1, (mask, (r, c))
        side = max(height, width)                  # the padded-square cell's centre is elsewhere
        padded = ((c + 0.5) * side / grid[1] - (side - width) // 2,
                  (r + 0.5) * side / grid[0] - (side - height) // 2)
        assert max(abs(mask["point_x"] + 0.5 - padded[0]), abs(mask["point_y"] + 0.5 - padded[1])) > 3


def test_forced_answers_get_the_eager_own_position_rows(offline_hub, eager, tmp_path):
    """Teacher forcing in the generate stage for Qwen2.5-VL (per-image grids, its own rope positions): two
    images of different sizes in one left-padded batch, each forcing the same narrative, get the rows a
    plain eager forward of each alone gives at the answer's own positions."""
    from test_generate_samples import eager_forced_rows, forced_stage_rows

    images = {name: noise_image(*STAGE_IMAGES[name][0], seed=seed) for seed, name in enumerate(STAGE_IMAGES)}
    found = forced_stage_rows(tmp_path, "qwen2_5_vl", REPO_ID, images, ["A red circle", " on the grass."],
                              QUESTION)
    for name, image in images.items():
        ids, stored = found[name]
        reference = eager_forced_rows(eager, image.convert("RGB"), QUESTION, ids)
        assert stored.shape == reference.shape and stored.shape[1:] == STAGE_IMAGES[name][1]
        np.testing.assert_allclose(stored, reference, rtol=1e-2, atol=1e-4)      # float16 store


def test_pixel_budget_comes_from_the_config(offline_hub):
    """lmm.min_pixels / lmm.max_pixels override the checkpoint's preprocessor_config.json (as the release's
    scripts pass max_pixels to the processor): under a budget of 20 to 24 cells (28 x 28 px each) a 600 x 900
    image keeps at most 24 cells and a 20 x 30 image gets at least 20. Other families and an empty range are
    config errors naming the key."""
    cell = 28 * 28
    budget = load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                      device=torch.device("cpu"), min_pixels=20 * cell, max_pixels=24 * cell)
    size = budget.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (20 * cell, 24 * cell)
    (large,) = budget.image_layouts(model_inputs(budget, [noise_image(600, 900)]))
    (small,) = budget.image_layouts(model_inputs(budget, [noise_image(20, 30)]))
    assert large.grid[0] * large.grid[1] <= 24 < 6 * 9 and small.grid[0] * small.grid[1] >= 20 > 2 * 3
    with pytest.raises(ConfigError, match="lmm.max_pixels .* family 'llava'"):
        load_lmm("llava", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"), max_pixels=cell)
    with pytest.raises(ConfigError, match=r"lmm.min_pixels \(10\) is above lmm.max_pixels \(5\)"):
        load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"), min_pixels=10, max_pixels=5)
