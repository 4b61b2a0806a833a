"""Precomputed mask proposals (stages.proposals) and segment's ``mask_source: proposals``: instance
masks (COCO results, RLE) and panoptic PNGs on tiny hand-drawn images, then end to end on fabricated
shards (built with tests/test_segment.py's helpers) without any SAM."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from test_segment import assert_point_in_cell, rows_with_peaks, write_shard

import stages.models.sam
from stages import proposals, segment
from stages.config import ConfigError
from stages.datasets import DatasetError
from stages.io.tables import read_arrow, read_provenance
from stages.proposals import (
    InstanceProposals,
    PanopticProposals,
    ProposalError,
    load_proposals,
    read_panoptic_ids,
    rgb2id,
)
from stages.segment import NO_PROPOSAL_ERROR, SamConfig, SegmentConfig

H, W = 6, 8


def box_mask(rows, columns, size=(H, W)):
    """Bool mask of ``size`` set on ``rows`` x ``columns`` (slices)."""
    mask = np.zeros(size, dtype=bool)
    mask[rows, columns] = True
    return mask


def rle(mask, as_bytes=False):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = encoded["counts"] if as_bytes else encoded["counts"].decode("ascii")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# On the 6 x 8 image: A rows 0-3 x columns 0-4 (0.5), B rows 2-5 x columns 2-7 (0.75), C column 3 (0.5,
# ties with A); D covers all of image 2.
A = box_mask(slice(0, 4), slice(0, 5))
B = box_mask(slice(2, 6), slice(2, 8))
C = box_mask(slice(0, 6), slice(3, 4))
D = box_mask(slice(0, 6), slice(0, 8))
MASKS = {"A": A, "B": B, "C": C, "D": D}
SCORES = {"A": 0.5, "B": 0.75, "C": 0.5, "D": 1.0}
IMAGE_OF = {"A": 1, "B": 1, "C": 1, "D": 2}


def results(order, as_bytes=False):
    return [{"image_id": IMAGE_OF[name], "category_id": 1, "score": SCORES[name],
             "segmentation": rle(MASKS[name], as_bytes)} for name in order]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def picked(found):
    """Which of MASKS a Proposal is (None for None), checking its score."""
    if found is None:
        return None
    [name] = [n for n, m in MASKS.items() if np.array_equal(found.mask, m)]
    assert found.mask.dtype == bool and found.score == SCORES[name]
    return name


# --- instance proposals ----------------------------------------------------------------------------

@pytest.mark.parametrize("order", [("A", "B", "C", "D"), ("C", "B", "D", "A")])
@pytest.mark.parametrize("image_id, x, y, expected_if_a_first, expected_if_c_first", [
    ("1", 3, 2, "B", "B"),      # in A, B and C: B scores highest, wherever it is listed
    ("1", 4, 3, "B", "B"),      # in A and B
    ("1", 3, 0, "A", "C"),      # in A and C, both 0.5: the earlier entry of the file
    ("1", 1, 1, "A", "A"),      # in A only
    ("1", 7, 5, "B", "B"),      # in B only
    ("1", 7, 0, None, None),    # in none
    ("1", 0, 5, None, None),    # in none
    ("2", 7, 0, "D", "D"),      # image 2's own mask
    ("3", 3, 2, None, None),    # an image with no proposals
])
def test_instance_proposal_is_the_highest_scoring_mask_containing_the_point(
        tmp_path, order, image_id, x, y, expected_if_a_first, expected_if_c_first):
    source = InstanceProposals(write_json(tmp_path / "proposals.json", results(order)))
    expected = expected_if_a_first if order[0] == "A" else expected_if_c_first
    assert picked(source.mask_at(image_id, "unused.jpg", x, y, H, W)) == expected


def test_instance_proposal_counts_as_bytes_or_str(tmp_path, monkeypatch):
    """A results file parsed from JSON holds counts as text; a list built in memory (e.g. from a
    pickle) may hold pycocotools' bytes: both decode the same."""
    text = InstanceProposals(write_json(tmp_path / "proposals.json", results("ABCD")))
    monkeypatch.setattr(proposals, "load_json", lambda path: results("ABCD", as_bytes=True))
    raw = InstanceProposals(tmp_path / "in-memory.json")
    for x, y in [(3, 2), (1, 1), (7, 0)]:
        assert picked(raw.mask_at(1, "x.jpg", x, y, H, W)) == picked(text.mask_at(1, "x.jpg", x, y, H, W))
    assert picked(raw.mask_at(1, "x.jpg", 3, 2, H, W)) == "B"


def _entry(**changes):
    entry = {"image_id": 1, "score": 0.5, "segmentation": rle(A)}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("data, match", [
    ({"annotations": []}, "expected a JSON list of COCO results, found dict"),
    ([_entry(), "not an object"], r"entry \[1\] needs image_id"),
    ([_entry(image_id=_DROP)], r"entry \[0\] needs image_id"),
    ([_entry(score=_DROP)], r"entry \[0\] needs image_id, a finite numeric score"),
    ([_entry(score="0.9")], r"entry \[0\] needs image_id, a finite numeric score"),
    ([_entry(score=True)], r"entry \[0\] needs image_id, a finite numeric score"),
    ([_entry(score=float("nan"))], r"entry \[0\] needs image_id, a finite numeric score"),
    ([_entry(segmentation=[[0, 0, 4, 0, 4, 4]])], r"entry \[0\].*RLE segmentation"),     # a polygon
    ([_entry(segmentation={"size": [H, W]})], r"entry \[0\].*RLE segmentation"),
    ([_entry(segmentation={"counts": "5220003"})], r"entry \[0\].*RLE segmentation"),
    # uncompressed RLE (a list of counts)
    ([_entry(), _entry(segmentation={"size": [H, W], "counts": [5, 2, 2]})],
     r"entry \[1\].*RLE segmentation"),
    ([_entry(segmentation={"size": H * W, "counts": "5220003"})], r"entry \[0\].*RLE segmentation"),
    ([_entry(segmentation={"size": [H, "8"], "counts": "5220003"})], r"entry \[0\].*RLE segmentation"),
])
def test_malformed_instance_proposals_are_a_dataset_error(tmp_path, data, match):
    path = write_json(tmp_path / "proposals.json", data)
    with pytest.raises(DatasetError, match=match) as info:
        InstanceProposals(path)
    assert str(path) in str(info.value)


def test_missing_or_invalid_instance_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        InstanceProposals(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        InstanceProposals(tmp_path / "bad.json")


def test_instance_proposal_of_another_size_is_a_proposal_error(tmp_path):
    source = InstanceProposals(write_json(tmp_path / "proposals.json", results("ABCD")))
    with pytest.raises(ProposalError, match=r"is 6 x 8 pixels \(height x width\), the image 8 x 6"):
        source.mask_at("1", "x.jpg", 1, 1, W, H)
    assert source.mask_at("3", "x.jpg", 1, 1, W, H) is None      # nothing to compare for an image without any


# --- panoptic proposals ------------------------------------------------------------------------------

# Segment ids of a 6 x 8 prediction: 0 void, 5 (R 5), 300 (R 44, G 1), 70000 (R 112, G 17, B 1).
PANOPTIC = np.zeros((H, W), dtype=np.int64)
PANOPTIC[0:3, 0:4] = 5
PANOPTIC[3:6, 0:4] = 300
PANOPTIC[0:6, 5:8] = 70000


def write_panoptic(path, ids=PANOPTIC):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_rgb2id_reads_r_plus_256_g_plus_65536_b(tmp_path):
    rgb = np.array([[[5, 0, 0], [44, 1, 0], [112, 17, 1], [255, 255, 255]]], dtype=np.uint8)
    assert rgb2id(rgb).tolist() == [[5, 300, 70000, 256 ** 3 - 1]]
    assert np.array_equal(read_panoptic_ids(write_panoptic(tmp_path / "p.png")), PANOPTIC)


@pytest.mark.parametrize("x, y, segment_id", [
    (0, 0, 5), (3, 2, 5), (0, 3, 300), (3, 5, 300), (5, 0, 70000), (7, 5, 70000),
    (4, 0, None), (4, 5, None),             # column 4 is void (id 0)
])
def test_folder_only_panoptic_gives_the_segment_under_the_point(tmp_path, x, y, segment_id):
    """Without a JSON the PNG is named after the image file's stem; every nonzero id is a segment of
    score 1."""
    write_panoptic(tmp_path / "COCO_val2014_000000000042.png")
    source = PanopticProposals(tmp_path)
    found = source.mask_at("42", "/data/coco/val2014/COCO_val2014_000000000042.jpg", x, y, H, W)
    if segment_id is None:
        assert found is None
    else:
        assert found.score == 1.0 and found.mask.dtype == bool
        assert np.array_equal(found.mask, PANOPTIC == segment_id)


@pytest.mark.parametrize("x, y, segment_id, score", [
    (3, 5, 300, 0.75),          # listed with a score
    (7, 0, 70000, 1.0),         # listed without one
    (1, 1, None, None),         # id 5 is in the PNG but not in the JSON: void
    (4, 2, None, None),         # id 0
])
def test_panoptic_with_json_gives_the_listed_segment_under_the_point(tmp_path, x, y, segment_id, score):
    write_panoptic(tmp_path / "pred_42.png")
    json_path = write_json(tmp_path / "panoptic.json", {"annotations": [
        {"image_id": 42, "file_name": "pred_42.png",
         "segments_info": [{"id": 300, "score": 0.75, "category_id": 1}, {"id": 70000}]}]})
    source = PanopticProposals(tmp_path, json_path)
    found = source.mask_at("42", "elsewhere/42.jpg", x, y, H, W)   # the image file's name is not used
    if segment_id is None:
        assert found is None
    else:
        assert (found.score, np.array_equal(found.mask, PANOPTIC == segment_id)) == (score, True)
    assert source.mask_at("43", "43.jpg", x, y, H, W) is None       # an image the JSON does not list


def test_panoptic_missing_png_and_other_size_are_proposal_errors(tmp_path):
    write_panoptic(tmp_path / "a.png")
    folder_only = PanopticProposals(tmp_path)
    with pytest.raises(ProposalError, match="b.png not found"):
        folder_only.mask_at("b", "images/b.jpg", 0, 0, H, W)
    with pytest.raises(ProposalError, match=r"a.png is 6 x 8 pixels \(height x width\), the image 6 x 9"):
        folder_only.mask_at("a", "images/a.jpg", 0, 0, H, W + 1)
    json_path = write_json(tmp_path / "p.json", {"annotations": [
        {"image_id": 1, "file_name": "absent.png", "segments_info": []}]})
    with pytest.raises(ProposalError, match="absent.png not found"):
        PanopticProposals(tmp_path, json_path).mask_at("1", "images/a.jpg", 0, 0, H, W)


def test_panoptic_images_asked_in_turn_get_their_own_segments(tmp_path):
    other = np.full((H, W), 9, dtype=np.int64)
    write_panoptic(tmp_path / "a.png")
    write_panoptic(tmp_path / "b.png", other)
    source = PanopticProposals(tmp_path)
    for stem, expected in [("a", PANOPTIC == 5), ("b", other == 9), ("a", PANOPTIC == 5)]:
        assert np.array_equal(source.mask_at(stem, f"{stem}.jpg", 0, 0, H, W).mask, expected)


@pytest.mark.parametrize("data", [
    [], {"images": []}, {"annotations": {}},
    {"annotations": [{"image_id": 1, "file_name": "a.png"}]},
    {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"score": 1.0}]}]},
    {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": {}}]},
])
def test_malformed_panoptic_json_is_a_dataset_error(tmp_path, data):
    with pytest.raises(DatasetError, match="panoptic proposals file"):
        PanopticProposals(tmp_path, write_json(tmp_path / "p.json", data))


def test_load_proposals_picks_the_kind(tmp_path):
    instances = write_json(tmp_path / "instances.json", results("A"))
    panoptic = write_json(tmp_path / "panoptic.json", {"annotations": []})
    assert isinstance(load_proposals(instances, None), InstanceProposals)
    assert isinstance(load_proposals(None, tmp_path), PanopticProposals)
    with_json = load_proposals(panoptic, tmp_path)
    assert isinstance(with_json, PanopticProposals) and with_json.json_path == panoptic
    with pytest.raises(DatasetError, match="names neither proposals nor proposals_folder"):
        load_proposals(None, None)
    with pytest.raises(DatasetError, match="panoptic proposals folder not found"):
        load_proposals(None, tmp_path / "absent")


# --- segment with mask_source: proposals ---------------------------------------------------------------

# 30 x 30 images, 6 x 6 grids covering the whole image: cell (i, j) is rows 5i..5i+5, columns 5j..5j+5
SIZE = 30
TOP_LEFT = box_mask(slice(0, 15), slice(0, 15), (SIZE, SIZE))        # 0.5
TOP_BAND = box_mask(slice(0, 10), slice(0, 30), (SIZE, SIZE))        # 0.75
BOTTOM_LEFT = box_mask(slice(15, 30), slice(0, 15), (SIZE, SIZE))    # 0.25


def shard_with_three_phrases(folder):
    """Image "img" (30 x 30) with three phrases peaking at cells (1, 1) -> about pixel (7, 7), in TOP_LEFT
    and TOP_BAND; (4, 4) -> about (22, 22), in no proposal; (4, 1) -> about (7, 22), in BOTTOM_LEFT. Image
    "other" has one phrase at (1, 1)."""
    folder.mkdir()
    rows = rows_with_peaks(4, [(1, (1, 1), 0.5), (2, (4, 4), 0.5), (3, (4, 1), 0.5)])
    images = [{"image_id": "img", "size": (SIZE, SIZE), "rows": rows, "phrases": [[1], [2], [3]]},
              {"image_id": "other", "size": (SIZE, SIZE), "rows": rows, "phrases": [[1]]}]
    return write_shard(folder, images, grid_covers="image")


PHRASE_CELLS = [(1, 1), (4, 4), (4, 1)]


@pytest.fixture
def no_sam(monkeypatch, tmp_path):
    """A SAM config whose checkpoint does not exist, and a load_sam that fails the test if called."""
    def refuse(*args, **kwargs):
        raise AssertionError("SAM loaded")
    monkeypatch.setattr(stages.models.sam, "load_sam", refuse)
    return SamConfig(type="tiny", checkpoint=str(tmp_path / "absent-sam.safetensors"))


def run_with_proposals(paths, sam_cfg, proposals_path=None, folder=None, **cfg):
    segment.run(SegmentConfig(mask_source="proposals", **cfg), sam_cfg, paths["manifest"],
                paths["generations"], paths["attention"], paths["phrases"], paths["masks"], device="cpu",
                proposals=proposals_path, proposals_folder=folder)
    return read_arrow(paths["masks"], "masks").to_pylist()


def decoded(row):
    rle_of_row = {"size": [row["height"], row["width"]], "counts": row["rle_counts"]}
    return mask_utils.decode(rle_of_row).astype(bool)


def test_segment_with_instance_proposals(tmp_path, no_sam):
    paths = shard_with_three_phrases(tmp_path / "shard")
    entries = [{"image_id": "img", "score": score, "segmentation": rle(mask)}
               for mask, score in ((TOP_LEFT, 0.5), (TOP_BAND, 0.75), (BOTTOM_LEFT, 0.25))]
    proposals_path = write_json(tmp_path / "proposals.json", entries)
    out = run_with_proposals(paths, no_sam, proposals_path)
    assert [(r["sample_id"], r["phrase_index"], r["mask_index"], r["score"], r["error"]) for r in out] == [
        ("img", 0, 0, 0.75, None), ("img", 1, None, None, NO_PROPOSAL_ERROR), ("img", 2, 0, 0.25, None),
        ("other", 0, None, None, NO_PROPOSAL_ERROR)]     # "other" has no proposals at all
    for row, cell in zip(out, [*PHRASE_CELLS, (1, 1)]):
        # every row keeps its point, void ones included (which have no mask, so no height and width)
        assert_point_in_cell({**row, "height": SIZE, "width": SIZE}, cell, "original")
        assert row["text"] == f"phrase {row['phrase_index']}"
        assert row["category_id"] == 10 + row["phrase_index"]
    assert np.array_equal(decoded(out[0]), TOP_BAND) and out[0]["area"] == 300
    assert np.array_equal(decoded(out[2]), BOTTOM_LEFT) and out[2]["area"] == 225
    assert (out[0]["height"], out[0]["width"]) == (SIZE, SIZE)
    assert out[1]["rle_counts"] is None and out[1]["area"] is None
    record = read_provenance(paths["masks"])
    [named] = [m for m in record["models"] if m["role"] == "proposals"]
    assert named["path"] == str(proposals_path) and len(named["sha256"]) == 64
    assert not any(m["role"] == "sam" for m in record["models"])
    assert record["config"]["segment"]["mask_source"] == "proposals"


def test_segment_with_panoptic_proposals_named_after_the_image_files(tmp_path, no_sam):
    paths = shard_with_three_phrases(tmp_path / "shard")
    folder = tmp_path / "panoptic"
    folder.mkdir()
    ids = np.zeros((SIZE, SIZE), dtype=np.int64)
    ids[0:15, 0:15] = 300          # under phrase 0
    ids[15:30, 0:15] = 70000       # under phrase 2; phrase 1's point is void
    write_panoptic(folder / "img.png", ids)          # the shard's image files are <image_id>.png
    write_panoptic(folder / "other.png", np.full((SIZE, SIZE + 1), 5))   # another size than its image
    out = run_with_proposals(paths, no_sam, folder=folder)
    assert [(r["phrase_index"], r["mask_index"], r["score"], r["error"]) for r in out[:3]] == [
        (0, 0, 1.0, None), (1, None, None, NO_PROPOSAL_ERROR), (2, 0, 1.0, None)]
    assert np.array_equal(decoded(out[0]), ids == 300) and np.array_equal(decoded(out[2]), ids == 70000)
    assert out[1]["point_x"] is not None and out[1]["point_y"] is not None
    other = out[3]
    assert other["sample_id"] == "other" and other["phrase_index"] == 0 and other["point_x"] is not None
    assert "other.png is 30 x 31 pixels (height x width), the image 30 x 30" in other["error"]
    record = read_provenance(paths["masks"])
    named = {"role": "proposals_folder", "path": str(folder), "revision": None, "sha256": None}
    assert named in record["models"]
    assert not any(m["role"] in ("sam", "proposals") for m in record["models"])


def test_proposals_with_the_mask_prompt_is_a_config_error():
    with pytest.raises(ConfigError, match="segment.mask_source proposals .* needs prompt point"):
        SegmentConfig(mask_source="proposals", prompt="mask")
    assert SegmentConfig().mask_source == "sam"


def test_proposals_without_a_path_is_a_config_error(tmp_path, no_sam):
    paths = shard_with_three_phrases(tmp_path / "shard")
    with pytest.raises(ConfigError, match="the data set names no proposals"):
        run_with_proposals(paths, no_sam)
    assert not paths["masks"].exists()


def test_the_attention_prompt_makes_its_own_masks_and_reads_no_proposals(tmp_path, no_sam):
    """A control run (prompt attention) over a data set whose masks come from proposals: its masks are the
    thresholded maps, as on any data set; no proposals file is needed nor recorded."""
    paths = shard_with_three_phrases(tmp_path / "shard")
    rows = run_with_proposals(paths, no_sam, prompt="attention")
    good = [row for row in rows if row["error"] is None]
    assert good and all(row["score"] == 1.0 and row["mask_index"] == 0 for row in good)
    models = read_provenance(paths["masks"])["models"]
    assert not any(model["role"].startswith("proposals") for model in models)
