"""Sampled generation (generate.do_sample): the settings are checked, a seed reproduces a run, a sample's
answer does not depend on its batch or shard, and the rows are those of the tokens drawn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_generate import CAPTIONS, noise

from stages import generate
from stages.config import ConfigError, from_mapping, stage_sections
from stages.generate import GenerateConfig, LMMConfig, forced_answer_ids
from stages.io.attention import open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.sampling import SeededSampler, draw_token, sample_seed
from stages.toy.model import build_toy_llava

ROOT = Path(__file__).resolve().parents[1]
QUESTION = 'Describe the "{expression}".'
# Expressions of different lengths: the prompts of one batch are left-padded to different extents.
EXPRESSIONS = {"a": "red square", "b": "a small dog and a cat", "c": "circle", "d": "blue"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(untrained toy LLaVA folder: its next-token distribution is spread over the vocabulary, its
    tokenizer, a folder for runs, two image files)."""
    from transformers import AutoProcessor

    folder = tmp_path_factory.mktemp("sampling")
    path = build_toy_llava(folder / "llava", CAPTIONS, seed=0)
    images = []
    for k, (height, width) in enumerate(((40, 50), (64, 30))):
        images.append(folder / f"scene{k}.png")
        Image.fromarray(noise(height, width, k)).save(images[-1])
    return path, AutoProcessor.from_pretrained(path).tokenizer, folder, images


def samples(images, shards=(0, 0, 0, 0), forced=None):
    """Manifest rows of the samples a..d (alternating images), each asking about its own expression."""
    forced = forced or {}
    return [{"sample_id": sample_id, "image_id": f"scene{k % 2}", "file": str(images[k % 2]), "width": None,
             "height": None, "expression": expression, "forced_answer": forced.get(sample_id), "shard": shard}
            for k, ((sample_id, expression), shard) in enumerate(zip(EXPRESSIONS.items(), shards))]


def run(toy, name, rows, shard=0, **options):
    """generate.run on one shard of ``rows``; {sample_id: (token ids, rows (T, h, w))}."""
    path, _, folder, _ = toy
    manifest = folder / f"{name}-manifest.parquet"
    write_table(rows, manifest, "manifest")
    cfg = GenerateConfig(**{"question": QUESTION, "max_new_tokens": 6, "batch_size": 4, "do_sample": True,
                            "temperature": 1.0, **options})
    generations, attention = folder / f"{name}-{shard}.parquet", folder / f"{name}-{shard}.zarr"
    generate.run(cfg, LMMConfig(path=str(path)), manifest, shard, generations, attention, device="cpu")
    table = read_table(generations, "generations")
    assert table["error"].isna().all()
    store = open_attention(attention)
    return {g.sample_id: (g.token_ids.tolist(), read_rows(store, g.attention_offset, g.num_tokens, (g.grid_h, g.grid_w)))
            for g in table.itertuples()}


@pytest.fixture(scope="module")
def seeded(toy):
    """The four samples in one batch of one shard, seed 0."""
    return run(toy, "seeded", samples(toy[3]), seed=0)


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("do_sample", "yes", "generate.do_sample must be true or false"),
    ("temperature", 0, r"generate.temperature must be a finite number > 0"),
    ("temperature", -0.5, r"generate.temperature must be a finite number > 0"),
    ("temperature", math.inf, r"generate.temperature must be a finite number > 0"),
    ("temperature", math.nan, r"generate.temperature must be a finite number > 0"),
    ("temperature", True, r"generate.temperature must be a finite number > 0"),
    ("top_p", 0, r"generate.top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"generate.top_p must be a number in \(0, 1\]"),
    ("top_p", "all", r"generate.top_p must be a number in \(0, 1\]"),
    ("seed", -1, "generate.seed must be an integer >= 0"),
    ("seed", 1.5, "generate.seed must be an integer >= 0"),
    ("seed", False, "generate.seed must be an integer >= 0"),
])
def test_bad_sampling_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(GenerateConfig, {key: value}, where="generate")


def test_greedy_is_the_default_and_the_paper_presets_setting():
    """The shipped config and every preset decode greedily (the release's documented commands pass
    --temperature 0.0, also over its InternVL2.5 scripts' default 0.2)."""
    assert GenerateConfig().do_sample is False
    paper = sorted((ROOT / "config" / "paper").glob("*.yaml"))
    assert len(paper) >= 20
    for path in [ROOT / "config.yaml", *paper]:
        config = yaml.safe_load(path.read_text())
        sections = [config.get("generate")] + [stage_sections(config, "main", dataset)["generate"]
                                               for dataset in config.get("datasets") or {}]
        for section in sections:
            assert from_mapping(GenerateConfig, section).do_sample is False, path.name


def test_draw_token_follows_temperature_and_top_p():
    scores = torch.log(torch.tensor([0.2, 0.5, 0.3, 0.0]))          # token 3 is forbidden (-inf)
    generator = torch.Generator().manual_seed(0)
    draws = [draw_token(scores, 1.0, 1.0, generator) for _ in range(3000)]
    assert np.allclose(np.bincount(draws, minlength=4) / 3000, [0.2, 0.5, 0.3, 0.0], atol=0.03)
    # top_p 0.75: the most likely tokens up to the first reaching 0.75 (0.5 + 0.3): tokens 1 and 2, 5:3.
    draws = [draw_token(scores, 1.0, 0.75, generator) for _ in range(3000)]
    assert np.allclose(np.bincount(draws, minlength=4) / 3000, [0, 0.625, 0.375, 0], atol=0.03)
    # A tiny top_p or temperature leaves the most likely token only: greedy.
    assert {draw_token(scores, 1.0, 1e-9, generator) for _ in range(50)} == {1}
    assert {draw_token(scores, 1e-6, 1.0, generator) for _ in range(50)} == {1}
    # The same seed gives the same sequence of draws.
    first, again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [draw_token(scores, 1.0, 1.0, first) for _ in range(20)] == \
        [draw_token(scores, 1.0, 1.0, again) for _ in range(20)]


def test_the_sampler_leaves_greedy_one_token_per_row():
    sampler = SeededSampler([sample_seed(0, "a"), sample_seed(0, "b")], temperature=1.0, top_p=1.0)
    scores = torch.randn(2, 9)
    chosen = sampler(torch.zeros(2, 3, dtype=torch.long), scores)
    assert chosen.shape == scores.shape and chosen.dtype == scores.dtype
    assert (torch.isfinite(chosen).sum(dim=1) == 1).all() and (chosen.max(dim=1).values == 0).all()
    assert sample_seed(0, "a") != sample_seed(0, "b") != sample_seed(1, "b")
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler(torch.zeros(3, 3, dtype=torch.long), torch.randn(3, 9))


# --- runs ---------------------------------------------------------------------------------------

def test_one_seed_reproduces_a_run_and_another_changes_it(toy, seeded):
    again = run(toy, "again", samples(toy[3]), seed=0)
    for sample_id, (ids, rows) in seeded.items():
        assert again[sample_id][0] == ids
        np.testing.assert_array_equal(again[sample_id][1], rows)
    other = run(toy, "other", samples(toy[3]), seed=1)
    assert [ids for ids, _ in other.values()] != [ids for ids, _ in seeded.values()]


def test_a_sample_answers_alone_as_in_a_batch_or_another_shard(toy, seeded):
    alone = run(toy, "alone", samples(toy[3]), seed=0, batch_size=1)
    sharded_rows = samples(toy[3], shards=(1, 0, 1, 0))
    sharded = {**run(toy, "sharded", sharded_rows, shard=0, seed=0, batch_size=2),
               **run(toy, "sharded", sharded_rows, shard=1, seed=0, batch_size=2)}
    for other in (alone, sharded):
        assert other.keys() == seeded.keys()
        for sample_id, (ids, rows) in seeded.items():
            assert other[sample_id][0] == ids, sample_id
            np.testing.assert_allclose(other[sample_id][1], rows, rtol=1e-2, atol=1e-3)


def test_sampled_rows_are_the_rows_of_the_tokens_forced_as_an_answer(toy, seeded):
    """The rows recorded while sampling equal the "emitting" rows of the same tokens forced: each row is
    the query that emitted the drawn token."""
    _, tokenizer, _, images = toy
    special = set(tokenizer.all_special_ids)
    forced = {}
    for sample_id, (ids, _) in seeded.items():
        answer = tokenizer.decode(ids)
        if not special & set(ids) and forced_answer_ids(tokenizer, [answer])[0] == ids:
            forced[sample_id] = [answer]
    assert forced, "some sampled answer reads back to its own tokens"
    scored = run(toy, "forced", samples(images, forced=forced), forced_rows="emitting")
    for sample_id in forced:
        assert scored[sample_id][0] == seeded[sample_id][0]
        np.testing.assert_allclose(scored[sample_id][1], seeded[sample_id][1], rtol=1e-2, atol=1e-3)
