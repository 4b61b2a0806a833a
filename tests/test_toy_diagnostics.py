"""Diagnostics of the toy LMM: object-to-token-cell weights, the linear probe, the feature probe,
teacher-forced naming and the true caption's attention on a tiny trained model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stages.toy.diagnostics import (category_word_tokens, feature_probe, image_token_features,
                                    linear_probe_accuracy, object_cell_weights, teacher_forced_naming,
                                    true_caption_point_accuracy, true_caption_rows)
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


def test_true_caption_rows_are_what_generate_records_when_it_writes_the_caption(tiny_model):
    """The eager rows of one forward equal the rows the pipeline's capture records while generate is
    made to write the caption token by token."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from stages.capture import AttentionCapture, image_token_positions
    from stages.toy.train_lmm import IGNORE_INDEX, encode_example, preprocess_image
    from stages.toy.world import JPEG_QUALITY

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    question = TINY.questions[0]
    examples = [make_example(0, "train", i, TINY.image_size) for i in range(3)]
    computed = list(true_caption_rows(model, processor, examples, question, batch_size=2))  # padded batches
    assert [ex.scene.image_id for ex, _, _ in computed] == [ex.scene.image_id for ex in examples]
    model.set_attn_implementation({"text_config": "sdpa"})
    capture = AttentionCapture(model)
    for ex, answer_ids, rows in computed:
        ids, labels = encode_example(processor, question, ex.caption)
        answer_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert ids[answer_start:] == answer_ids and answer_ids[-1] == processor.tokenizer.eos_token_id
        prompt = torch.tensor([ids[:answer_start]])
        pixels = preprocess_image(ex.pixels, processor, jpeg_quality=JPEG_QUALITY)[None]
        with torch.inference_mode(), capture.recording(image_token_positions(prompt, model.config.image_token_id)):
            written = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels,
                                     do_sample=False, max_new_tokens=len(answer_ids),
                                     prefix_allowed_tokens_fn=lambda _, seq: [answer_ids[len(seq) - answer_start]])
        assert written[0, answer_start:].tolist() == answer_ids
        grid = TINY.model_image_size // TINY.patch_size
        assert rows.shape == (len(answer_ids), grid, grid)
        torch.testing.assert_close(rows.flatten(1), capture.rows()[0], rtol=1e-4, atol=1e-6)


def test_category_word_tokens_spell_each_objects_category(tiny_model):
    from transformers import AutoProcessor

    from stages.toy.train_lmm import IGNORE_INDEX, encode_example

    tokenizer = AutoProcessor.from_pretrained(tiny_model).tokenizer
    checked = 0
    for i in range(6):
        ex = make_example(0, "train", i, TINY.image_size)
        ids, labels = encode_example(AutoProcessor.from_pretrained(tiny_model), TINY.questions[0], ex.caption)
        answer = ids[next(j for j, label in enumerate(labels) if label != IGNORE_INDEX):]
        for obj, tokens in zip(ex.scene.objects, category_word_tokens(tokenizer, answer, ex)):
            assert tokens and tokens == list(range(tokens[0], tokens[-1] + 1))
            assert tokenizer.decode([answer[j] for j in tokens]).strip() == obj.shape
            checked += 1
    assert checked == sum(len(make_example(0, "train", i, TINY.image_size).scene.objects) for i in range(6))


def test_category_word_tokens_reject_a_phrase_that_is_not_in_the_caption(tiny_model):
    import dataclasses

    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_model).tokenizer
    ex = make_example(0, "train", 0, TINY.image_size)
    other = dataclasses.replace(ex, labels=["a purple nothing"] * len(ex.labels))
    with pytest.raises(ValueError, match="a purple nothing"):
        category_word_tokens(tokenizer, tokenizer(ex.caption, add_special_tokens=False)["input_ids"], other)


def test_true_caption_point_accuracy_scores_every_object_against_its_area(tiny_model):
    result = true_caption_point_accuracy(tiny_model, split="train", num_images=6, image_size=TINY.image_size)
    examples = [make_example(0, "train", i, TINY.image_size) for i in range(6)]
    masks = [(ex, obj, mask) for ex in examples for obj, mask in zip(ex.scene.objects, ex.masks)]
    assert result["unscored_captions"] == 0 and result["phrases"] == len(masks)
    assert result["object_chance"] == pytest.approx(np.mean([mask.mean() for _, _, mask in masks]))
    assert result["chance"] == pytest.approx(np.mean([ex.union_mask(shape=obj.shape).mean() for ex, obj, _ in masks]))
    # A point on the very object named is on an object of its category.
    assert 0.0 <= result["object_point_accuracy"] <= result["point_accuracy"] <= 1.0
