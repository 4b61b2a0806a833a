"""Attention capture: the captured rows equal the release's eager ``output_attentions`` rows, and the
model generates exactly what it generates without capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.capture import AttentionCapture, eager_reference_rows, image_token_positions
from stages.models.llava_v1 import LLAVA_V1_SYSTEM
from stages.toy.model import build_toy_llava

CAPTIONS = ["A red square sits left of a blue circle.", "Two green triangles, one small dog and a cat."]
LONG_PROMPT = f"{LLAVA_V1_SYSTEM} USER: <image>\nDescribe the image in detail. ASSISTANT:"
SHORT_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["mha", "gqa"])
def toy(request, tmp_path_factory):
    """(sdpa model, eager model, processor) of a toy LLaVA; "gqa": 4 query heads share 2 key/value heads."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    kv_heads = {"mha": None, "gqa": 2}[request.param]
    path = build_toy_llava(tmp_path_factory.mktemp("toy") / "llava", CAPTIONS, seed=1, text_layers=3,
                           num_key_value_heads=kv_heads)
    sdpa = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return sdpa, eager, AutoProcessor.from_pretrained(path)


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(count)]


def model_inputs(processor, prompts: list[str]):
    return processor(images=noise_images(len(prompts)), text=prompts, padding=True, return_tensors="pt")


def eager_rows(eager, inputs, layers=None, heads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated sequences, reference rows) from eager generation with output_attentions=True."""
    with torch.no_grad():
        out = eager.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_attentions=True,
                             return_dict_in_generate=True)
    positions = image_token_positions(inputs["input_ids"], eager.config.image_token_id)
    return out.sequences, eager_reference_rows(out.attentions, positions, layers, heads)


def captured_rows(model, inputs, layers="all", heads="all") -> tuple[torch.Tensor, torch.Tensor]:
    capture = AttentionCapture(model, layers=layers, heads=heads)
    positions = image_token_positions(inputs["input_ids"], model.config.image_token_id)
    with torch.no_grad(), capture.recording(positions):
        sequences = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return sequences, capture.rows()


@pytest.mark.parametrize("prompts", [[LONG_PROMPT], [LONG_PROMPT, SHORT_PROMPT]],
                         ids=["batch1", "left-padded-batch2"])
@pytest.mark.parametrize(("layers", "heads", "ref_layers", "ref_heads"), [
    ("all", "all", None, None),
    ("all", [-2], None, [2]),
    ([0, -1], [1, 3], [0, 2], [1, 3]),
], ids=["all", "heads[-2]", "layers[0,-1]-heads[1,3]"])
def test_captured_rows_equal_eager_rows(toy, prompts, layers, heads, ref_layers, ref_heads):
    sdpa, eager, processor = toy
    inputs = model_inputs(processor, prompts)
    if len(prompts) > 1:
        assert not bool(inputs["attention_mask"].all()), "the batch must be left-padded"
    eager_sequences, expected = eager_rows(eager, inputs, ref_layers, ref_heads)
    sequences, rows = captured_rows(sdpa, inputs, layers, heads)

    assert torch.equal(sequences, eager_sequences)
    generated = sequences.shape[1] - inputs["input_ids"].shape[1]
    assert rows.shape == (len(prompts), generated, 144) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-6)
    # Peaked, not uniform (which any computation would match): the toy's attention is informative.
    assert float(rows.max()) > 3.0 / inputs["input_ids"].shape[1]
    assert bool((rows.sum(-1) <= 1 + 1e-5).all())


def test_items_with_different_numbers_of_image_keys_in_one_batch(toy):
    """Per-image grids give each batch item its own number of image keys (LLaVA-NeXT, Qwen2.5-VL).
    Item 0 reads its 144 image keys, item 1 a different 90 keys (every other image key, in reverse,
    plus its first 18 prompt keys): each item's rows equal the eager reference computed for that
    item alone, and the padded batch tensor holds zeros after each item's length."""
    sdpa, eager, processor = toy
    inputs = model_inputs(processor, [LONG_PROMPT, SHORT_PROMPT])
    uniform = image_token_positions(inputs["input_ids"], sdpa.config.image_token_id)
    ragged = [uniform[0], torch.cat([uniform[1].flip(0)[::2], torch.arange(18)])]
    assert [len(p) for p in ragged] == [144, 90]
    with torch.no_grad():
        out = eager.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_attentions=True,
                             return_dict_in_generate=True)
    capture = AttentionCapture(sdpa)
    with torch.no_grad(), capture.recording(ragged):
        sequences = sdpa.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert torch.equal(sequences, out.sequences)
    steps = sequences.shape[1] - inputs["input_ids"].shape[1]
    items = capture.item_rows()
    assert [tuple(rows.shape) for rows in items] == [(steps, 144), (steps, 90)]
    for b, rows in enumerate(items):
        alone = [tuple(layer[b:b + 1] for layer in step) for step in out.attentions]
        expected = eager_reference_rows(alone, ragged[b][None])[0]
        torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-6)
    padded = capture.rows()
    assert padded.shape == (2, steps, 144) and bool((padded[1, :, 90:] == 0).all())
    torch.testing.assert_close(padded, eager_reference_rows(out.attentions, ragged), rtol=1e-4, atol=1e-6)


def test_padded_positions():
    from stages.capture import padded_positions

    padded, lengths = padded_positions([torch.tensor([4, 5, 6]), torch.tensor([9])])
    assert padded.tolist() == [[4, 5, 6], [9, 9, 9]] and lengths == [3, 1]
    padded, lengths = padded_positions(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert padded.dtype == torch.int64 and lengths == [2, 2]
    with pytest.raises(ValueError, match="needs image positions"):
        padded_positions([torch.tensor([1]), torch.tensor([], dtype=torch.long)])


def test_generation_is_unchanged_by_capture(toy):
    sdpa, _, processor = toy
    inputs = model_inputs(processor, [LONG_PROMPT, SHORT_PROMPT])
    with torch.no_grad():
        plain = sdpa.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_scores=True,
                              return_dict_in_generate=True)
    capture = AttentionCapture(sdpa)
    positions = image_token_positions(inputs["input_ids"], sdpa.config.image_token_id)
    with torch.no_grad(), capture.recording(positions):
        captured = sdpa.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_scores=True,
                                 return_dict_in_generate=True)
    assert torch.equal(plain.sequences, captured.sequences)
    for plain_scores, captured_scores in zip(plain.scores, captured.scores, strict=True):
        assert torch.equal(plain_scores, captured_scores)


def test_recording_swaps_only_the_language_model_and_restores_it(toy):
    sdpa, _, processor = toy
    inputs = model_inputs(processor, [SHORT_PROMPT])
    capture = AttentionCapture(sdpa)
    positions = image_token_positions(inputs["input_ids"], sdpa.config.image_token_id)
    with pytest.raises(KeyError), capture.recording(positions):
        assert sdpa.config.text_config._attn_implementation == "aas_capture_sdpa"
        assert sdpa.config.vision_config._attn_implementation == "sdpa"
        raise KeyError("interrupted")
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    # After an interrupted recording the next one starts clean.
    with torch.no_grad(), capture.recording(positions):
        sequences = sdpa.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert capture.rows().shape == (1, sequences.shape[1] - inputs["input_ids"].shape[1], 144)


def test_image_token_positions_follow_left_padding():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 7],
                        [5, 6, 9, 9, 9, 7, 8]])
    assert image_token_positions(ids, 9).tolist() == [[3, 4, 5], [2, 3, 4]]
    with pytest.raises(ValueError, match="same, non-zero number"):
        image_token_positions(torch.tensor([[9, 9, 1], [9, 1, 1]]), 9)


@pytest.mark.parametrize(("layers", "heads", "message"), [
    ([3], "all", "out of range"),
    ([-4], "all", "out of range"),
    ("all", [0, -4], "twice"),
    ("all", [], "empty"),
    ("some", "all", "'all' or a list"),
])
def test_bad_layer_and_head_selections_are_rejected(toy, layers, heads, message):
    sdpa, _, _ = toy
    with pytest.raises(ValueError, match=message):
        AttentionCapture(sdpa, layers=layers, heads=heads)


def test_eager_model_cannot_be_captured(toy):
    _, eager, _ = toy
    with pytest.raises(ValueError, match="'eager'"):
        AttentionCapture(eager)


def test_flash_padding_mask_gives_the_same_newest_query_mask_as_sdpa():
    """Flash attention passes the 2D padding mask (B, K); SDPA a 4D bool mask (B, 1, Q, K) or an
    additive float one. All must give the newest query the same visible keys."""
    from stages.capture import _additive_mask_row

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    causal = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)                 # 3 queries, 5 keys
    sdpa_bool = causal[None, None] & padding.bool()[:, None, None, :]
    sdpa_float = torch.zeros(sdpa_bool.shape).masked_fill(~sdpa_bool, torch.finfo(torch.float32).min)
    like = torch.zeros(())
    expected = torch.tensor([[-torch.inf, -torch.inf, 0, 0, 0],
                             [0, 0, 0, 0, 0]]).repeat_interleave(2, 0)[:, None]      # (B * H_kv, 1, K)
    assert torch.equal(_additive_mask_row(padding, 2, 2, 5, like), expected)
    assert torch.equal(_additive_mask_row(sdpa_bool, 2, 2, 5, like), expected)
    float_bias = _additive_mask_row(sdpa_float, 2, 2, 5, like)
    assert torch.equal(float_bias == 0, expected == 0) and bool((float_bias[expected != 0] < -1e30).all())
    assert _additive_mask_row(None, 2, 2, 5, like).shape == (1, 1, 1)


def test_layer_rows_are_summed_on_the_device_of_the_image_positions():
    """A model spread over GPUs hands each layer's query, keys and mask to the capture on that
    layer's device. On one device the rows are the mean over layers and heads of
    softmax(q k^T / sqrt(D) + mask) at the image positions; with a layer on another device (here
    "meta", which carries shapes and devices only) every layer's rows are summed, and the heads
    selected and the image columns gathered, on the device of the image positions."""
    from stages.capture import _Recording

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, keys, dim = 2, 4, 2, 7, 8
    queries = [torch.randn(batch, heads, 1, dim, generator=generator) for _ in range(2)]
    keys_per_layer = [torch.randn(batch, kv_heads, keys, dim, generator=generator) for _ in range(2)]
    visible = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    visible[0, ..., :2] = False                                          # item 0 is left-padded
    positions = torch.tensor([[2, 3, 6], [0, 4, 5]])

    probs = []
    for query, key in zip(queries, keys_per_layer, strict=True):
        scores = (query @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2))[:, :, 0]
        probs.append(torch.softmax(scores / dim ** 0.5 + torch.where(visible[:, :, -1], 0.0, -torch.inf), -1))
    expected = torch.stack(probs).mean(dim=(0, 2)).gather(1, positions)     # (B, N_img)

    recording = _Recording(image_positions=positions, heads=None, num_layers=2, num_heads=heads)
    for query, key in zip(queries, keys_per_layer, strict=True):
        recording.observe(query, key, visible, None)
    recording.end_step()
    torch.testing.assert_close(recording.rows[0], expected)

    meta = torch.device("meta")
    split = _Recording(image_positions=positions.to(meta), heads=torch.tensor([1, 3], device=meta),
                       num_layers=2, num_heads=2)
    split.observe(queries[0], keys_per_layer[0], visible, None)                       # a layer on the CPU
    split.observe(queries[1].to(meta), keys_per_layer[1].to(meta), visible.to(meta), None)
    split.end_step()
    assert split.rows[0].device == meta and split.rows[0].shape == (batch, 3)


def test_the_mask_bias_is_cached_per_device():
    """Layers on different devices each get the newest query's bias on their own device, built once
    per step and device for one mask object (even without a mask, whose bias is a zero)."""
    from stages.capture import _Recording

    recording = _Recording(image_positions=torch.zeros(1, 1, dtype=torch.long), heads=None, num_layers=2,
                           num_heads=2)
    recording.start_step()
    on_cpu, on_meta = torch.zeros(()), torch.zeros((), device="meta")
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    for attention_mask in (None, mask):
        first = recording._newest_query_bias(attention_mask, 1, 2, 5, on_cpu)
        other = recording._newest_query_bias(attention_mask, 1, 2, 5, on_meta)
        assert first.device.type == "cpu" and other.device.type == "meta"
        assert recording._newest_query_bias(attention_mask, 1, 2, 5, on_cpu) is first
    assert recording._newest_query_bias(mask.clone(), 1, 2, 5, on_cpu) is not first  # another mask object


@pytest.mark.gpu
def gpu_models(folder, implementation):
    """(model with ``implementation``, eager model, processor) of a GQA toy LLaVA in bfloat16 on the GPU;
    skips without CUDA (or flash-attn for "flash_attention_2")."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = build_toy_llava(folder / "llava", CAPTIONS, seed=1, num_key_value_heads=2)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=implementation, dtype=torch.bfloat16).to("cuda").eval()
    eager = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.bfloat16).to("cuda").eval()
    return model, eager, AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_capture_on_gpu_matches_eager(tmp_path, implementation):
    model, eager, processor = gpu_models(tmp_path, implementation)
    inputs = model_inputs(processor, [LONG_PROMPT, SHORT_PROMPT]).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    eager_sequences, expected = eager_rows(eager, inputs)
    sequences, rows = captured_rows(model, inputs)
    steps = min(sequences.shape[1], eager_sequences.shape[1]) - inputs["input_ids"].shape[1]
    assert steps > 0
    # Step 0 reads the same prompt either way; bf16 kernels may make later tokens diverge.
    torch.testing.assert_close(rows[:, :1], expected[:, :1], rtol=2e-2, atol=2e-3)
    if torch.equal(sequences, eager_sequences):
        torch.testing.assert_close(rows, expected, rtol=2e-2, atol=2e-3)

    # Items with different numbers of image keys (per-image grids): item 1 reads 90 of its keys.
    uniform = image_token_positions(inputs["input_ids"], model.config.image_token_id)
    ragged = [uniform[0], torch.cat([uniform[1].flip(0)[::2], torch.arange(18, device="cuda")])]
    capture = AttentionCapture(model)
    with torch.no_grad(), capture.recording(ragged):
        model.generate(**inputs, do_sample=False, max_new_tokens=1)
    with torch.no_grad():
        out = eager.generate(**inputs, do_sample=False, max_new_tokens=1, output_attentions=True,
                             return_dict_in_generate=True)
    for b, item in enumerate(capture.item_rows()):
        alone = [tuple(layer[b:b + 1] for layer in step) for step in out.attentions]
        reference = eager_reference_rows(alone, ragged[b][None])[0]
        torch.testing.assert_close(item, reference, rtol=2e-2, atol=2e-3)
