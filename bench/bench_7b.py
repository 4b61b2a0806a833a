"""Benchmark: attention capture on a LLaVA-1.5-7B-shaped model (random weights), plain SDPA vs capture.

The model has the exact shapes of llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (hidden 1024,
24 layers, 16 heads; 576 image tokens), the 2-layer GELU MLP projector, a Llama-2-7B text model
(hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064). Its weights are random (normal,
std 0.02), built directly on the device in the chosen dtype (no CPU copy of 14 GB), so it needs no
checkpoint. Prompts are LLaVA-1.5-shaped token ids (BOS, 35 text tokens, 576 image tokens, 10 text
tokens) with random 336 x 336 pixel values.

For each batch size, ``--tokens`` new tokens are generated greedily (no early stop) in two ways:

  plain    SDPA attention, no capture (what the model costs by itself)
  capture  the same generation inside :class:`stages.capture.AttentionCapture` over all layers and
           heads, exactly as ``stages.generate`` runs it (``torch.inference_mode``, ``capture.rows()``
           copied to the CPU inside the timed region)

One warm-up, then ``--repeats`` timed runs of each (alternating), medians. Printed per batch and
mode: whole-generation time and tokens/s, prefill time (first forward call), decoding tokens/s
(second forward call on), peak GPU memory, and the capture/plain ratios; also whether the two ways
generated the same tokens, and the capture rows' sanity (finite, sums <= 1). With
``--eager-check-tokens N`` the capture's rows are also compared with eager ``output_attentions``
rows for N tokens at batch 1 (fp16/bf16 numerics of the capture at 7B scale).

    python bench/bench_7b.py                       # cuda, float16, batches 1 and 8, 64 tokens
    python bench/bench_7b.py --tiny --device cpu   # same code on tiny dims, ~20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.capture import AttentionCapture, eager_reference_rows, image_token_positions  # noqa: E402

BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
IMAGE_TOKEN_ID = 32000            # llava-1.5-7b-hf: <image> = 32000, <pad> = 32001, vocabulary 32064
VOCAB = 32064


def llava_config(tiny: bool):
    """LlavaConfig of llava-1.5-7b-hf (``tiny``: the same structure with tiny widths and depths)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2}
        text = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4}
    else:
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                  "num_attention_heads": 16}
        text = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32}
    vision_config = CLIPVisionConfig(**vision, image_size=336, patch_size=14, projection_dim=768,
                                     hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=0.02)
    text_config = LlamaConfig(**text, vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                              initializer_range=0.02)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-2, image_seq_length=576, pad_token_id=PAD_ID)


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int):
    """The random model, constructed directly on ``device`` in ``dtype`` (transformers' own init)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation,
                                                           dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA-1.5-shaped prompts: BOS, 35 text tokens, 576 image tokens, 10 text tokens; random pixels."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(10, IMAGE_TOKEN_ID, (batch, 35), generator=generator)
    after = torch.randint(10, IMAGE_TOKEN_ID, (batch, 10), generator=generator)
    image = torch.full((batch, 576), IMAGE_TOKEN_ID)
    input_ids = torch.cat([torch.full((batch, 1), BOS_ID), before, image, after], dim=1)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=generator).to(device, dtype)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths/depths (CPU smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default 64; --tiny: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-check-tokens", type=int, default=8,
                        help="compare capture rows with eager output_attentions rows for this many tokens at "
                             "batch 1 (0: skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or (8 if args.tiny else 64)
    batches = [int(b) for b in args.batches.split(",") if b]
    cuda = device.type == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f", {dtype}", flush=True)
    start = time.perf_counter()
    model = build_model(args.tiny, device, dtype, args.attn, seed=0)
    synchronize()
    parameters = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else float("nan")
    print(f"built {'tiny' if args.tiny else '7B-shaped'} LLaVA-1.5 ({parameters / 1e9:.3f} B parameters, "
          f"{model.dtype}, {args.attn}) on {device} in {time.perf_counter() - start:.1f} s; "
          f"weights {weights_gib:.2f} GiB", flush=True)
    # transformers initialises on any device but meta; make sure no parameter is left uninitialised
    not_finite = [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]
    q_std = float(model.model.language_model.layers[0].self_attn.q_proj.weight.float().std())
    print(f"init: q_proj std {q_std:.4f} (0.02 expected); parameters with NaN/inf: "
          f"{not_finite[:3] or 'none'}", flush=True)
    capture = AttentionCapture(model, layers="all", heads="all")

    forward_starts: list[float] = []

    def stamp_forward(module, forward_args) -> None:
        synchronize()
        forward_starts.append(time.perf_counter())

    model.register_forward_pre_hook(stamp_forward)
    generate_kwargs = {"do_sample": False, "num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": tokens}
    results: list[dict] = []
    failures: list[str] = [f"parameters with NaN/inf after init: {not_finite[:5]}"] if not_finite else []

    def plain(inputs: dict[str, torch.Tensor], positions: torch.Tensor):
        with torch.inference_mode():
            sequences = model.generate(**inputs, **generate_kwargs)
        return sequences, None

    def captured(inputs: dict[str, torch.Tensor], positions: torch.Tensor):
        """As stages.generate runs it: inference mode, recording around generate, rows to the CPU."""
        with torch.inference_mode(), capture.recording(positions):
            sequences = model.generate(**inputs, **generate_kwargs)
        return sequences, capture.rows().float().cpu()

    modes = {"plain": plain, "capture": captured}
    for batch in batches:
        inputs = make_inputs(batch, device, dtype, seed=batch)
        prompt_length = inputs["input_ids"].shape[1]
        positions = image_token_positions(inputs["input_ids"], IMAGE_TOKEN_ID)
        timings = {name: {"total": [], "prefill": [], "decode": [], "peak": []} for name in modes}
        outputs = {}
        all_sequences: dict[str, list[torch.Tensor]] = {name: [] for name in modes}
        try:
            for fn in modes.values():                # warm-up, one of each
                fn(inputs, positions)
            for _ in range(args.repeats):
                for name, fn in modes.items():
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    synchronize()
                    forward_starts.clear()
                    t0 = time.perf_counter()
                    sequences, rows = fn(inputs, positions)
                    synchronize()
                    t1 = time.perf_counter()
                    # prefill: up to the second forward call; decoding: from it on
                    second = forward_starts[1] if len(forward_starts) > 1 else t1
                    timings[name]["total"].append(t1 - t0)
                    timings[name]["prefill"].append(second - t0)
                    timings[name]["decode"].append(t1 - second if second < t1 else float("nan"))
                    timings[name]["peak"].append(
                        torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"))
                    outputs[name] = (sequences, rows)
                    all_sequences[name].append(sequences)
        except torch.cuda.OutOfMemoryError as exc:
            failures.append(f"batch {batch}: out of memory: {exc}")
            print(f"batch {batch}: OUT OF MEMORY ({exc})", flush=True)
            torch.cuda.empty_cache()
            continue

        plain_sequences = outputs["plain"][0]
        capture_sequences, rows = outputs["capture"]
        generated = plain_sequences.shape[1] - prompt_length
        same_tokens = torch.equal(plain_sequences, capture_sequences)
        finite = bool(torch.isfinite(rows).all())
        sums_ok = bool((rows.sum(-1) <= 1 + 1e-3).all())
        shape_ok = tuple(rows.shape) == (batch, generated, 576)
        if generated != tokens:
            failures.append(f"batch {batch}: generated {generated} tokens, asked for {tokens}")
        if not (finite and sums_ok and shape_ok):
            failures.append(f"batch {batch}: capture rows shape {tuple(rows.shape)}, finite {finite}, "
                            f"sums <= 1 {sums_ok}")
        plain_stable = all(torch.equal(all_sequences["plain"][0], other) for other in all_sequences["plain"])
        if not same_tokens and plain_stable:
            # The capture leaves SDPA's inputs and outputs untouched: with plain runs that repeat
            # themselves exactly, a capture run that does not is a problem.
            failures.append(f"batch {batch}: capture generated other tokens than plain")
        elif not plain_stable:
            print(f"batch {batch}: plain runs themselves generate different tokens run to run (the device's "
                  f"nondeterminism; near-tied logits of random weights): capture == plain is not judged",
                  flush=True)
        for name in modes:
            t = timings[name]
            total, prefill, decode = (statistics.median(t[k]) for k in ("total", "prefill", "decode"))
            results.append({"batch": batch, "mode": name, "total": total, "prefill": prefill,
                            "decode": decode, "tok_s": batch * tokens / total,
                            "decode_tok_s": batch * (tokens - 1) / decode, "peak": max(t["peak"]),
                            "runs": t["total"]})
        print(f"batch {batch}: prompt {prompt_length} tokens, {generated} generated; capture == plain "
              f"tokens: {same_tokens}; rows {tuple(rows.shape)} finite {finite} sums<=1 {sums_ok}; "
              f"row max {float(rows.max()):.4f}, mean row sum {float(rows.sum(-1).mean()):.4f}", flush=True)
        del inputs, outputs, rows, plain_sequences, capture_sequences
        if cuda:
            torch.cuda.empty_cache()

    if args.eager_check_tokens > 0:
        try:
            check_eager(model, capture, device, dtype, args.eager_check_tokens, failures)
        except Exception as exc:  # noqa: BLE001 -- report and go on to the table
            failures.append(f"eager check: {type(exc).__name__}: {exc}")
            print(f"eager check failed: {type(exc).__name__}: {exc}", flush=True)

    print()
    print(f"RESULT bench_7b: {'tiny' if args.tiny else 'LLaVA-1.5-7B-shaped'} random weights, {device}"
          + (f" {torch.cuda.get_device_name(device)}" if cuda else "")
          + f", {dtype}, {args.attn}, {tokens} new tokens, median of {args.repeats} (1 warm-up)")
    header = (f"{'batch':>5} {'mode':8} {'total s':>8} {'tok/s':>8} {'prefill s':>9} {'decode tok/s':>12} "
              f"{'peak GiB':>8} {'ratio total':>11} {'ratio decode':>12}")
    print(header)
    by_key = {(r["batch"], r["mode"]): r for r in results}
    for r in results:
        base = by_key[(r["batch"], "plain")]
        print(f"{r['batch']:5d} {r['mode']:8} {r['total']:8.3f} {r['tok_s']:8.1f} {r['prefill']:9.3f} "
              f"{r['decode_tok_s']:12.1f} {r['peak']:8.2f} {r['total'] / base['total']:10.3f}x "
              f"{r['decode'] / base['decode']:11.3f}x")
    for r in results:
        print(f"  runs batch {r['batch']} {r['mode']}: {', '.join(f'{s:.3f}' for s in r['runs'])}")
    for failure in failures:
        print(f"PROBLEM: {failure}")
    print(f"RESULT bench_7b: {'OK' if not failures else f'{len(failures)} problem(s)'}")
    return 1 if failures else 0


def check_eager(model, capture: AttentionCapture, device: torch.device, dtype: torch.dtype, tokens: int,
                failures: list[str]) -> None:
    """Capture rows vs eager ``output_attentions`` rows at batch 1 for ``tokens`` greedy tokens.

    Step 0 reads the same prompt either way and is judged (relative tolerance 5 %); later steps
    are comparable only while both ways generated the same tokens.
    """
    inputs = make_inputs(1, device, dtype, seed=101)
    prompt_length = inputs["input_ids"].shape[1]
    positions = image_token_positions(inputs["input_ids"], IMAGE_TOKEN_ID)
    kwargs = {"do_sample": False, "num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": tokens}
    with torch.inference_mode(), capture.recording(positions):
        sequences = model.generate(**inputs, **kwargs)
    rows = capture.rows().float()
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs, output_attentions=True, return_dict_in_generate=True)
        expected = eager_reference_rows(out.attentions, positions).float()
        eager_sequences = out.sequences
        del out
    finally:
        model.set_attn_implementation("sdpa")
    generated, eager_generated = sequences[0, prompt_length:], eager_sequences[0, prompt_length:]
    if torch.equal(generated, eager_generated):
        agree = generated.numel()
    else:
        agree = int((generated != eager_generated).int().argmax())
    comparable = min(agree + 1, rows.shape[1])           # row j depends on tokens < j only
    difference = (rows[:, :comparable] - expected[:, :comparable]).abs()
    row0 = float(difference[:, 0].max())
    scale = float(expected[:, :comparable].abs().max())
    # Relative: a random 7B model attends almost uniformly (rows ~ 1 / 622), so an absolute 2e-3 would
    # pass anything. fp16/bf16 scores and the eager model's own (slightly different) hidden states
    # allow a few per cent.
    tolerance = 5e-2 * scale + 1e-7
    print(f"eager check (batch 1, {rows.shape[1]} steps, tokens agree for {agree}): max |capture - eager| "
          f"step 0 {row0:.2e}, steps 0..{comparable - 1} {float(difference.max()):.2e} "
          f"(largest eager value {scale:.3e}; step-0 tolerance {tolerance:.2e})", flush=True)
    if not row0 <= tolerance:
        failures.append(f"eager check: step-0 row difference {row0:.2e} > {tolerance:.2e}")
    del expected, rows
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
