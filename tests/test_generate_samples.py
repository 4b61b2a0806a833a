"""Generate stage on samples: several questions about one image (a referring expression put into the
question), and teacher-forced answers scored in one forward pass, whose rows equal what generation
records when the forced answer is the generated one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_generate import CAPTIONS, noise

from stages import generate
from stages.config import ConfigError
from stages.generate import GenerateConfig, LMMConfig, forced_answer_ids
from stages.io.attention import attention_attrs, open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.toy.model import build_toy_llava


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(toy LLaVA folder, its tokenizer, an image file)."""
    from transformers import AutoProcessor

    folder = tmp_path_factory.mktemp("toy")
    path = build_toy_llava(folder / "llava", CAPTIONS, seed=0)
    image = folder / "scene.png"
    Image.fromarray(noise(40, 50, 0)).save(image)
    return path, AutoProcessor.from_pretrained(path).tokenizer, image


def sample(sample_id, image, expression=None, forced_answer=None, error=None):
    return {"sample_id": sample_id, "image_id": "scene", "file": str(image), "width": 50, "height": 40,
            "expression": expression, "forced_answer": forced_answer, "shard": 0, "error": error}


def run(tmp_path, toy_path, rows, name="run", **options):
    manifest = tmp_path / f"{name}-manifest.parquet"
    write_table(rows, manifest, "manifest")
    cfg = GenerateConfig(**{"max_new_tokens": 6, "batch_size": 2, **options})
    generations, attention = tmp_path / f"{name}.parquet", tmp_path / f"{name}.zarr"
    generate.run(cfg, LMMConfig(path=str(toy_path)), manifest, 0, generations, attention, device="cpu")
    table = read_table(generations, "generations")
    store = open_attention(attention)
    rows_of = {g.sample_id: read_rows(store, g.attention_offset, g.num_tokens, (g.grid_h, g.grid_w))
               for g in table.itertuples() if not isinstance(g.error, str)}
    return table, rows_of, attention


def test_each_sample_asks_about_its_own_expression(tmp_path, toy):
    path, _, image = toy
    samples = [sample("1-10", image, "the red square"), sample("1-11", image, "a cat"),
               sample("2-12", image, "it", error="image listed but missing")]
    table, _, _ = run(tmp_path, path, samples, question='Describe the "{expression}".')
    assert table["sample_id"].tolist() == ["1-10", "1-11", "2-12"]
    assert (table["image_id"] == "scene").all()
    assert table["prompt"][0].endswith('Describe the "the red square". ASSISTANT:')
    assert 'Describe the "a cat".' in table["prompt"][1] and table["error"][:2].isna().all()
    assert table["error"][2] == "manifest: image listed but missing"
    assert 'Describe the "it".' in table["prompt"][2]


@pytest.mark.parametrize("question, expression, message", [
    ("Describe the image.", "a cat", "has no {expression} to put it in"),
    ('Describe the "{expression}".', None, "has no expression"),
])
def test_question_and_expressions_must_go_together(tmp_path, toy, question, expression, message):
    path, _, image = toy
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, path, [sample("s", image, expression)], question=question)


def test_forcing_the_generated_answer_gives_the_generated_rows(tmp_path, toy):
    """Emitting semantics: token a_j gets the row of the query before it, as when it was generated; own
    semantics: its own query's row, i.e. the emitting row of the next token (one forward pass gives both)."""
    path, tokenizer, image = toy
    generated, generated_rows, _ = run(tmp_path, path, [sample("s", image)], name="generated")
    ids, answer = generated["token_ids"][0].tolist(), generated["answer"][0]
    assert generated["finish_reason"][0] == "length" and len(ids) == 6
    words = answer.split(" ")
    pieces = [words[0], " " + " ".join(words[1:])]
    assert forced_answer_ids(tokenizer, pieces)[0] == ids        # the toy tokenizer splits on words
    forced = [sample("s", image, forced_answer=pieces)]
    emitting, emitting_rows, store = run(tmp_path, path, forced, name="emitting", forced_rows="emitting")
    _, own_rows, own_store = run(tmp_path, path, forced, name="own", forced_rows="own")

    assert emitting["token_ids"][0].tolist() == ids and emitting["answer"][0] == answer
    assert emitting["finish_reason"][0] == "forced"
    assert emitting["token_pieces"][0].tolist() == forced_answer_ids(tokenizer, pieces)[1]
    assert set(emitting["token_pieces"][0]) == {0, 1}
    np.testing.assert_allclose(emitting_rows["s"], generated_rows["s"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(own_rows["s"][:-1], emitting_rows["s"][1:], rtol=1e-3, atol=1e-6)
    assert not np.allclose(own_rows["s"], emitting_rows["s"])
    assert attention_attrs(store)["forced_rows"] == "emitting"
    assert attention_attrs(own_store)["forced_rows"] == "own"


def test_forced_and_generated_samples_share_a_shard(tmp_path, toy):
    """A group of the shard with both kinds is answered as two batches; a forced answer that cannot be
    scored is that sample's error row only."""
    path, _, image = toy
    rows = [sample("gen", image), sample("forced", image, forced_answer=["A red square", " and a cat."]),
            sample("empty", image, forced_answer=[]), sample("image_token", image, forced_answer=["<image>"]),
            sample("missing", image.with_name("nowhere.png"), forced_answer=["A cat."])]
    table, rows_of, _ = run(tmp_path, path, rows, batch_size=4)
    by_id = table.set_index("sample_id")
    assert table["sample_id"].tolist() == ["gen", "forced", "empty", "image_token", "missing"]
    assert by_id.loc["gen", "finish_reason"] in ("eos", "length") and by_id.loc["gen", "token_pieces"] is None
    assert by_id.loc["forced", "finish_reason"] == "forced"
    assert rows_of["forced"].shape == (by_id.loc["forced", "num_tokens"], 12, 12)
    assert by_id.loc["empty", "error"] == "the forced answer has no pieces"
    assert "holds the image token" in by_id.loc["image_token", "error"]
    assert "nowhere.png" in by_id.loc["missing", "error"]


def eager_forced_rows(eager, image, question, answer_ids) -> np.ndarray:
    """The reference for a forced answer's "own" rows, from the published definition: one plain eager forward
    (``output_attentions``) of batch 1, no padding, over the prompt and the answer ids; token j's row is the
    mean over layers and heads of its own position's attention over the image's layout positions, float32
    (T, grid_h, grid_w). ``eager``: a LoadedLMM with eager attention."""
    import torch

    from stages.generate import build_prompt

    inputs = eager.processor(images=[image], text=[build_prompt(eager.processor, question, None)],
                             return_tensors="pt")
    answer = torch.tensor([answer_ids])
    length = inputs["input_ids"].shape[1]
    for key, value in list(inputs.items()):
        if isinstance(value, torch.Tensor) and value.shape[:2] == (1, length):
            tail = {"input_ids": answer, "attention_mask": torch.ones_like(answer)}.get(
                key, answer.new_zeros((1, len(answer_ids), *value.shape[2:])))
            inputs[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
    (layout,) = eager.image_layouts(inputs)
    with torch.no_grad():
        attentions = eager.model(**inputs, output_attentions=True).attentions
    own = torch.stack([a[0, :, -len(answer_ids):] for a in attentions]).float().mean(dim=(0, 1))
    return own[:, layout.positions].reshape(len(answer_ids), *layout.grid).numpy()


def forced_stage_rows(tmp_path, family, path, images, pieces, question):
    """stages.generate.run on ``images`` (name -> PIL image) in one batch, each forcing ``pieces`` with
    own-position rows; returns {name: (token ids, stored rows (T, h, w))}."""
    rows = []
    for name, image in images.items():
        image.save(tmp_path / f"{name}.png")
        rows.append({"sample_id": f"{name}-0", "image_id": name, "file": str(tmp_path / f"{name}.png"),
                     "width": image.width, "height": image.height, "forced_answer": pieces, "shard": 0})
    write_table(rows, tmp_path / "forced-manifest.parquet", "manifest")
    generate.run(GenerateConfig(question=question, batch_size=len(images), forced_rows="own"),
                 LMMConfig(family=family, path=path), tmp_path / "forced-manifest.parquet", 0,
                 tmp_path / "forced.parquet", tmp_path / "forced.zarr", device="cpu")
    table = read_table(tmp_path / "forced.parquet", "generations")
    store = open_attention(tmp_path / "forced.zarr")
    assert table["error"].isna().all() and (table["finish_reason"] == "forced").all()
    return {row.image_id: (row.token_ids.tolist(), read_rows(store, row.attention_offset, row.num_tokens,
                                                              (row.grid_h, row.grid_w)))
            for row in table.itertuples()}
