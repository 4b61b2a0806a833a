"""Diagnostics of the toy LMM: object-to-token-cell weights, the linear probe, the feature probe and
teacher-forced naming on a tiny trained model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stages.toy.diagnostics import (feature_probe, image_token_features, linear_probe_accuracy,
                                    object_cell_weights, teacher_forced_naming)
from stages.toy.train_lmm import TrainLmmConfig, train_toy_llava
from stages.toy.world import COLOURS, SHAPES, make_example

TINY = TrainLmmConfig(num_train_images=6, steps=2, batch_size=3, lr=1e-2, warmup_steps=1, image_size=(48, 64),
                      model_image_size=32, patch_size=8, vision_hidden_size=32, text_hidden_size=32)

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return train_toy_llava(tmp_path_factory.mktemp("trained") / "llava", TINY)

def _mask(height, width, rows=slice(None), columns=slice(None)):
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, columns] = True
    return mask

@pytest.mark.parametrize(("mask", "side", "grid", "expected"), [
    # A square image, fully covered: every cell is covered.
    (_mask(8, 8), 8, 2, [[1, 1], [1, 1]]),
    # Its top-left quarter: one cell.
    (_mask(8, 8, slice(0, 4), slice(0, 4)), 8, 2, [[1, 0], [0, 0]]),
    # A wide image (4 x 8) is padded to 8 x 8 with two rows above and below: the whole image covers
    # half of every cell.
    (_mask(4, 8), 8, 2, [[0.5, 0.5], [0.5, 0.5]]),
    # A tall image (8 x 4): two padding columns left and right; its columns 0..1 land in padded
    # columns 2..3, half of each left cell.
    (_mask(8, 4, slice(None), slice(0, 2)), 8, 2, [[0.5, 0], [0.5, 0]]),
    # The side the model resizes to does not change the shares, only the grid does.
    (_mask(6, 6, slice(0, 2), slice(None)), 96, 3, [[1, 1, 1], [0, 0, 0], [0, 0, 0]]),
])
def test_object_cell_weights_follow_the_square_padding(mask, side, grid, expected):
    np.testing.assert_allclose(object_cell_weights(mask, side, grid), np.array(expected, dtype=np.float32))

def test_linear_probe_separates_what_is_separable_and_not_what_is_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=400)
    centres = rng.normal(size=(3, 8)) * 4
    separable = centres[labels] + rng.normal(size=(400, 8))
    assert linear_probe_accuracy(separable, labels) > 0.95
    noise = rng.normal(size=(400, 8))
    assert linear_probe_accuracy(noise, labels) < 0.5      # chance is about 1/3
    with pytest.raises(ValueError, match="both sides"):
        linear_probe_accuracy(noise[:1], labels[:1])

def test_feature_probe_counts_every_object_and_reports_both_layers(tiny_model):
    result = feature_probe(tiny_model, split="train", num_images=6, image_size=TINY.image_size)
    objects = sum(len(make_example(0, "train", i, TINY.image_size).scene.objects) for i in range(6))
    assert result["objects"] == objects
    for layer in ("tower", "projector", "chance"):
        assert set(result[layer]) == {"shape", "colour"}
        assert all(0.0 <= value <= 1.0 for value in result[layer].values())

def test_image_token_features_are_what_the_language_model_is_given(tiny_model):
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model).eval()
    pixels = torch.randn(2, 3, 32, 32)
    tower, projected = image_token_features(model, pixels)
    grid = (32 // 8) ** 2
    assert tower.shape == (2, grid, 32) and projected.shape[:2] == (2, grid)
    with torch.no_grad():
        given = model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(projected, torch.stack(list(given)))

def test_teacher_forced_naming_scores_every_colour_shape_pair(tiny_model):
    result = teacher_forced_naming(tiny_model, split="train", num_images=6, image_size=TINY.image_size)
    expected_pairs = 0
    for i in range(6):
        words = make_example(0, "train", i, TINY.image_size).caption.lower().replace(".", " ").split()
        expected_pairs += sum(a in COLOURS and b in SHAPES for a, b in itertools.pairwise(words))
    assert result["unscored_captions"] == 0                      # train captions are in the vocabulary
    assert result["pairs"] == expected_pairs > 0
    confusion = np.array(result["shape_confusion"])
    assert confusion.shape == (len(SHAPES), len(SHAPES)) and confusion.sum() == expected_pairs
    assert result["shape_given_colour"] == pytest.approx(np.trace(confusion) / expected_pairs)
    assert 0.0 <= result["colour"] <= 1.0
