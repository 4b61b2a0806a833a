"""Teacher-forced capture: one forward pass over prompt + forced answer, recording the last
``queries`` query positions, gives every answer token the row that generation records when it emits
that token ("emitting") and the row of the token's own position ("own"), which equals the eager
``output_attentions`` row there."""

# ruff: noqa: F811 (the tests take test_capture's fixture `toy`, imported below, as their argument)
from __future__ import annotations

import pytest
import torch
from test_capture import (
    LONG_PROMPT,
    MAX_NEW_TOKENS,
    SHORT_PROMPT,
    gpu_models,
    model_inputs,
    toy,  # noqa: F401 (the toy LLaVA fixture: (sdpa, eager, processor), mha and gqa)
)

from stages.capture import (
    AttentionCapture,
    _additive_mask_row,
    _Recording,
    forced_rows,
    image_token_positions,
    left_pad,
)

BATCHES = {"batch1": [LONG_PROMPT], "left-padded-batch2": [LONG_PROMPT, SHORT_PROMPT]}


def generated(model, inputs, layers="all", heads="all") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy answers (each item's generated ids up to and including its first end of sequence) and the
    captured generation rows (B, steps, N_img). Padding and image tokens are never generated (the toy's
    random weights would emit them), so that an answer can be fed back as text."""
    config = model.config
    capture = AttentionCapture(model, layers=layers, heads=heads)
    with torch.no_grad(), capture.recording(image_token_positions(inputs["input_ids"], config.image_token_id)):
        sequences = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                   suppress_tokens=[config.pad_token_id, config.image_token_id])
    answers = []
    for ids in sequences[:, inputs["input_ids"].shape[1]:]:
        ends = (ids == model.generation_config.eos_token_id).nonzero()
        answers.append(ids if len(ends) == 0 else ids[:int(ends[0]) + 1])
    return answers, capture.rows()


def forced_batch(inputs, answers: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs of each item's unpadded prompt followed by its answer, left-padded into one batch."""
    prompts = [ids[mask.bool()] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    input_ids, attention_mask = left_pad([torch.cat([p, a]) for p, a in zip(prompts, answers, strict=True)], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": inputs["pixel_values"]}


def forced_query_rows(model, batch, queries: int, layers="all", heads="all") -> list[torch.Tensor]:
    """query_rows() of one forward pass over ``batch`` recording the last ``queries`` positions."""
    capture = AttentionCapture(model, layers=layers, heads=heads)
    positions = image_token_positions(batch["input_ids"], model.config.image_token_id)
    with torch.no_grad(), capture.recording(positions, queries=queries):
        model(**batch)
    return capture.query_rows()


@pytest.mark.parametrize("cut", [None, [3, None]], ids=["full", "first-cut-to-3"])
@pytest.mark.parametrize("prompts", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize(("layers", "heads"), [("all", "all"), ([0, -1], [1, 3])], ids=["all", "selected"])
def test_emitting_rows_equal_the_rows_generation_records(toy, prompts, cut, layers, heads):
    """Forcing the generated answers back gives, with "emitting" semantics, each token the row of the
    step that generated it, also when the batch's answers differ in length (an end of sequence, or
    an answer cut short) and the forced batch is padded differently from the generation's."""
    sdpa, _, processor = toy
    inputs = model_inputs(processor, prompts)
    answers, rows = generated(sdpa, inputs, layers, heads)
    if cut is not None:
        answers = [a if length is None else a[:length] for a, length in zip(answers, cut)]
    lengths = [len(a) for a in answers]
    if len(prompts) > 1 and cut is not None:
        assert lengths[0] != lengths[1], "the answers must differ in length"

    batch = forced_batch(inputs, answers, processor.tokenizer.pad_token_id)
    query_rows = forced_query_rows(sdpa, batch, max(lengths) + 1, layers, heads)
    assert [tuple(q.shape) for q in query_rows] == [(max(lengths) + 1, 144)] * len(prompts)
    for b, answer in enumerate(answers):
        emitting = forced_rows(query_rows[b], len(answer), "emitting")
        assert emitting.shape == (len(answer), 144) and emitting.dtype == torch.float32
        torch.testing.assert_close(emitting, rows[b, :len(answer)], rtol=1e-4, atol=1e-6)
    assert float(rows.max()) > 3.0 / batch["input_ids"].shape[1]       # peaked, not uniform


@pytest.mark.parametrize("prompts", BATCHES.values(), ids=BATCHES.keys())
@pytest.mark.parametrize(("layers", "heads", "ref_layers", "ref_heads"), [
    ("all", "all", [0, 1, 2], [0, 1, 2, 3]),
    ([0, -1], [1, 3], [0, 2], [1, 3]),
], ids=["all", "selected"])
def test_query_rows_equal_eager_output_attentions(toy, prompts, layers, heads, ref_layers, ref_heads):
    """Every recorded query's row (prompt and answer positions) is the mean over the selected layers
    and heads of the eager attention probabilities at that position; "own" rows are the answer's."""
    sdpa, eager, processor = toy
    inputs = model_inputs(processor, prompts)
    answers = [torch.tensor([17, 9, 25, 2]), torch.tensor([30, 12])][:len(prompts)]
    batch = forced_batch(inputs, answers, processor.tokenizer.pad_token_id)
    queries = 5
    query_rows = forced_query_rows(sdpa, batch, queries, layers, heads)
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    positions = image_token_positions(batch["input_ids"], sdpa.config.image_token_id)
    length = batch["input_ids"].shape[1]
    for b, answer in enumerate(answers):
        probs = torch.stack([attentions[layer][b, ref_heads, length - queries:] for layer in ref_layers])
        expected = probs.mean(dim=(0, 1))[:, positions[b]]                           # (Q, N_img)
        torch.testing.assert_close(query_rows[b], expected, rtol=1e-4, atol=1e-6)
        own = forced_rows(query_rows[b], len(answer), "own")
        torch.testing.assert_close(own, expected[queries - len(answer):], rtol=1e-4, atol=1e-6)


def test_the_newest_query_is_the_one_recording_with_one_query_captures(toy):
    """The last of the Q rows of a forward pass is the row ``queries=1`` (the default) records."""
    sdpa, _, processor = toy
    inputs = model_inputs(processor, [LONG_PROMPT, SHORT_PROMPT])
    positions = image_token_positions(inputs["input_ids"], sdpa.config.image_token_id)
    capture = AttentionCapture(sdpa)
    with torch.no_grad(), capture.recording(positions):
        sdpa(**inputs)
    newest = capture.rows()
    with torch.no_grad(), capture.recording(positions, queries=3):
        sdpa(**inputs)
    assert newest.shape == (2, 1, 144)
    torch.testing.assert_close(torch.stack([rows[-1] for rows in capture.query_rows()]), newest[:, 0],
                               rtol=1e-5, atol=1e-7)


def test_misuse_is_rejected_clearly(toy):
    sdpa, _, processor = toy
    inputs = model_inputs(processor, [SHORT_PROMPT])
    positions = image_token_positions(inputs["input_ids"], sdpa.config.image_token_id)
    capture = AttentionCapture(sdpa)
    for queries in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="queries must be an integer >= 1"), capture.recording(positions, queries):
            pass
    with pytest.raises(RuntimeError, match="no finished recording"):
        capture.query_rows()

    with torch.no_grad(), capture.recording(positions, queries=2):         # two forward calls
        sdpa(**inputs)
        sdpa(**inputs)
    with pytest.raises(RuntimeError, match="one forward call; the last one held 2"):
        capture.query_rows()
    with pytest.raises(RuntimeError, match="read query_rows"):
        capture.rows()
    with pytest.raises(RuntimeError, match="read query_rows"):
        capture.item_rows()

    # generate's decoding steps bring one query each.
    with pytest.raises(ValueError, match="last 2 queries .* brought 1"), torch.no_grad(), \
            capture.recording(positions, queries=2):
        sdpa.generate(**inputs, do_sample=False, max_new_tokens=2)
    assert sdpa.config.text_config._attn_implementation == "sdpa"

    with torch.no_grad(), capture.recording(positions):
        sdpa(**inputs)
    with pytest.raises(RuntimeError, match="one query per forward call; read rows"):
        capture.query_rows()


def test_forced_rows_pick_the_emitting_or_the_own_queries():
    query_rows = torch.arange(5.0)[:, None].expand(5, 3)           # row i holds i: queries L-5 .. L-1
    assert forced_rows(query_rows, 3, "emitting")[:, 0].tolist() == [1, 2, 3]
    assert forced_rows(query_rows, 3, "own")[:, 0].tolist() == [2, 3, 4]
    assert forced_rows(query_rows, 4, "emitting")[:, 0].tolist() == [0, 1, 2, 3]
    assert forced_rows(query_rows, 0, "emitting").shape == (0, 3) == forced_rows(query_rows, 0, "own").shape
    with pytest.raises(ValueError, match="queries - 1 = 4"):
        forced_rows(query_rows, 5, "own")
    with pytest.raises(ValueError, match="queries - 1"):
        forced_rows(query_rows, -1, "emitting")
    with pytest.raises(ValueError, match="'emitting' or 'own'"):
        forced_rows(query_rows, 2, "previous")


def test_left_pad():
    input_ids, attention_mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8], dtype=torch.int32)], pad_id=3)
    assert input_ids.tolist() == [[5, 6, 7], [3, 3, 8]] and input_ids.dtype == torch.int64
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]] and attention_mask.dtype == torch.int64
    for sequences in ([], [torch.tensor([1]), torch.tensor([], dtype=torch.long)]):
        with pytest.raises(ValueError, match="non-empty"):
            left_pad(sequences, 0)


def test_mask_rows_of_several_queries_are_causal_and_padded_alike_for_every_mask_kind():
    """With Q > 1 the last Q queries each get their own mask row, repeated for the query heads of
    a key/value head (row g * Q + i: query i). No mask (SDPA's implicit causal mask), flash's 2D
    padding mask and SDPA's 4D bool / additive masks give the same visible keys."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    sdpa_bool = causal[None, None] & padding.bool()[:, None, None, :]                      # (B, 1, 6, 6)
    sdpa_float = torch.zeros(sdpa_bool.shape).masked_fill(~sdpa_bool, torch.finfo(torch.float32).min)
    like = torch.zeros(())
    batch, kv_heads, group, queries = 2, 2, 3, 4

    def visible(bias):
        assert bias.shape == (batch * kv_heads, group * queries, 6)
        return bias.view(batch, kv_heads, group, queries, 6) == 0

    expected = sdpa_bool[:, :, None, -queries:].expand(batch, kv_heads, group, queries, 6)
    for mask in (padding, sdpa_bool, sdpa_float):
        bias = _additive_mask_row(mask, batch, kv_heads, 6, like, queries, group)
        assert torch.equal(visible(bias), expected)
        assert bool((bias.view(expected.shape)[~expected] < -1e30).all())
    no_padding = causal[-queries:].expand(batch, kv_heads, group, queries, 6)
    assert torch.equal(visible(_additive_mask_row(None, batch, kv_heads, 6, like, queries, group)), no_padding)


@pytest.mark.parametrize("mask_kind", ["none", "2d", "4d"])
def test_recorded_rows_of_several_queries_are_their_softmax_rows(mask_kind):
    """_Recording with Q > 1 and grouped-query attention: each of the last Q queries' row is the mean
    over layers and heads of softmax(q k^T / sqrt(D) + causal and padding mask) at the image keys."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim, queries = 2, 4, 2, 7, 8, 3
    layers = [(torch.randn(batch, heads, length, dim, generator=generator),
               torch.randn(batch, kv_heads, length, dim, generator=generator)) for _ in range(2)]
    padding = torch.ones(batch, length, dtype=torch.long)
    if mask_kind != "none":
        padding[0, :2] = 0                                                         # item 0 is left-padded
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & padding.bool()[:, None, None, :]
    mask = {"none": None, "2d": padding, "4d": visible}[mask_kind]
    positions = torch.tensor([[2, 3, 6], [0, 4, 5]])

    probs = []
    for query, key in layers:
        scores = query @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) / dim ** 0.5
        probs.append(torch.softmax(scores.masked_fill(~visible, -torch.inf), -1)[:, :, -queries:])
    mean = torch.stack(probs).mean(dim=(0, 2))                                  # (B, Q, K)
    expected = mean.gather(2, positions[:, None].expand(-1, queries, -1))

    recording = _Recording(image_positions=positions, heads=None, num_layers=2, num_heads=heads, queries=queries)
    for query, key in layers:
        recording.observe(query, key, mask, None)
    recording.end_step()
    assert recording.rows[0].shape == (batch, queries, 3)
    torch.testing.assert_close(recording.rows[0], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_forced_capture_on_gpu_matches_eager(tmp_path, implementation):
    """In bfloat16 on a GPU, with flash attention's 2D padding mask too, the rows of the last Q queries
    of a left-padded forced batch match the eager attention probabilities."""
    model, eager, processor = gpu_models(tmp_path, implementation)
    inputs = model_inputs(processor, [LONG_PROMPT, SHORT_PROMPT])
    answers = [torch.tensor([17, 9, 25, 2]), torch.tensor([30, 12])]
    batch = {name: value.to("cuda") for name, value in
             forced_batch(inputs, answers, processor.tokenizer.pad_token_id).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    queries = 5
    query_rows = forced_query_rows(model, batch, queries)
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    positions = image_token_positions(batch["input_ids"], model.config.image_token_id)
    length = batch["input_ids"].shape[1]
    for b in range(len(answers)):
        probs = torch.stack([layer[b, :, length - queries:] for layer in attentions]).float()
        expected = probs.mean(dim=(0, 1))[:, positions[b]]
        torch.testing.assert_close(query_rows[b], expected, rtol=5e-2, atol=5e-3)
