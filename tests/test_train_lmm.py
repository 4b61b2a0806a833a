"""Caption-only training of the toy LLaVA: loss mask, one step, determinism, stock loading + generate."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from stages.io.tables import read_table
from stages.toy.diagnostics import point_accuracy
from stages.toy.train_lmm import (IGNORE_INDEX, TrainLmmConfig, Trainer, answer_loss, collate, encode_example,
                                  train_toy_llava)
from stages.toy.world import make_example

TINY = TrainLmmConfig(num_train_images=6, steps=2, batch_size=3, lr=1e-2, warmup_steps=1, image_size=(48, 64),
                      model_image_size=32, patch_size=8, vision_hidden_size=32, text_hidden_size=32)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(TINY, tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_toy_llava(tmp_path_factory.mktemp("trained") / "llava", TINY)


def test_loss_mask_covers_only_the_answer(trainer):
    processor = trainer.processor
    tokenizer = processor.tokenizer
    caption = make_example(TINY.world_seed, "train", 0, TINY.image_size).caption   # in the vocabulary
    for question in TINY.questions:
        ids, labels = encode_example(processor, question, caption)
        image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        assert ids.count(image_id) == (TINY.model_image_size // TINY.patch_size) ** 2
        answer_start = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
        # Everything before the answer (system/user words, every image token, "ASSISTANT:") is masked ...
        assert all(label == IGNORE_INDEX for label in labels[:answer_start])
        assert max(j for j, token in enumerate(ids) if token == image_id) < answer_start
        assert tokenizer.decode(ids[:answer_start]).endswith("ASSISTANT:")
        # ... and everything after is supervised: exactly the caption and the end of sequence.
        assert labels[answer_start:] == ids[answer_start:]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[answer_start:-1]).strip() == caption
    batch = collate(trainer.data, [0, 1], [0, 1], trainer.pad_id)
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all()


def test_one_step_changes_weights_and_lowers_loss(tmp_path):
    trainer = Trainer(TINY, tmp_path)
    batch = trainer.next_batch()
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with torch.no_grad():
        loss0 = float(answer_loss(trainer.model, batch))
    step_loss = trainer.step(batch)
    with torch.no_grad():
        loss1 = float(answer_loss(trainer.model, batch))
    assert step_loss == pytest.approx(loss0, rel=1e-5)
    assert loss1 < loss0
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    # The vision tower, the projector and the language model all learn.
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        assert any(part in name for name in changed), part


def test_same_seed_same_weights(trained, tmp_path, caplog, capsys):
    from safetensors.torch import load_file

    caplog.set_level(logging.INFO, logger="stages.toy.train_lmm")
    again = train_toy_llava(tmp_path / "again", TINY)
    # progress: log lines (one per step for a 2-step run), never tqdm refreshes
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train toy llava")]
    assert len(lines) == TINY.steps
    assert re.fullmatch(r"train toy llava: step 2/2, loss \d+\.\d{3}, \d+ s elapsed, ETA 0 s", lines[-1])
    assert "train toy llava" not in capsys.readouterr().err  # no bar (libraries may draw theirs)
    first, second = load_file(trained / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train_toy_llava(tmp_path / "other", dataclasses.replace(TINY, seed=1))
    third = load_file(other / "model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_saved_model_loads_with_stock_classes_and_generates(trained, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(trained)
    processor = AutoProcessor.from_pretrained(trained)
    assert model.config.vision_config.image_size == TINY.model_image_size
    assert processor.tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert not list(trained.parent.glob(".*tmp*"))
    # generate.run (and the phrases stage) on a 2-image manifest of the val split.
    result = point_accuracy(trained, tmp_path / "eval", num_images=2, image_size=TINY.image_size,
                            max_new_tokens=6)
    generations = read_table(tmp_path / "eval" / "generations.parquet", "generations")
    assert len(generations) == 2 and generations["error"].isna().all()
    assert (generations["num_tokens"] > 0).all()
    assert result["images"] == 2


def test_diagnostics_cli_writes_strict_json_and_a_table(trained, tmp_path, capsys):
    import json

    from stages.toy import diagnostics

    out = tmp_path / "diagnostics.json"
    diagnostics.main(["--model", str(trained), "--split", "train", "--num-images", "4", "--image-size", "48", "64",
                      "--question", TINY.questions[0], "--out", str(out)])
    report = json.loads(out.read_text())     # strict: NaN (nothing to score) is written as null
    assert report["settings"] == {"split": "train", "num_images": 4, "world_seed": 0, "image_size": [48, 64],
                                  "question": TINY.questions[0]}
    (result,) = report["models"].values()
    assert set(result) == {"probe", "naming", "attention", "attention_true_caption"}
    assert f"| {trained} |" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("# Toy LMM diagnostics")


def test_untrained_twin_has_the_trained_models_architecture_and_initial_weights(tmp_path):
    from safetensors.torch import load_file

    from stages.toy.train_lmm import TrainLmmConfig, init_toy_llava, train_toy_llava

    cfg = TrainLmmConfig(num_train_images=8, steps=1, batch_size=2)
    untrained = load_file(init_toy_llava(tmp_path / "random", cfg) / "model.safetensors")
    again = load_file(init_toy_llava(tmp_path / "again", cfg) / "model.safetensors")
    trained = load_file(train_toy_llava(tmp_path / "trained", cfg) / "model.safetensors")
    assert untrained.keys() == trained.keys()
    assert all(untrained[k].shape == trained[k].shape for k in untrained)
    assert all(torch.equal(untrained[k], again[k]) for k in untrained)
    assert any(not torch.equal(untrained[k], trained[k]) for k in untrained)
