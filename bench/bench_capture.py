"""Benchmark: cost of attention capture during greedy generation, against its baselines in one run.

Three ways of generating the same tokens from one LLaVA-architecture model with random weights
(CLIP 336 px / patch 14, i.e. 576 image tokens; a Llama text model):

  plain    SDPA attention, no capture (what the model costs by itself)
  capture  SDPA attention + :class:`stages.capture.AttentionCapture` (this project)
  eager    eager attention with ``output_attentions=True`` + extraction of the same rows (the release)

Each repeat runs the three in turn on the same inputs; the medians over repeats give tokens/s and
the time ratios capture/plain and eager/plain, for the whole generation and for the decoding steps
alone (from the second forward call on: the prefill, with its 600-token prompt and the vision
tower, would dilute the ratio). Also printed: the attention memory each way keeps (capture: its
rows; eager: every layer's and head's attention of every step), the CUDA peak memory when run on a
GPU, and the largest difference between the capture's and eager's rows (the run fails if the three
do not generate the same tokens or the rows differ).

    python bench/bench_capture.py              # ~1.5 min on 2 CPU cores
    python bench/bench_capture.py --threads 1  # steadier timings on a shared machine
    python bench/bench_capture.py --quick      # smoke run for CI
    python bench/bench_capture.py --device cuda --dtype bfloat16 --hidden 4096 --layers 32 --heads 32 \
        --kv-heads 32                          # LLaVA-1.5-7B-sized text model on a GPU
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

IMAGE_TOKEN_ID = 3
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0


def build_model(text_hidden: int, text_layers: int, heads: int, kv_heads: int, vocab: int, seed: int):
    """A random LLaVA-1.5-architecture model: CLIP tower at 336 px / patch 14 (576 image tokens; a
    small tower, as its cost is the same with or without capture), Llama text model as given."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=int(2.75 * text_hidden),
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=576, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def make_inputs(batch: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA-1.5-shaped prompts: BOS, 35 system/question tokens, 576 image tokens, 10 more tokens."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(10, vocab, (batch, 35), generator=generator)
    after = torch.randint(10, vocab, (batch, 10), generator=generator)
    image = torch.full((batch, 576), IMAGE_TOKEN_ID)
    input_ids = torch.cat([torch.full((batch, 1), BOS_ID), before, image, after], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=generator)}


def attention_bytes(attentions) -> int:
    return sum(layer.numel() * layer.element_size() for step in attentions for layer in step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=768, help="text model hidden size")
    parser.add_argument("--layers", type=int, default=8, help="text model layers")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.hidden, args.layers = 4, 1, 128, 2
        args.heads, args.kv_heads, args.vocab = 4, 2, 1000
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    model = build_model(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, seed=0)
    model.to(device, dtype)
    inputs = {k: v.to(device) for k, v in make_inputs(args.batch, args.vocab, seed=1).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    positions = image_token_positions(inputs["input_ids"], IMAGE_TOKEN_ID)
    generate_kwargs = dict(do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    capture = AttentionCapture(model)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain():
        return model.generate(**inputs, **generate_kwargs), None, 0

    def captured():
        with capture.recording(positions):
            sequences = model.generate(**inputs, **generate_kwargs)
        rows = capture.rows()
        return sequences, rows, rows.numel() * rows.element_size()

    def eager():
        model.set_attn_implementation("eager")
        try:
            out = model.generate(**inputs, **generate_kwargs, output_attentions=True,
                                 return_dict_in_generate=True)
        finally:
            model.set_attn_implementation("sdpa")
        return out.sequences, eager_reference_rows(out.attentions, positions), attention_bytes(out.attentions)

    forward_starts: list[float] = []

    def stamp_forward(module, args) -> None:
        synchronize()
        forward_starts.append(time.perf_counter())

    model.register_forward_pre_hook(stamp_forward)
    modes = {"plain": plain, "capture": captured, "eager": eager}
    seconds = {name: [] for name in modes}
    decode_seconds = {name: [] for name in modes}
    kept_bytes, peak_bytes, results = {}, {}, {}
    with torch.inference_mode():
        plain()                                            # warm-up
        for _ in range(args.repeats):
            for name, fn in modes.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize()
                forward_starts.clear()
                start = time.perf_counter()
                sequences, rows, kept = fn()
                synchronize()
                end = time.perf_counter()
                seconds[name].append(end - start)
                decode_seconds[name].append(end - forward_starts[1])
                kept_bytes[name] = kept
                results[name] = (sequences, rows)
                if device.type == "cuda":
                    peak_bytes[name] = torch.cuda.max_memory_allocated(device)

    same_tokens = all(torch.equal(results[name][0], results["plain"][0]) for name in modes)
    row_difference = float((results["capture"][1] - results["eager"][1]).abs().max())
    tokens = args.batch * args.tokens
    print(f"model: text hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"vocab {args.vocab}; 576 image tokens; prompt {inputs['input_ids'].shape[1]} tokens; "
          f"batch {args.batch}; {args.tokens} new tokens; {args.repeats} repeats; {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    decode_tokens = args.batch * (args.tokens - 1)
    for name in modes:
        median, decode_median = statistics.median(seconds[name]), statistics.median(decode_seconds[name])
        line = (f"{name:8s} {tokens / median:8.1f} tokens/s ({median:7.3f} s)  "
                f"decoding {decode_tokens / decode_median:8.1f} tokens/s ({decode_median:7.3f} s)  "
                f"attention kept {kept_bytes[name] / 2**20:9.3f} MiB")
        if peak_bytes:
            line += f"  CUDA peak {peak_bytes[name] / 2**20:9.1f} MiB"
        print(line)
        print(f"{'':8s} runs {', '.join(f'{s:.3f}' for s in seconds[name])}; "
              f"decoding {', '.join(f'{s:.3f}' for s in decode_seconds[name])}")
    for label, timings in (("whole generation", seconds), ("decoding steps", decode_seconds)):
        plain_median = statistics.median(timings["plain"])
        capture_ratio = statistics.median(timings["capture"]) / plain_median
        eager_ratio = statistics.median(timings["eager"]) / plain_median
        print(f"{label:17s} ratio capture/plain {capture_ratio:.3f}x   eager/plain {eager_ratio:.3f}x")
    print(f"same tokens in all three: {same_tokens}; "
          f"max |capture - eager| row difference {row_difference:.2e}")
    if not same_tokens or row_difference > 1e-3:
        sys.exit("capture does not reproduce the eager reference")


if __name__ == "__main__":
    main()
