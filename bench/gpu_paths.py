"""GPU paths of the generate and segment stages on the embedded toy models, against references.

Generate (``stages.generate.run``, the stage itself: model loading, processor, pad-to-square,
batched greedy decoding with attention capture, the Parquet table and the Zarr store) on a toy
LLaVA (``build_toy_llava``: 3 text layers, 4 query heads sharing 2 key/value heads) for a few noise
images of different shapes, on ``--device`` in each of ``--dtypes`` with SDPA (and
flash-attention-2 when ``flash_attn`` is importable), compared with

  * eager ``output_attentions`` rows (``stages.capture.eager_reference_rows``) of the same model on
    the same device in the same dtype, from the same processor inputs: step 0 must agree within
    :data:`TOLERANCE` of the dtype (float16: tests/test_capture.py's GPU tolerance, atol 2e-3 +
    rtol 2e-2; bfloat16: 4x that), and every step when both ways generate the same tokens
    (judged: PASS/FAIL; whether the test's own tolerance holds is reported too);
  * the stage's own float32 run on the CPU: tokens identical, max |difference| of the rows while
    the tokens agree (reported; WARN above a loose bound, which would mean a gross device error).

Segment (``stages.segment.run`` with the toy SAM, ``build_toy_sam``) on ``--device`` vs the CPU,
prompts ``point`` and ``mask``, on the CPU run's attention store with fabricated phrases (no spaCy
needed): same rows, same points, SAM scores and mask IoU reported; then the whole GPU path, the
device generation's store segmented on the device.

Every line starting with ``RESULT`` is a verdict; the script exits 1 if any is FAIL.

    python bench/gpu_paths.py                                   # cuda: float16 and bfloat16
    python bench/gpu_paths.py --device cpu --dtypes float32,bfloat16   # the same code on the CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import generate, segment  # noqa: E402
from stages.capture import eager_reference_rows, image_token_positions  # noqa: E402
from stages.generate import GenerateConfig, LMMConfig, build_prompt, expand_to_square  # noqa: E402
from stages.io.attention import open_attention, read_rows  # noqa: E402
from stages.io.images import load_rgb_image  # noqa: E402
from stages.io.tables import read_arrow, write_table  # noqa: E402
from stages.models.llava_v1 import LLAVA_V1_SYSTEM  # noqa: E402
from stages.models.sam import build_toy_sam  # noqa: E402
from stages.segment import SamConfig, SegmentConfig  # noqa: E402
from stages.toy.model import build_toy_llava  # noqa: E402

CAPTIONS = ["A red square sits left of a blue circle.", "Two green triangles, one small dog and a cat."]
IMAGE_SIZES = [(60, 100), (90, 50), (96, 96), (40, 70), (128, 80), (50, 50)]   # (height, width)

VERDICTS: list[tuple[str, str, str]] = []


def verdict(status: str, name: str, detail: str) -> None:
    VERDICTS.append((status, name, detail))
    print(f"RESULT gpu_paths: {status:4s} {name}: {detail}", flush=True)


def make_manifest(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k, (height, width) in enumerate(IMAGE_SIZES):
        file = folder / f"noise{k}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(file)
        rows.append({"sample_id": f"noise{k}", "image_id": f"noise{k}", "file": str(file), "width": width, "height": height, "shard": 0,
                     "error": None})
    path = folder / "manifest.parquet"
    write_table(rows, path, "manifest")
    return path


def run_generate(toy: Path, manifest: Path, out: Path, cfg: GenerateConfig, device: str, dtype: str,
                 attn: str) -> dict:
    """Run the generate stage; return its table (list of dicts), rows per image and the seconds taken."""
    generations, attention = out / f"gen-{device.replace(':', '')}-{dtype}-{attn}.parquet", \
        out / f"att-{device.replace(':', '')}-{dtype}-{attn}.zarr"
    lmm = LMMConfig(family="llava", path=str(toy), dtype=dtype, attn_implementation=attn)
    start = time.perf_counter()
    generate.run(cfg, lmm, manifest, 0, generations, attention, device=device)
    seconds = time.perf_counter() - start
    table = read_arrow(generations, "generations").to_pylist()
    store = open_attention(attention)
    rows = {g["image_id"]: read_rows(store, g["attention_offset"], g["num_tokens"], (g["grid_h"], g["grid_w"])) for g in table}
    return {"table": table, "rows": rows, "seconds": seconds, "generations": generations,
            "attention": attention}


def check_table(name: str, run: dict) -> None:
    """Structural checks of one generate run: no error rows, finite rows that sum to at most 1."""
    problems = []
    for g in run["table"]:
        rows = run["rows"][g["image_id"]]
        if g["error"] is not None:
            problems.append(f"{g['image_id']}: error {g['error']!r}")
        elif g["num_tokens"] == 0 or rows.shape[0] != g["num_tokens"]:
            problems.append(f"{g['image_id']}: {g['num_tokens']} tokens, {rows.shape[0]} rows")
        elif not np.isfinite(rows).all() or (rows.reshape(len(rows), -1).sum(-1) > 1 + 2e-3).any():
            problems.append(f"{g['image_id']}: rows not finite or sum > 1")
    tokens = sum(g["num_tokens"] for g in run["table"])
    reasons = sorted({g["finish_reason"] for g in run["table"]})
    verdict("FAIL" if problems else "PASS", f"{name} stage output",
            "; ".join(problems) if problems else
            f"{len(run['table'])} images, {tokens} tokens, finish {reasons}, {run['seconds']:.1f} s")


def agreement(tokens: list[int], reference_tokens: list[int]) -> int:
    """Number of leading tokens two generations share."""
    n = 0
    for a, b in zip(tokens, reference_tokens):
        if a != b:
            break
        n += 1
    return n


# assert_close-style tolerance (atol, rtol) of the capture vs eager rows per dtype: tests/test_capture.py's
# GPU test uses (2e-3, 2e-2) for bfloat16; bfloat16 has 8x float16's rounding error, and both the
# capture's and eager's scores are rounded to the dtype before the softmax, so it gets 4x here.
TOLERANCE = {"float32": (2e-3, 2e-2), "float16": (2e-3, 2e-2), "bfloat16": (8e-3, 8e-2)}
TEST_TOLERANCE = (2e-3, 2e-2)


def compare_rows(run: dict, reference: dict, tolerance: tuple[float, float] = TEST_TOLERANCE) -> dict:
    """Per image: tokens shared, and rows compared for steps 0..shared (row j depends on tokens < j).

    ``excess``: max of |a - b| - (atol + rtol |b|), over images whose tokens all agree; ``excess0``:
    the same at step 0 over all images (> 0: outside the tolerance).
    """
    atol, rtol = tolerance
    images, same_images, max_diff, max_diff0, excess, excess0 = 0, 0, 0.0, 0.0, -np.inf, -np.inf
    max_ref = 0.0
    ref_by_id = {g["image_id"]: g for g in reference["table"]}
    for g in run["table"]:
        ref = ref_by_id[g["image_id"]]
        shared = agreement(list(g["token_ids"]), list(ref["token_ids"]))
        same = shared == len(g["token_ids"]) == len(ref["token_ids"])
        comparable = min(shared + 1, g["num_tokens"], ref["num_tokens"])
        a = run["rows"][g["image_id"]][:comparable]
        b = reference["rows"][g["image_id"]][:comparable]
        diff = np.abs(a - b)
        # assert_close semantics: |a - b| <= atol + rtol * |b|; "excess" > 0 means outside the tolerance
        over = diff - (atol + rtol * np.abs(b))
        max_ref = max(max_ref, float(np.abs(b).max()))
        images += 1
        same_images += same
        max_diff, max_diff0 = max(max_diff, float(diff.max())), max(max_diff0, float(diff[0].max()))
        excess0 = max(excess0, float(over[0].max()))
        if same:
            excess = max(excess, float(over.max()))
    return {"images": images, "same": same_images, "max_diff": max_diff, "max_diff0": max_diff0,
            "excess": excess, "excess0": excess0, "max_ref": max_ref}


def eager_reference(toy: Path, manifest_rows: list[dict], cfg: GenerateConfig, device: str,
                    dtype: str, max_tokens: dict[str, int]) -> dict:
    """Eager ``output_attentions`` rows of the stage's inputs, in the stage's batches, on ``device``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(toy, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(toy, attn_implementation="eager",
                                                          dtype=torch_dtype).to(device).eval()
    background = tuple(int(255 * c) for c in processor.image_processor.image_mean)
    prompt = build_prompt(processor, cfg.question, cfg.system_prompt)
    table, rows_by_id = [], {}
    for start in range(0, len(manifest_rows), cfg.batch_size):
        batch = manifest_rows[start:start + cfg.batch_size]
        images = [expand_to_square(load_rgb_image(m["file"]), background) for m in batch]
        inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        positions = image_token_positions(inputs["input_ids"], model.config.image_token_id)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=cfg.max_new_tokens,
                                 output_attentions=True, return_dict_in_generate=True)
        rows = eager_reference_rows(out.attentions, positions).float().cpu().numpy()
        generated = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
        side = round(rows.shape[-1] ** 0.5)
        for b, m in enumerate(batch):
            n = max_tokens[m["image_id"]]                  # the stage trims after end-of-sequence
            table.append({"sample_id": m["sample_id"], "image_id": m["image_id"],
                          "token_ids": generated[b, :n].tolist(), "num_tokens": n})
            rows_by_id[m["image_id"]] = rows[b, :n].reshape(n, side, side)
    del model
    return {"table": table, "rows": rows_by_id}


def fabricate_phrases(run: dict, path: Path) -> Path:
    """A PHRASES table over ``run``'s generations: per image the first token, the first three, the last."""
    rows = []
    for g in run["table"]:
        n = g["num_tokens"]
        groups = [[0], list(range(min(3, n))), [n - 1]] if n else []
        for k, tokens in enumerate(groups):
            rows.append({"sample_id": g["sample_id"], "image_id": g["image_id"], "phrase_index": k,
                         "text": f"phrase {k}", "token_indices": tokens, "category_id": 1 + k})
    write_table(rows, path, "phrases")
    return path


def run_segment(prompt: str, sam_checkpoint: Path, manifest: Path, gen: dict, phrases: Path, out: Path,
                device: str) -> tuple[list[dict], float]:
    masks = out / f"masks-{prompt}-{device.replace(':', '')}-{gen['generations'].stem}.parquet"
    start = time.perf_counter()
    sam = SamConfig(type="tiny", checkpoint=str(sam_checkpoint))
    segment.run(SegmentConfig(prompt=prompt), sam, manifest, gen["generations"], gen["attention"], phrases,
                masks, device=device)
    return read_arrow(masks, "masks").to_pylist(), time.perf_counter() - start


def mask_iou(a: dict, b: dict) -> float:
    from pycocotools import mask as mask_utils

    rle = [{"size": [r["height"], r["width"]], "counts": r["rle_counts"].encode()} for r in (a, b)]
    ma, mb = (mask_utils.decode(r).astype(bool) for r in rle)
    union = (ma | mb).sum()
    return 1.0 if union == 0 else float((ma & mb).sum() / union)


def compare_masks(name: str, rows: list[dict], reference: list[dict]) -> None:
    key = [(r["image_id"], r["phrase_index"], r["mask_index"], r["error"]) for r in rows]
    ref_key = [(r["image_id"], r["phrase_index"], r["mask_index"], r["error"]) for r in reference]
    errors = sum(r["error"] is not None for r in rows)
    if key != ref_key:
        verdict("FAIL", name, f"rows differ from the CPU's: {key[:4]}... vs {ref_key[:4]}...")
        return
    good = [(r, s) for r, s in zip(rows, reference, strict=True)
            if r["rle_counts"] is not None and s["rle_counts"] is not None]
    points_same = all((r["point_x"], r["point_y"]) == (s["point_x"], s["point_y"]) for r, s in good)
    score_diff = max((abs(r["score"] - s["score"]) for r, s in good), default=0.0)
    ious = [mask_iou(r, s) for r, s in good]
    detail = (f"{len(rows)} rows ({errors} error rows, as on the CPU), points identical {points_same}, "
              f"max |score diff| {score_diff:.2e}, mask IoU vs CPU min {min(ious, default=1):.4f} "
              f"mean {np.mean(ious) if ious else 1:.4f}")
    ok = points_same and score_diff < 1e-2 and min(ious, default=1.0) > 0.9
    verdict("PASS" if ok else "WARN", name, detail)


def guarded(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- one failing part must not hide the others
        traceback.print_exc()
        verdict("FAIL", name, f"raised {type(exc).__name__}: {exc}")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtypes", default="float16,bfloat16",
                        help="comma-separated dtypes for the device runs")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtypes = [d for d in args.dtypes.split(",") if d]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="aas-gpu-paths-"))
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else "")
          + f", work folder {work}", flush=True)
    implementations = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is None:
        verdict("INFO", "flash_attention_2", "skipped: flash_attn is not importable here")
    elif not device.startswith("cuda"):
        verdict("INFO", "flash_attention_2", "skipped: needs a CUDA device")
    else:
        implementations.append("flash_attention_2")

    toy = build_toy_llava(work / "llava", CAPTIONS, seed=1, text_layers=3, num_key_value_heads=2)
    manifest = make_manifest(work / "images")
    manifest_rows = read_arrow(manifest, "manifest").to_pylist()
    cfg = GenerateConfig(system_prompt=LLAVA_V1_SYSTEM, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size)

    reference = guarded("generate cpu float32", run_generate, toy, manifest, work, cfg, "cpu", "float32",
                        "sdpa")
    if reference is not None:
        check_table("generate cpu float32 sdpa (reference)", reference)
    device_runs = {}
    for dtype in dtypes:
        for attn in implementations:
            name = f"generate {device} {dtype} {attn}"
            run = guarded(name, run_generate, toy, manifest, work, cfg, device, dtype, attn)
            if run is None:
                continue
            device_runs[(dtype, attn)] = run
            check_table(name, run)
            counts = {g["image_id"]: g["num_tokens"] for g in run["table"]}
            eager = guarded(f"{name} eager reference", eager_reference, toy, manifest_rows, cfg, device,
                            dtype, counts)
            if eager is not None:
                atol, rtol = TOLERANCE[dtype]
                c = compare_rows(run, eager, (atol, rtol))
                t = compare_rows(run, eager, TEST_TOLERANCE)
                ok = c["excess0"] <= 0 and c["excess"] <= 0
                in_test = t["excess0"] <= 0 and t["excess"] <= 0
                verdict("PASS" if ok else "FAIL", f"{name} vs eager {dtype} on {device}",
                        f"tokens identical for {c['same']}/{c['images']} images; max |row diff| step 0 "
                        f"{c['max_diff0']:.2e}, steps while tokens agree {c['max_diff']:.2e} (largest value "
                        f"{c['max_ref']:.3f}); tolerance atol {atol:g} + rtol {rtol:g}: step-0 excess "
                        f"{c['excess0']:.2e}" + (f", all-step excess {c['excess']:.2e}" if c["same"] else "")
                        + f"; within tests/test_capture.py's GPU tolerance: {in_test}")
            if reference is not None:
                c = compare_rows(run, reference)
                ok = c["max_diff0"] < 5e-2
                verdict("INFO" if ok else "WARN", f"{name} vs cpu float32",
                        f"tokens identical for {c['same']}/{c['images']} images; max |row diff| step 0 "
                        f"{c['max_diff0']:.2e}, steps while tokens agree {c['max_diff']:.2e}; "
                        f"{run['seconds']:.1f} s vs {reference['seconds']:.1f} s on cpu")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    sam_checkpoint = build_toy_sam(work / "toy-sam.safetensors", seed=0)
    if reference is not None:
        phrases = fabricate_phrases(reference, work / "phrases-ref.parquet")
        for prompt in ("point", "mask"):
            cpu = guarded(f"segment cpu {prompt}", run_segment, prompt, sam_checkpoint, manifest, reference,
                          phrases, work, "cpu")
            dev = guarded(f"segment {device} {prompt}", run_segment, prompt, sam_checkpoint, manifest,
                          reference, phrases, work, device)
            if cpu is not None and dev is not None:
                compare_masks(f"segment {device} vs cpu, prompt {prompt} ({dev[1]:.1f} s vs {cpu[1]:.1f} s)",
                              dev[0], cpu[0])
    for (dtype, attn), run in device_runs.items():
        phrases = fabricate_phrases(run, work / f"phrases-{dtype}-{attn}.parquet")
        result = guarded(f"generate+segment {device} {dtype} {attn}", run_segment, "point", sam_checkpoint,
                         manifest, run, phrases, work, device)
        if result is not None:
            rows, seconds = result
            errors = [r["error"] for r in rows if r["error"] is not None]
            verdict("PASS" if not errors else "WARN", f"generate+segment all on {device} ({dtype}, {attn})",
                    f"{len(rows)} mask rows, {len(errors)} error rows {sorted(set(errors))[:3]}, "
                    f"{seconds:.1f} s")

    failed = [v for v in VERDICTS if v[0] == "FAIL"]
    warned = [v for v in VERDICTS if v[0] == "WARN"]
    print(f"RESULT gpu_paths: {len(VERDICTS)} verdicts, {len(failed)} FAIL, {len(warned)} WARN", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
