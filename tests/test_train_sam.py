"""Training the tiny SAM on the toy world: one step learns, runs are deterministic, the file loads."""

import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.config import ConfigError
from stages.models.sam import build_sam, load_sam
from stages.toy.train_sam import (
    TrainSamConfig,
    batch_loss,
    batch_points,
    central_pixel,
    decode_prompts,
    evaluate_sam,
    low_res_mask_size,
    main,
    prepare_image,
    random_pixel,
    train_sam_model,
    train_step,
    train_toy_sam,
)
from stages.toy.world import make_example

# a few small images and steps: seconds on a CPU
FAST = TrainSamConfig(num_train_images=3, steps=2, batch_size=2, image_size=(48, 64), warmup_steps=1)


@pytest.fixture(autouse=True)
def one_thread():
    """This model's ops are tiny: one thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_step_lowers_the_loss_on_a_fixed_batch_and_changes_the_weights():
    torch.manual_seed(0)
    sam = build_sam("tiny").train()
    examples = [make_example(0, "train", i, (48, 64)) for i in range(2)]
    images = [prepare_image(e.pixels, e.masks, sam.image_encoder.img_size, low_res_mask_size(sam))
              for e in examples]
    assert images[0].targets.shape == (len(examples[0].masks), 64, 64)  # the decoder's low-res grid
    points = batch_points(images, FAST, np.random.default_rng(0))
    for image, pts in zip(images, points):  # points_per_mask points inside each visible mask, in mask order
        assert len(pts) == len(image.masks) * FAST.points_per_mask
        for k, (x, y) in enumerate(pts):
            assert image.masks[k // FAST.points_per_mask][int(y), int(x)]
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    optimiser = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    first = train_step(sam, optimiser, images, points, FAST)
    with torch.no_grad():
        _, after = batch_loss(sam, images, points, FAST)
    assert np.isfinite(first["loss"]) and after["loss"] < first["loss"]
    changed = [k for k, v in sam.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("image_encoder.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert any(k.startswith("prompt_encoder.") for k in changed)


def test_one_decoder_call_for_all_images_equals_one_call_per_image():
    torch.manual_seed(0)
    sam = build_sam("tiny").train()
    grid = sam.prompt_encoder.image_embedding_size
    embeddings = torch.randn(3, sam.prompt_encoder.embed_dim, *grid, requires_grad=True)
    image_index = torch.tensor([0, 0, 2, 1, 2, 2])
    coords = torch.rand(len(image_index), 1, 2) * sam.image_encoder.img_size
    masks, iou = decode_prompts(sam, embeddings, image_index, coords)
    assert masks.shape == (6, 3, low_res_mask_size(sam), low_res_mask_size(sam)) and iou.shape == (6, 3)
    for b in range(3):
        rows = (image_index == b).nonzero()[:, 0]
        sparse, dense = sam.prompt_encoder(points=(coords[rows], torch.ones(len(rows), 1, dtype=torch.int64)),
                                           boxes=None, masks=None)
        expected_masks, expected_iou = sam.mask_decoder(
            image_embeddings=embeddings[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
        torch.testing.assert_close(masks[rows], expected_masks, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(iou[rows], expected_iou, rtol=1e-5, atol=1e-5)
    masks.sum().backward()  # the gradient reaches the image embeddings of the images with prompts
    assert embeddings.grad.abs().flatten(1).sum(1).gt(0).all()


def test_targets_are_the_resized_masks_averaged_over_cells():
    """A 40 x 80 image, longest side to 256 (x 3.2): a 20 x 20 square at rows 10-29, columns 20-39
    becomes rows 32-95, columns 64-127 of the padded 256 frame, i.e. whole 4 x 4 cells 8-23 x 16-31
    of the 64 x 64 target; everything below the image (rows 128-255 of the frame) is padding."""
    pixels = np.zeros((40, 80, 3), np.uint8)
    mask = np.zeros((40, 80), bool)
    mask[10:30, 20:40] = True
    image = prepare_image(pixels, [mask], 256, 64)
    expected = torch.zeros(64, 64)
    expected[8:24, 16:32] = 1.0
    assert image.pixels.shape == (128, 256, 3)
    # exact but for the square's four corner pixels, which the resampling rounds away (15/16)
    torch.testing.assert_close(image.targets[0], expected, atol=1 / 16, rtol=0)
    assert int((image.targets[0] != expected).sum()) == 4
    # an edge that falls inside a cell gives that cell the covered fraction
    mask = np.zeros((40, 80), bool)
    mask[:, :1] = True  # one column: 3.2 resized pixels wide, 3 after thresholding
    soft = prepare_image(pixels, [mask], 256, 64).targets[0]
    assert 0.5 <= float(soft[0, 0]) < 1.0 and float(soft[0, 1]) == 0.0 and float(soft[40, 0]) == 0.0
    with pytest.raises(ValueError, match="must divide"):
        prepare_image(pixels, [mask], 256, 60)


def test_training_is_deterministic_and_leaves_global_state_alone():
    rng_before, threads_before = torch.random.get_rng_state(), torch.get_num_threads()
    first, history = train_sam_model(FAST)
    again, _ = train_sam_model(FAST)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    assert len(history) == FAST.steps and not first.training
    a, b = first.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = train_sam_model(TrainSamConfig(**{**FAST.__dict__, "seed": 1}))
    assert not all(torch.equal(a[k], other.state_dict()[k]) for k in a)


def test_progress_goes_to_the_log_as_lines_not_bars(caplog, capsys):
    caplog.set_level(logging.INFO, logger="stages.toy.train_sam")
    train_sam_model(FAST)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training tiny SAM")]
    assert len(lines) == FAST.steps  # one line per step for a 2-step run; about 25 for any longer one
    assert re.fullmatch(r"training tiny SAM: step 2/2, loss \d+\.\d{3}, iou2 \d\.\d{3}, "
                        r"\d+ s elapsed, ETA 0 s", lines[-1]), lines[-1]
    assert "training tiny SAM" not in capsys.readouterr().err  # no bar (libraries may draw theirs)


def test_saved_file_loads_and_predicts_through_segments_predictor(tmp_path):
    from segment_anything import SamPredictor

    path = train_toy_sam(tmp_path / "models" / "toy-sam.safetensors", FAST)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))  # written atomically
    sam = load_sam("tiny", path, "cpu")
    trained, _ = train_sam_model(FAST)
    state = load_file(path)
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    predictor = SamPredictor(sam)
    example = make_example(0, "val", 0, (48, 64))
    predictor.set_image(example.pixels)
    size = example.pixels.shape[:2]
    coords = torch.tensor([central_pixel(m) for m in example.masks], dtype=torch.float32)[:, None, :]
    masks, scores, low_res = predictor.predict_torch(
        predictor.transform.apply_coords_torch(coords, size), torch.ones(coords.shape[:2]),
        multimask_output=True)
    assert masks.shape == (len(example.masks), 3, *size) and scores.shape == (len(example.masks), 3)
    metrics = evaluate_sam(sam, 1, image_size=(48, 64))
    assert metrics["num_objects"] == len(example.masks)
    assert all(0 <= metrics[k] <= 1 for k in ("iou_mask0", "iou_mask1", "iou_mask2", "iou_best", "iou50_mask2"))
    randomly = evaluate_sam(sam, 1, image_size=(48, 64), point="random", point_seed=3)
    assert randomly == evaluate_sam(sam, 1, image_size=(48, 64), point="random", point_seed=3)
    assert randomly["num_objects"] == metrics["num_objects"]
    with pytest.raises(ValueError, match="point must be one of"):
        evaluate_sam(sam, 1, image_size=(48, 64), point="corner")


def test_random_pixel_lies_inside_the_mask_and_follows_the_seed():
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:6, 10:25] = True
    mask[15, 2] = True
    picks = [random_pixel(mask, np.random.default_rng(seed)) for seed in range(50)]
    assert all(mask[y, x] for x, y in picks)
    assert len(set(picks)) > 10
    assert picks[7] == random_pixel(mask, np.random.default_rng(7))


def test_cli_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    main(["--out", str(out), "--steps", "1", "--num-train-images", "2", "--batch-size", "1"])
    assert "wrote" in capsys.readouterr().out
    load_sam("tiny", out)


def test_central_pixel_lies_inside_a_ring():
    yy, xx = np.mgrid[:21, :21]
    ring = np.abs(np.hypot(yy - 10, xx - 10) - 8) < 1.5  # centroid (10, 10) lies outside the ring
    x, y = central_pixel(ring)
    assert ring[y, x]


@pytest.mark.parametrize("key, value", [("steps", 0), ("batch_size", -1), ("lr", 0.0),
                                        ("image_size", (20, 30)), ("num_threads", 0),
                                        ("focal_alpha", 0.0), ("focal_alpha", 1.0)])
def test_bad_config_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=key):
        TrainSamConfig(**{key: value})
