"""SAM registry, checkpoint loading and the embedded toy SAM."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.config import ConfigError
from stages.models.sam import SAM_BUILDERS, build_toy_sam, load_sam


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    return build_toy_sam(tmp_path_factory.mktemp("sam") / "toy.safetensors", seed=0)


def test_registry_names_the_released_and_toy_architectures():
    assert set(SAM_BUILDERS) == {"vit_h", "vit_l", "vit_b", "tiny"}


def test_toy_build_is_deterministic_and_leaves_the_global_rng_alone(tmp_path, toy_checkpoint):
    rng_before = torch.random.get_rng_state()
    again = load_file(build_toy_sam(tmp_path / "again.safetensors", seed=0))
    other = load_file(build_toy_sam(tmp_path / "other.safetensors", seed=1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    first = load_file(toy_checkpoint)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_pth_and_safetensors_load_the_same_weights(tmp_path, toy_checkpoint):
    state = load_file(toy_checkpoint)
    pth = tmp_path / "toy.pth"
    torch.save(state, pth)
    from_pth = load_sam("tiny", pth, "cpu")
    from_safetensors = load_sam("tiny", toy_checkpoint, "cpu")
    for model in (from_pth, from_safetensors):
        assert not model.training
        loaded = model.state_dict()
        assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], state[k]) for k in state)


def test_toy_sam_predicts_three_masks_per_prompt_at_the_image_size(toy_checkpoint):
    from segment_anything import SamPredictor

    predictor = SamPredictor(load_sam("tiny", toy_checkpoint))
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    coords = predictor.transform.apply_coords_torch(torch.tensor([[[5.0, 7.0]], [[40.0, 20.0]]]), (30, 50))
    masks, scores, low_res = predictor.predict_torch(coords, torch.ones(2, 1), multimask_output=True)
    assert masks.shape == (2, 3, 30, 50) and masks.dtype == torch.bool
    assert scores.shape == (2, 3)
    assert low_res.shape == (2, 3, *predictor.model.prompt_encoder.mask_input_size)


def test_unknown_type_lists_the_known_ones(toy_checkpoint):
    with pytest.raises(ConfigError, match=r"unknown SAM type 'vit_x'.*'tiny'.*'vit_b'.*'vit_h'.*'vit_l'"):
        load_sam("vit_x", toy_checkpoint)


def test_missing_checkpoint_names_its_path(tmp_path):
    missing = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(ConfigError, match="not found.*nowhere"):
        load_sam("tiny", missing)


def test_unknown_checkpoint_format(tmp_path):
    odd = tmp_path / "sam.ckpt"
    odd.write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown format '.ckpt'"):
        load_sam("tiny", odd)


def test_state_dict_mismatch_names_the_keys(tmp_path, toy_checkpoint):
    state = load_file(toy_checkpoint)
    dropped = "mask_decoder.iou_token.weight"
    reshaped = "image_encoder.pos_embed"
    del state[dropped]
    state[reshaped] = torch.zeros(1, 2, 2, 48)
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    with pytest.raises(ConfigError) as info:
        load_sam("tiny", broken)
    message = str(info.value)
    assert "does not fit SAM type 'tiny'" in message
    assert f"1 missing keys (e.g. {dropped})" in message
    assert "1 unexpected keys (e.g. extra.weight)" in message
    assert f"1 shape mismatches (e.g. {reshaped}: checkpoint (1, 2, 2, 48) vs model (1, 16, 16, 48))" \
        in message


def test_pth_holding_something_else_than_a_state_dict(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="plain state dict"):
        load_sam("tiny", path)
