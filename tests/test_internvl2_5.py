"""The internvl2_5 family's loader and its place in the pipeline, on tiny checkpoints in the published hub
layout (tests/internvl_hub.py): the registry and config keys, what the loader refuses, the InternLM2 key
conversion, and the generate and segment stages on stitched-tile and thumbnail grids. That tokens and
attention rows equal an independent eager implementation of the published model is
tests/test_internvl2_5_reference.py's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fake_hub import snapshot, use_offline_cache
from internvl_hub import write_internvl_checkpoint
from PIL import Image

from stages.config import ConfigError
from stages.models.registry import LMM_FAMILIES, load_lmm

REPO_ID = "OpenGVLab/InternVL2_5-8B"
QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 3
# name: ((height, width), (tile rows, tile columns) under the release's 3..9 tiles)
STAGE_IMAGES = {"wide": ((120, 360), (1, 3)), "tall": ((300, 200), (3, 2))}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A fake hub cache holding the InternLM2 checkpoint; returns (cache, snapshot folder)."""
    cache = tmp_path_factory.mktemp("hub")
    folder = snapshot(cache, REPO_ID)
    write_internvl_checkpoint(folder)
    return cache, folder


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    use_offline_cache(monkeypatch, hub_cache[0])
    return hub_cache


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def load(path: str, **options) -> object:
    return load_lmm("internvl2_5", path, dtype=torch.float32, attn_implementation="sdpa",
                    device=torch.device("cpu"), **options)


def test_family_is_registered_with_its_grids_and_tile_range():
    spec = LMM_FAMILIES["internvl2_5"]
    assert spec.grid_choices == ("tiles", "thumbnail") and spec.takes_tiles and not spec.takes_base


def test_tile_range_is_a_config_key_of_this_family_only(offline_hub):
    """lmm.min_tiles / lmm.max_tiles set the tiling (the checkpoint's 1..12 otherwise); another family, an
    empty range or an unknown grid are config errors naming the key."""
    own = load(REPO_ID)
    release = load(REPO_ID, min_tiles=3, max_tiles=9)
    assert (own.processor.image_processor.min_patches, own.processor.image_processor.max_patches) == (1, 12)
    assert (release.processor.image_processor.min_patches, release.processor.image_processor.max_patches) == (3, 9)
    with pytest.raises(ConfigError, match="lmm.max_tiles .* family 'qwen2_5_vl'"):
        load_lmm("qwen2_5_vl", REPO_ID, dtype=torch.float32, attn_implementation="sdpa", device="cpu",
                 max_tiles=4)
    with pytest.raises(ConfigError, match=r"lmm.min_tiles \(5\) is above lmm.max_tiles \(2\)"):
        load(REPO_ID, min_tiles=5, max_tiles=2)
    with pytest.raises(ConfigError, match="lmm.grid 'highres' unknown for family 'internvl2_5'"):
        load(REPO_ID, grid="highres")


def edited_copy(source, destination, file: str, edit) -> str:
    """A copy of the checkpoint folder ``source`` with ``edit(data)`` applied to the JSON ``file``."""
    shutil.copytree(source, destination)
    data = json.loads((destination / file).read_text())
    edit(data)
    (destination / file).write_text(json.dumps(data))
    return str(destination)


@pytest.mark.parametrize("file, edit, message", [
    ("config.json", lambda c: c.update(template="internlm2-chat"), "template = 'internlm2-chat'"),
    ("config.json", lambda c: c.update(ps_version="v1"), "ps_version = 'v1'"),
    ("config.json", lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]),
     "supports InternLM2ForCausalLM and Qwen2ForCausalLM"),
    ("config.json", lambda c: c["llm_config"].update(num_hidden_layers=3), "do not fit its config.json"),
    ("tokenizer_config.json", lambda t: t["added_tokens_decoder"].pop(next(
        k for k, v in t["added_tokens_decoder"].items() if v["content"] == "<IMG_CONTEXT>")),
     r"lacks the InternVL tokens \['<IMG_CONTEXT>'\]"),
])
def test_checkpoints_that_are_not_internvl2_5_are_config_errors(hub_cache, tmp_path, file, edit, message):
    folder = edited_copy(hub_cache[1], tmp_path / "copy", file, edit)
    with pytest.raises(ConfigError, match=message):
        load(folder)


def test_no_code_of_the_checkpoint_runs(hub_cache):
    """The published folder's remote-code files (here: files that raise when imported) are never run: the
    checkpoint loads, and no module imported comes from its folder."""
    import sys
    from pathlib import Path

    folder = hub_cache[1].resolve()
    assert list(folder.glob("*.py"))
    load(str(folder))
    assert not [name for name, module in list(sys.modules.items())
                if getattr(module, "__file__", None) and Path(module.__file__).resolve().parent == folder]


def test_internlm2_wqkv_rows_split_per_key_value_head():
    """wqkv rows are (kv head, [its query heads, key, value], head_dim): 4 query heads over 2 kv heads."""
    from stages.models.internvl2_5 import _split_wqkv

    heads, kv_heads, head_dim = 4, 2, 3
    labels = [(kv, slot, d) for kv in range(kv_heads) for slot in range(heads // kv_heads + 2)
              for d in range(head_dim)]
    weight = torch.tensor([[kv * 100 + slot * 10 + d] for kv, slot, d in labels], dtype=torch.float32)
    q, k, v = _split_wqkv(weight, heads, kv_heads)
    assert q[:, 0].tolist() == [kv * 100 + g * 10 + d for kv in range(2) for g in range(2) for d in range(3)]
    assert k[:, 0].tolist() == [kv * 100 + 20 + d for kv in range(2) for d in range(3)]
    assert v[:, 0].tolist() == [kv * 100 + 30 + d for kv in range(2) for d in range(3)]


def test_thumbnail_grid_is_the_last_image_and_layouts_need_their_tiles(offline_hub):
    """grid thumbnail: the last 256 image tokens, row-major on 16 x 16 (the release's
    --use-thumbnail-attention); the tile arrangement travels beside the inputs and never reaches the model;
    inputs without it, or with other image token counts, are refused."""
    lmm = load(REPO_ID, min_tiles=3, max_tiles=9, grid="thumbnail")
    inputs = lmm.processor(images=[noise_image(120, 360)], text=["<IMG_CONTEXT>\nhi"], return_tensors="pt")
    assert inputs["tile_grids"].tolist() == [[1, 3]] and "tile_grids" not in lmm.model_inputs(inputs)
    (layout,) = lmm.image_layouts(inputs)
    image_positions = (inputs["input_ids"][0] == lmm.image_token_id).nonzero()[:, 0]
    assert layout.grid == (16, 16) and torch.equal(layout.positions, image_positions[3 * 256:])
    with pytest.raises(ValueError, match="tile_grids"):
        lmm.image_layouts({"input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match="expected 256 per image for 1 x 3 tiles and the thumbnail"):
        lmm.image_layouts({"input_ids": inputs["input_ids"][:, :-300], "tile_grids": inputs["tile_grids"]})


def test_generate_and_segment_stages_on_stitched_tiles(offline_hub, tmp_path):
    """stages.generate.run on two images of different tile arrangements in one left-padded batch: each
    row's grid is its tiles' 16 x 16 grids stitched (rows x 16, columns x 16); the store says the grid covers the whole image; a peak planted in a stored map through the
    table's offset and grid is where stages.segment.run puts the point, at its cell's centre with the grid
    stretched over the whole image."""
    from stages import generate, segment
    from stages.generate import GenerateConfig, LMMConfig
    from stages.io.attention import attention_attrs
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
    paths = {name: tmp_path / f"{name}.parquet" for name in ("generations", "phrases", "masks")}
    attention = tmp_path / "attention.zarr"
    generate.run(GenerateConfig(question=QUESTION, max_new_tokens=MAX_NEW_TOKENS, batch_size=2),
                 LMMConfig(family="internvl2_5", path=REPO_ID, min_tiles=3, max_tiles=9),
                 tmp_path / "manifest.parquet", 0, paths["generations"], attention, device="cpu")
    table = read_table(paths["generations"], "generations")
    assert table["error"].isna().all() and attention_attrs(attention)["grid_covers"] == "image"
    for row in table.itertuples():
        tiles = STAGE_IMAGES[row.image_id][1]
        assert (row.grid_h, row.grid_w) == (16 * tiles[0], 16 * tiles[1]) and row.num_tokens >= 1

    import zarr

    values = zarr.open_group(str(attention), mode="r+")["values"]
    planted = {}
    for row in table.itertuples():
        r, c = row.grid_h - 3, 2                                   # near the bottom-left corner
        values[row.attention_offset + r * row.grid_w + c] = values[row.attention_offset + r * row.grid_w + c] + 5.0
        planted[row.image_id] = (r, c, row.grid_h, row.grid_w)
    write_table([{"image_id": name, "phrase_index": 0, "text": "token 0", "token_indices": [0], "category_id": 1}
                 for name in names], paths["phrases"], "phrases")
    sam = segment.SamConfig(type="tiny", checkpoint=str(build_toy_sam(tmp_path / "sam.safetensors", seed=0)))
    segment.run(segment.SegmentConfig(prompt="point"), sam, tmp_path / "manifest.parquet",
                paths["generations"], attention, paths["phrases"], paths["masks"], device="cpu")
    for mask in read_arrow(paths["masks"], "masks").to_pylist():
        (height, width), _ = STAGE_IMAGES[mask["image_id"]]
        r, c, rows, columns = planted[mask["image_id"]]
        assert mask["error"] is None
        assert abs(mask["point_x"] + 0.5 - (c + 0.5) * width / columns) <= 1, mask
        assert abs(mask["point_y"] + 0.5 - (r + 0.5) * height / rows) <= 1, mask


def test_forced_pieces_take_the_release_suffix(offline_hub):
    """generate.forced_piece_suffix " " (the release's InternVL2.5 PNG script: utterance + ' ') tokenises each
    piece with the space, which becomes a token of that piece."""
    from stages.generate import forced_answer_ids

    tokenizer = load(REPO_ID).processor.tokenizer
    pieces = ["a red circle", "on the grass"]
    plain, plain_pieces = forced_answer_ids(tokenizer, pieces)
    spaced, spaced_pieces = forced_answer_ids(tokenizer, pieces, " ")
    assert spaced == [i for piece in pieces for i in tokenizer(piece + " ", add_special_tokens=False)["input_ids"]]
    assert len(spaced) > len(plain) and spaced != plain
    assert spaced_pieces == sorted(spaced_pieces) and set(spaced_pieces) == set(plain_pieces) == {0, 1}
