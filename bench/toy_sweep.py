"""Development sweep for the embedded toy world: train several toy-LLaVA configs side by side (on a
GPU when one is lent) and report how well each one names and grounds the objects of *val* images.

Tuning happens on the val split only; the test split is what the default run reports. Per config:

- ``shape_given_colour``: among the "<colour> <shape>" pairs the model writes whose colour is in the
  image, the share whose shape is that object's shape (perception; chance is about 1/6);
- ``colour_ok``: the share of those pairs whose colour is in the image at all;
- ``point_accuracy``: for every generated shape word, the argmax of its attention row (mean-centred
  over the answer's rows, upsampled to the image as the segment stage does) lies in the union of
  the masks of that shape (absent shape = miss); the pipeline's point accuracy without spaCy/SAM;
- ``train_s``: training wall time.

Usage::

    python bench/toy_sweep.py --out /tmp/sweep --device cuda --parallel 4 \\
        --world '{"sizes": {"small": [0.12, 0.15], ...}, "image_size": [96, 128]}' \\
        --config '{"name": "a", "steps": 3000}' --config '{"name": "b", "patch_size": 12}'

Each ``--config`` is a JSON object of :class:`stages.toy.train_lmm.TrainLmmConfig` fields plus ``name``.
Examples are drawn once, in a process pool, and shared (fork) by the training processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages.toy.world as synthetic  # noqa: E402
from stages.config import schema_default  # noqa: E402

_CACHE: dict[tuple[str, int], synthetic.Example] = {}
_make_example = synthetic.make_example


def _draw(args: tuple[int, str, int, tuple[int, int]]) -> synthetic.Example:
    seed, split, index, image_size = args
    return _make_example(seed, split, index, image_size)


def cached_make_example(seed: int, split: str, index: int, image_size: tuple[int, int]) -> synthetic.Example:
    """make_example, served from the pre-drawn examples when present."""
    example = _CACHE.get((split, index))
    return example if example is not None else _make_example(seed, split, index, image_size)


def set_world(world: dict) -> tuple[int, int]:
    """Apply the world overrides (object size classes) and return the image side range."""
    if "sizes" in world:
        synthetic.SIZES.clear()
        synthetic.SIZES.update({k: tuple(v) for k, v in world["sizes"].items()})
    return tuple(world.get("image_size", schema_default("synthetic", "image_size")))


def write_val(out: Path, num_val: int, image_size: tuple[int, int]) -> Path:
    """The val images as the synthetic stage writes them, and their manifest; returns its path."""
    from PIL import Image

    from stages.io.tables import write_table

    folder = out / "val_images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_val):
        ex = cached_make_example(0, "val", i, image_size)
        file = folder / f"{ex.scene.image_id}.jpg"
        Image.fromarray(ex.pixels).save(file, quality=synthetic.JPEG_QUALITY, subsampling=0)
        rows.append({"sample_id": ex.scene.image_id, "image_id": ex.scene.image_id, "file": str(file), "width": ex.scene.width,
                     "height": ex.scene.height, "shard": 0, "error": None})
    write_table(rows, out / "val_manifest.parquet", "manifest")
    return out / "val_manifest.parquet"


def evaluate(model_dir: Path, work: Path, manifest: Path, num_val: int, image_size: tuple[int, int],
             device: str) -> dict:
    """The metrics of the module docstring for the model in ``model_dir``."""
    import torch

    from stages import generate
    from stages.io.attention import open_attention, read_rows
    from stages.io.tables import read_table
    from stages.segment import argmax_pixel, centre_rows, upsample_map

    generate.run(generate.GenerateConfig(max_new_tokens=48, batch_size=32),
                 generate.LMMConfig(path=str(model_dir)), manifest, 0, work / "generations.parquet",
                 work / "attention.zarr", device=device)
    gens = read_table(work / "generations.parquet", "generations")
    store = open_attention(work / "attention.zarr")
    pair = re.compile(r"\b(" + "|".join(synthetic.COLOURS) + r") (" + "|".join(synthetic.SHAPES) + r")\b")
    pairs = colour_ok = shape_ok = shape_words = hits = 0
    for i, gen in enumerate(gens.itertuples(index=False)):
        ex = cached_make_example(0, "val", i, image_size)
        assert ex.scene.image_id == gen.image_id
        present = {(o.colour, o.shape) for o in ex.scene.objects}
        colours = {o.colour for o in ex.scene.objects}
        for colour, shape in pair.findall(gen.answer or ""):
            pairs += 1
            colour_ok += colour in colours
            shape_ok += colour in colours and (colour, shape) in present
        if not gen.num_tokens:
            continue
        rows = torch.from_numpy(np.asarray(read_rows(store, gen.attention_offset, gen.num_tokens,
                                                     (gen.grid_h, gen.grid_w)), dtype=np.float32))
        centred, _ = centre_rows(rows)
        for j, (start, end) in enumerate(zip(gen.token_starts, gen.token_ends)):
            word = gen.answer[start:end].strip().lower()
            if word not in synthetic.SHAPES:
                continue
            shape_words += 1
            union = ex.union_mask(shape=word)
            x, y = argmax_pixel(upsample_map(centred[j], ex.scene.height, ex.scene.width, "pad"))
            hits += bool(union[y, x])
    return {"shape_given_colour": shape_ok / max(1, colour_ok), "colour_ok": colour_ok / max(1, pairs),
            "point_accuracy": hits / max(1, shape_words), "shape_words": shape_words, "pairs": pairs,
            "answer0": gens["answer"].iloc[0]}


def run_config(spec: dict, out: Path, manifest: Path, num_val: int, image_size: tuple[int, int],
               device: str) -> None:
    """Train one config and append its metrics to out/results.jsonl."""
    import torch

    from stages.toy.train_lmm import TrainLmmConfig, train_toy_llava

    synthetic.make_example = cached_make_example
    name = spec["name"]
    fields = {k: v for k, v in spec.items() if k != "name"}
    cfg = TrainLmmConfig(image_size=image_size, **fields)
    folder = out / name
    start = time.perf_counter()
    try:
        model_dir = train_toy_llava(folder / "model", cfg, device=device)
        train_s = time.perf_counter() - start
        torch.set_num_threads(2)
        metrics = evaluate(model_dir, folder, manifest, num_val, image_size, device)
        result = {"name": name, **fields, "train_s": round(train_s, 1), **metrics}
    except Exception as exc:  # noqa: BLE001 -- one failing config must not lose the others
        result = {"name": name, **fields, "error": f"{type(exc).__name__}: {exc}"}
    line = json.dumps(result)
    print("RESULT", line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--world", default="{}", help="JSON: sizes (size classes), image_size")
    parser.add_argument("--config", action="append", default=[], help="JSON: name + TrainLmmConfig fields")
    parser.add_argument("--plan", help='JSON file {"world": {...}, "configs": [{...}, ...]} (instead of '
                        "--world/--config)")
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
        world, specs = plan.get("world", {}), plan["configs"]
    else:
        world, specs = json.loads(args.world), [json.loads(c) for c in args.config]
    if not specs:
        parser.error("no config: give --config or --plan")
    image_size = set_world(world)
    num_train = max(s.get("num_train_images", 2000) for s in specs)
    start = time.perf_counter()
    jobs = [(0, "train", i, image_size) for i in range(num_train)] + \
           [(0, "val", i, image_size) for i in range(args.num_val)]
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        for (_, split, index, _), example in zip(jobs, pool.imap(_draw, jobs, chunksize=64)):
            _CACHE[(split, index)] = example
    print(f"drew {len(jobs)} examples in {time.perf_counter() - start:.1f} s", flush=True)
    manifest = write_val(out, args.num_val, image_size)
    running: list[mp.Process] = []
    for spec in specs:
        while len([p for p in running if p.is_alive()]) >= args.parallel:
            time.sleep(1)
        process = ctx.Process(target=run_config, args=(spec, out, manifest, args.num_val, image_size, args.device))
        process.start()
        running.append(process)
    for process in running:
        process.join()


if __name__ == "__main__":
    main()
