"""Segment stage (GPU when present): each phrase's attention map becomes a SAM prompt, then a mask.

Per sample (one question about one image; docs/method.md, section 3):

1. rows ``A``: float32 ``(T, h, w)``, the attention maps of the sample's T answer tokens on the
   image's own grid (``grid_h`` x ``grid_w`` of its generations row), read from the shard's
   attention store at ``attention_offset`` (one contiguous slice of ``T * h * w`` values);
2. ``A - mean_t A[t]``: the mean row over every generated token with finite values is subtracted
   (this removes the attention sinks shared by all tokens);
3. each phrase's rows (its ``token_indices``) are pooled into one ``(h, w)`` map, mean or max;
4. optionally (``remove_corner``) the four corner cells of every phrase map are set to the minimum
   over all the image's phrase maps that reach this step (as the public release does);
5. the map is upsampled bicubically (``align_corners=False``) to the image: ``pad`` upsamples to
   ``(L, L)`` with ``L = max(H, W)`` and keeps the centre ``H x W`` (rows from ``(L - H) // 2``,
   columns from ``(L - W) // 2``, where LLaVA's pad-to-square put the image); ``crop`` upsamples to
   the image's centre square of side ``min(H, W)``; ``original`` upsamples straight to ``(H, W)``
   (:func:`grid_frame` is that geometry, which the visualize stage draws with too); ``auto``
   (default) takes the one matching what the store says its grids cover (attribute ``grid_covers``:
   "padded_square" -> ``pad``, "centre_square" -> ``crop``, "image" -> ``original``), so a model
   that does not pad (LLaVA-NeXT, Qwen2.5-VL) and one that does (LLaVA-1.5) are both mapped right;
6. SAM is prompted, one ``set_image`` and one ``predict_torch`` call for all phrases of the image:
   ``point``: the first argmax pixel (row ``r``, column ``c``) as a positive point; or ``mask``:
   the map as low-resolution mask logits plus a box;
   or, with ``prompt: attention`` (a control, "no SAM"), no SAM at all: the mask is the upsampled map
   thresholded at ``attention_thresh`` times its maximum (``map >= attention_thresh * max``; no
   pixel when the maximum is not positive), the point is still the argmax pixel, the score is 1.0
   (the map's scale carries no calibrated confidence; GLaMM's evaluation also scores every mask
   1.0), ``mask_index`` is 0 (there is one mask; ``more_masks`` has no effect) and no SAM model is
   loaded (the ``sam`` section is unused);
   or, with ``mask_source: proposals`` and prompt ``point``, no SAM either: the point picks one of the
   data set's precomputed masks (:mod:`stages.proposals`: the highest-scoring instance proposal
   containing it, or the panoptic segment under it), whose score is the proposal's; a point on no
   proposal (void) is an error row that keeps the point.

Point convention (:mod:`schemas.artifacts`): a point is the pixel index ``(x, y) = (c, r)`` (column,
row) in the original image, integer-valued. That is what SAM receives (through
``apply_coords_torch``; SAM's prompt encoder itself adds 0.5 to reach the pixel centre), as in the
release, and what the MASKS table stores in ``point_x`` / ``point_y``.

Output: the shard's MASKS table; COCO compressed RLE of each mask, SAM's predicted IoU as score
(1.0 with ``prompt: attention``).
Error rows (``error`` set, ``sample_id`` and ``image_id`` kept) for phrase or generation error rows, an unreadable image,
attention rows with NaN/inf (a phrase using such a row; or every row of the image), a phrase with no
tokens, and any other failure of one image: the shard always completes. A mask SAM predicts empty
keeps all its fields (RLE, score, point) but is marked as an error row, so that evaluators skip it
as the release does; so does an empty attention mask (a map whose maximum is not positive).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from stages import provenance
from stages.config import DATASET_HELP, ConfigError, from_mapping, read_sections, schema_default
from stages.io.attention import attention_attrs, open_attention, read_rows
from stages.io.images import ImageError, load_rgb_array
from stages.io.tables import ArtifactError, CorruptArtifactError, read_arrow, read_provenance, write_table
from stages.proposals import InstanceProposals, PanopticProposals, ProposalError, load_proposals

if TYPE_CHECKING:
    import zarr
    from segment_anything import SamPredictor

log = logging.getLogger(__name__)
Proposals = InstanceProposals | PanopticProposals

POOLS = ("mean", "max")
UPSAMPLES = ("auto", "pad", "crop", "original")
# segment.upsample: auto -> the mode matching the attention store's grid_covers attribute.
UPSAMPLE_OF_GRID_COVERS = {"padded_square": "pad", "centre_square": "crop", "image": "original"}
PROMPTS = ("point", "mask", "attention")
# Probabilities are clipped to [eps, 1 - eps] before the inverse sigmoid (logits within +-6.9).
MASK_PROMPT_EPS = 1e-3
# Mask index kept by default: the last of SAM's three multimask outputs.
DEFAULT_MASK_INDEX = 2
# An empty mask is no prediction (the release skips it); its row keeps every field but is an error row.
EMPTY_MASK_ERROR = "SAM predicted an empty mask"
# prompt: attention: the phrase map has no positive value, so thresholding it keeps no pixel.
EMPTY_ATTENTION_MASK_ERROR = "attention map has no positive value: empty mask"
# prompt: attention: the score of every mask (the map gives no calibrated confidence).
ATTENTION_SCORE = 1.0
MASK_SOURCES = ("sam", "proposals")
# mask_source: proposals: the point lies on none of the image's proposals.
NO_PROPOSAL_ERROR = "no proposal contains the point (void)"


@dataclass(frozen=True)
class SegmentConfig:
    """The ``segment`` config section (see the module docstring for each step)."""

    pool: str = schema_default("segment", "pool")
    upsample: str = schema_default("segment", "upsample")
    remove_corner: bool = schema_default("segment", "remove_corner")
    prompt: str = schema_default("segment", "prompt")
    more_masks: bool = schema_default("segment", "more_masks")
    mask_source: str = schema_default("segment", "mask_source")
    mask_temperature: float = schema_default("segment", "mask_temperature")
    box_thresh: float = schema_default("segment", "box_thresh")
    attention_thresh: float = schema_default("segment", "attention_thresh")

    def __post_init__(self) -> None:
        for key, allowed in (("pool", POOLS), ("upsample", UPSAMPLES), ("prompt", PROMPTS),
                             ("mask_source", MASK_SOURCES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"segment.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not self.mask_temperature > 0:
            raise ConfigError(f"segment.mask_temperature must be > 0, got {self.mask_temperature}")
        if not 0 <= self.attention_thresh <= 1:
            raise ConfigError(f"segment.attention_thresh must be in [0, 1], got {self.attention_thresh}")
        if self.mask_source == "proposals" and self.prompt == "mask":
            raise ConfigError("segment.mask_source proposals picks a mask with a point: it needs prompt point "
                              "(prompt attention makes its own mask and reads no proposals)")

    @property
    def uses_sam(self) -> bool:
        """Whether the masks come from SAM (not with prompt attention nor from proposals)."""
        return self.prompt != "attention" and self.mask_source == "sam"

    @property
    def uses_proposals(self) -> bool:
        """Whether a point picks one of the data set's proposals (mask_source proposals, prompt point)."""
        return self.prompt == "point" and self.mask_source == "proposals"


@dataclass(frozen=True)
class SamConfig:
    """The ``sam`` config section: architecture ``type`` (vit_h | vit_l | vit_b | tiny) and weights."""

    type: str = schema_default("sam", "type")
    checkpoint: str = schema_default("sam", "checkpoint")


# ---------------------------------------------------------------------------------------------
# Attention maps


def centre_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the mean of the finite rows from every row.

    ``rows``: float32 ``(T, h, w)``. Returns ``(centred (T, h, w), finite (T,) bool)``, where a row
    is finite when all its values are; non-finite rows take no part in the mean (their centred
    values are meaningless and must not be used). With no finite row every centred value is NaN.
    """
    finite = torch.isfinite(rows).flatten(1).all(dim=1)
    return rows - rows[finite].mean(dim=0), finite


def pool_phrase(centred: torch.Tensor, token_indices: Sequence[int], pool: str) -> torch.Tensor:
    """One phrase's map ``(h, w)``: the mean or max over its tokens' centred rows ``centred[j]``."""
    selected = centred[list(token_indices)]
    return selected.mean(dim=0) if pool == "mean" else selected.amax(dim=0)


def remove_corners(phrase_maps: torch.Tensor) -> torch.Tensor:
    """A copy of the phrase maps ``(P, h, w)`` of one image with the four corner cells of every map set
    to the minimum over all ``P`` maps (the release's ``remove_corner`` takes the minimum of the
    stacked maps of the image's phrases, not of each map)."""
    out = phrase_maps.clone()
    out[:, [0, 0, -1, -1], [0, -1, 0, -1]] = phrase_maps.min()
    return out


def grid_frame(height: int, width: int, mode: str) -> tuple[int, int, int, int]:
    """Where a feature grid lies on an image of ``height x width`` pixels under upsample ``mode``.

    Returns ``(top, left, frame_h, frame_w)``: the grid covers the ``frame_h x frame_w`` rectangle
    of pixels whose first pixel is the image's row ``top``, column ``left`` (image pixel indices:
    row ``r`` spans ``[r, r + 1)``), its cells tiling it evenly. ``pad``: the ``L x L`` square (``L
    = max(height, width)``) that LLaVA's pad-to-square centres the image in, so ``top = -((L -
    height) // 2)`` and ``left = -((L - width) // 2)``, both <= 0. ``crop``: the image's centre
    ``S x S`` square (``S = min(height, width)``, ``top = (height - S) // 2``, ``left = (width - S)
    // 2``, both >= 0): what a CLIP processor keeps of an unpadded image. ``original``: the whole
    image, ``(0, 0, height, width)``. So the frame either holds the whole image (pad, original) or
    lies inside it (crop). Raises ValueError for another mode.
    """
    if mode == "original":
        return 0, 0, height, width
    if mode == "crop":
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side
    if mode == "pad":
        side = max(height, width)
        return -((side - height) // 2), -((side - width) // 2), side, side
    raise ValueError(f"upsample mode must be 'pad', 'crop' or 'original', got {mode!r}")


def resolve_upsample(upsample: str, attention_path: str | os.PathLike) -> str:
    """The upsample mode for the maps of the attention store at ``attention_path``: ``upsample``
    itself, or with "auto" the mode matching the store's ``grid_covers`` attribute
    (:data:`UPSAMPLE_OF_GRID_COVERS`)."""
    if upsample != "auto":
        return upsample
    return UPSAMPLE_OF_GRID_COVERS[attention_attrs(attention_path)["grid_covers"]]


def upsample_map(phrase_map: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Bicubic upsampling of ``phrase_map`` ``(h, w)`` to the image, float32 ``(height, width)``.

    The map is upsampled to the frame its grid covers (:func:`grid_frame`) and laid on the image
    there. ``pad``: the frame is the padded ``L x L`` square; the image's ``height x width`` window
    is cut out of it. ``crop``: the frame is the image's centre square; the pixels outside it, which
    the model never saw, get the map's minimum. ``original``: the frame is the image. The map may
    have any grid (h != w included): it is stretched over its frame. One map at a time, so memory
    peaks at ``L * L`` floats.
    """
    top, left, frame_h, frame_w = grid_frame(height, width, mode)
    frame = F.interpolate(phrase_map[None, None], size=(frame_h, frame_w), mode="bicubic",
                          align_corners=False)[0, 0]
    if top <= 0 and left <= 0:  # pad, original: the frame holds the image
        return frame[-top:-top + height, -left:-left + width].contiguous()
    image_map = frame.new_full((height, width), float(frame.min()))
    image_map[top:top + frame_h, left:left + frame_w] = frame
    return image_map


def argmax_pixel(image_map: torch.Tensor) -> tuple[int, int]:
    """``(column, row)`` of the first maximum of ``image_map`` ``(H, W)`` in row-major order."""
    flat_index = int(torch.argmax(image_map.flatten()))
    return flat_index % image_map.shape[1], flat_index // image_map.shape[1]


def mask_prompt(image_map: torch.Tensor, temperature: float, box_thresh: float,
                mask_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM mask-prompt inputs from an upsampled map ``(H, W)`` in original-image pixels.

    Returns ``(logits, box)``:
    - ``logits`` float32 ``(mask_size, mask_size)``: ``logit(clip(map / temperature, eps, 1 - eps))``
      resized bicubically to SAM's low-resolution frame (long side ``mask_size``, the short side
      rounded as SAM's ``ResizeLongestSide``, at least 1: :func:`preprocess_shape`), then padded with 0 on the right/bottom (the release
      pads with logit 0 too);
    - ``box`` float32 ``(4,)`` XYXY in original-image pixel edges, ``[x0, y0, x1, y1)``: the bounding
      box of the pixels where ``map / temperature > box_thresh`` (the release's absolute threshold on
      the tempered map); the whole image when no pixel passes (the release would give a degenerate
      [0, 0, 0, 0] box there).
    """
    height, width = image_map.shape
    probabilities = (image_map / temperature).clamp(MASK_PROMPT_EPS, 1 - MASK_PROMPT_EPS)
    logits = torch.log(probabilities / (1 - probabilities))
    new_h, new_w = preprocess_shape(height, width, mask_size)
    logits = F.interpolate(logits[None, None], size=(new_h, new_w), mode="bicubic", align_corners=False)[0, 0]
    logits = F.pad(logits, (0, mask_size - new_w, 0, mask_size - new_h), value=0.0)

    ys, xs = torch.nonzero(image_map / temperature > box_thresh, as_tuple=True)
    if len(ys):
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    else:
        box = torch.tensor([0, 0, width, height], device=image_map.device)
    return logits, box.float()


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape`` (the long side becomes ``long_side``, the
    short side is scaled and rounded), except that no side becomes 0: an image more than
    ``2 * long_side`` times longer than wide (e.g. 4000 x 5 px for SAM's 1,024, or for the tiny SAM's
    256) would round its short side to 0 pixels, which SAM's resize refuses."""
    from segment_anything.utils.transforms import ResizeLongestSide

    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, long_side)
    return max(new_h, 1), max(new_w, 1)


def sam_predictor(sam: Any) -> SamPredictor:
    """A ``SamPredictor`` of ``sam`` whose image, point and box transforms use
    :func:`preprocess_shape`, so that images of any aspect ratio are segmented (SAM's own would fail
    on a short side rounding to 0 pixels); for every other image the sizes are SAM's own."""
    from segment_anything import SamPredictor
    from segment_anything.utils.transforms import ResizeLongestSide

    class _ResizeLongestSide(ResizeLongestSide):
        get_preprocess_shape = staticmethod(preprocess_shape)

    predictor = SamPredictor(sam)
    predictor.transform = _ResizeLongestSide(sam.image_encoder.img_size)
    return predictor


def attention_mask(image_map: torch.Tensor, thresh: float) -> np.ndarray:
    """``prompt: attention``: bool ``(H, W)`` mask ``image_map >= thresh * max(image_map)``; empty
    when the maximum is not positive (a centred map with no positive evidence)."""
    peak = image_map.max()
    if not bool(peak > 0):
        return np.zeros(tuple(image_map.shape), dtype=bool)
    return (image_map >= thresh * peak).cpu().numpy()


def encode_rle(mask: np.ndarray) -> tuple[str, int]:
    """COCO compressed RLE of a bool/uint8 ``(H, W)`` mask: ``(counts as text, area in pixels)``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii"), int(mask_utils.area(rle))


# ---------------------------------------------------------------------------------------------
# One image


class ImageFailure(Exception):
    """The whole image cannot be segmented; the message is the error row's reason."""


def _error_row(sample: dict[str, Any], reason: str, phrase: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error row of the sample ``sample`` (a generations or phrases row: its sample and image ids)."""
    row: dict[str, Any] = {"sample_id": sample["sample_id"], "image_id": sample["image_id"], "error": reason}
    if phrase is not None:
        row.update(text=phrase["text"], category_id=phrase["category_id"])
    return row


def _phrase_problem(token_indices: Sequence[int] | None, finite: torch.Tensor) -> str | None:
    if not token_indices:
        return "phrase has no tokens"
    out_of_range = [j for j in token_indices if not 0 <= j < len(finite)]
    if out_of_range:
        return f"token indices {out_of_range} outside the generation's {len(finite)} tokens"
    non_finite = [j for j in token_indices if not bool(finite[j])]
    if non_finite:
        return f"attention rows of tokens {non_finite} hold NaN/inf"
    return None


def segment_image(cfg: SegmentConfig, predictor: SamPredictor | None, generation: dict[str, Any],
                  phrases: list[dict[str, Any]], image_file: str, attention: zarr.Array,
                  device: torch.device, proposals: Proposals | None = None) -> list[dict[str, Any]]:
    """MASKS rows of one sample, in the order of its ``phrases`` (PHRASES rows as dicts).

    ``cfg.upsample`` must be resolved ("pad", "crop" or "original"; :func:`run` resolves "auto").
    ``attention``: the store's flat ``values`` (or any 1-D float array laid out alike, e.g. the chat's
    one turn, :mod:`stages.conversation`), read at the generation's ``attention_offset``.

    A phrase error row, a phrase without tokens or one using a non-finite attention row gives an
    error row; every other phrase gives one mask row (three with ``more_masks``). Raises
    :class:`ImageFailure` when nothing of the image can be segmented.

    Memory: one upsampled map (float32, at most ``max(H, W)**2``) at a time, then SAM's masks of
    all phrases at once (bool ``(P, 3, H, W)``, as ``predict_torch`` returns them). With
    ``prompt: attention`` ``predictor`` is unused (may be None) and each mask is encoded at once; so
    with ``mask_source: proposals``, where ``proposals`` gives each point's mask.
    """
    sample = {"sample_id": generation["sample_id"], "image_id": generation["image_id"]}
    num_tokens = generation["num_tokens"]
    grid = (generation["grid_h"], generation["grid_w"])
    if None in grid:
        raise ImageFailure("the generation row has no feature grid (grid_h, grid_w)")
    try:
        rows_np = read_rows(attention, generation["attention_offset"], num_tokens, grid)
    except CorruptArtifactError:
        raise                       # a damaged store fails the job, naming the rule to rerun
    except ArtifactError as exc:
        raise ImageFailure(str(exc)) from None
    centred, finite = centre_rows(torch.from_numpy(rows_np).to(device))
    finite = finite.cpu()
    if not bool(finite.any()):
        raise ImageFailure("every attention row of the image holds NaN/inf")

    rows_of_phrase: list[list[dict[str, Any]]] = [[] for _ in phrases]
    usable = []
    for position, phrase in enumerate(phrases):
        problem = phrase["error"] or _phrase_problem(phrase["token_indices"], finite)
        if problem is None:
            usable.append(position)
        else:
            rows_of_phrase[position].append(_error_row(sample, problem, phrase))
    if not usable:
        return [row for rows in rows_of_phrase for row in rows]

    try:
        image = load_rgb_array(image_file)
    except ImageError as exc:
        raise ImageFailure(str(exc)) from None
    height, width = image.shape[:2]

    phrase_maps = torch.stack([pool_phrase(centred, phrases[position]["token_indices"], cfg.pool)
                               for position in usable])
    if cfg.remove_corner:
        phrase_maps = remove_corners(phrase_maps)
    points, mask_logits, boxes = [], [], []
    for position, phrase_map in zip(usable, phrase_maps):
        phrase = phrases[position]
        image_map = upsample_map(phrase_map, height, width, cfg.upsample)
        if cfg.prompt == "attention":
            point_x, point_y = argmax_pixel(image_map)
            counts, area = encode_rle(attention_mask(image_map, cfg.attention_thresh))
            rows_of_phrase[position].append({
                **sample, "phrase_index": phrase["phrase_index"], "mask_index": 0,
                "text": phrase["text"], "category_id": phrase["category_id"], "score": ATTENTION_SCORE,
                "point_x": point_x, "point_y": point_y, "rle_counts": counts, "height": height,
                "width": width, "area": area, "error": EMPTY_ATTENTION_MASK_ERROR if area == 0 else None})
        elif cfg.uses_proposals:
            point_x, point_y = argmax_pixel(image_map)
            rows_of_phrase[position].append(
                _proposal_row(sample, phrase, proposals, image_file, point_x, point_y, height, width))
        elif cfg.prompt == "point":
            points.append(argmax_pixel(image_map))
        else:
            size = predictor.model.prompt_encoder.mask_input_size[0]
            logits, box = mask_prompt(image_map, cfg.mask_temperature, cfg.box_thresh, size)
            mask_logits.append(logits)
            boxes.append(box)
        del image_map  # free it before the next phrase's map is computed
    if not cfg.uses_sam:
        return [row for rows in rows_of_phrase for row in rows]

    assert predictor is not None, "SAM prompts need a predictor"
    predictor.set_image(image)
    original_size = (height, width)
    if cfg.prompt == "point":
        coords = torch.tensor(points, dtype=torch.float32, device=device)[:, None, :]
        masks, scores, _ = predictor.predict_torch(
            point_coords=predictor.transform.apply_coords_torch(coords, original_size),
            point_labels=torch.ones((len(points), 1), dtype=torch.int64, device=device),
            multimask_output=True)
    else:
        masks, scores, _ = predictor.predict_torch(
            point_coords=None, point_labels=None,
            boxes=predictor.transform.apply_boxes_torch(torch.stack(boxes), original_size),
            mask_input=torch.stack(mask_logits)[:, None], multimask_output=True)
    mask_indices = list(range(masks.shape[1])) if cfg.more_masks else [DEFAULT_MASK_INDEX]
    masks = masks[:, mask_indices].cpu().numpy()
    scores = scores[:, mask_indices].float().cpu().numpy()

    for p, position in enumerate(usable):
        phrase = phrases[position]
        point_x, point_y = points[p] if cfg.prompt == "point" else (None, None)
        for k, mask_index in enumerate(mask_indices):
            counts, area = encode_rle(masks[p, k])
            rows_of_phrase[position].append({
                **sample, "phrase_index": phrase["phrase_index"], "mask_index": mask_index,
                "text": phrase["text"], "category_id": phrase["category_id"], "score": float(scores[p, k]),
                "point_x": point_x, "point_y": point_y, "rle_counts": counts, "height": height,
                "width": width, "area": area, "error": EMPTY_MASK_ERROR if area == 0 else None})
    return [row for rows in rows_of_phrase for row in rows]


def _proposal_row(sample: dict[str, Any], phrase: dict[str, Any], proposals: Proposals, image_file: str,
                  point_x: int, point_y: int, height: int, width: int) -> dict[str, Any]:
    """``mask_source: proposals``: the MASKS row of the proposal at the phrase's point; an error row that
    keeps the point when there is none (void) or the proposal does not fit the image."""
    row = {**sample, "phrase_index": phrase["phrase_index"], "text": phrase["text"],
           "category_id": phrase["category_id"], "point_x": point_x, "point_y": point_y}
    try:
        proposal = proposals.mask_at(sample["image_id"], image_file, point_x, point_y, height, width)
    except ProposalError as exc:
        return {**row, "error": str(exc)}
    if proposal is None:
        return {**row, "error": NO_PROPOSAL_ERROR}
    counts, area = encode_rle(proposal.mask)
    return {**row, "mask_index": 0, "score": proposal.score, "rle_counts": counts, "height": height,
            "width": width, "area": area, "error": EMPTY_MASK_ERROR if area == 0 else None}


# ---------------------------------------------------------------------------------------------
# The stage


def _generation_error(generation: dict[str, Any]) -> str | None:
    if generation["error"] is not None or generation["finish_reason"] == "error":
        return f"generation failed: {generation['error'] or '(no reason recorded)'}"
    return None


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(cfg: SegmentConfig, sam_cfg: SamConfig, manifest_path: str | os.PathLike,
        generations_path: str | os.PathLike, attention_path: str | os.PathLike,
        phrases_path: str | os.PathLike, masks_path: str | os.PathLike,
        device: str | torch.device | None = None, proposals: str | os.PathLike | None = None,
        proposals_folder: str | os.PathLike | None = None) -> None:
    """Write the MASKS table of one shard.

    Samples are taken in the generations table's order; each good phrase row gives one mask row
    (three with ``more_masks``), each phrase error row one error row. A sample with no phrase row
    gets one error row (its generation error when it has one); a phrase row whose sample is not in
    the generations table gets an error row. SAM runs in float32 on ``device`` (default:
    :func:`default_device`); with ``prompt: attention`` or ``mask_source: proposals`` no SAM is loaded
    (``sam_cfg`` is unused); the latter reads ``proposals`` (and, for a panoptic prediction, its PNG
    folder ``proposals_folder``; :func:`stages.proposals.load_proposals`).
    ``upsample: auto`` follows the store's ``grid_covers`` attribute. A damaged input (a truncated
    table, a corrupt attention chunk) is no sample's failure: its CorruptArtifactError stops the shard.
    The table's provenance record holds the segment and sam sections and names the SAM checkpoint
    (none without SAM) and the models of its inputs.
    """
    from stages.models.sam import load_sam

    device = torch.device(device) if device is not None else default_device()
    if cfg.uses_proposals and proposals is None and proposals_folder is None:
        raise ConfigError("segment.mask_source proposals: the data set names no proposals (its keys proposals "
                          "and proposals_folder)")
    manifest = {m["sample_id"]: m for m in read_arrow(manifest_path, "manifest").to_pylist()}
    generations = read_arrow(generations_path, "generations").to_pylist()
    phrases_by_sample: dict[str, list[dict[str, Any]]] = {}
    for phrase in read_arrow(phrases_path, "phrases").to_pylist():
        phrases_by_sample.setdefault(phrase["sample_id"], []).append(phrase)
    attention = open_attention(attention_path)
    sections = {"segment": cfg, "sam": sam_cfg}           # as given: upsample auto, not what it resolves to
    cfg = replace(cfg, upsample=resolve_upsample(cfg.upsample, attention_path))
    log.info("segment: maps upsampled with %r", cfg.upsample)
    predictor = sam_predictor(load_sam(sam_cfg.type, sam_cfg.checkpoint, device)) if cfg.uses_sam else None
    mask_source = load_proposals(proposals, proposals_folder) if cfg.uses_proposals else None

    out: list[dict[str, Any]] = []
    for generation in generations:
        sample_id = generation["sample_id"]
        phrases = phrases_by_sample.pop(sample_id, [])
        if not phrases:
            reason = _generation_error(generation) or "sample has no row in the phrases table"
            out.append(_error_row(generation, reason))
            continue
        propagated = [_error_row(generation, p["error"], p) for p in phrases if p["error"] is not None]
        if len(propagated) == len(phrases):
            out.extend(propagated)
            continue
        try:
            if sample_id not in manifest:
                raise ImageFailure("sample not in the manifest")
            image_file = manifest[sample_id]["file"]
            out.extend(segment_image(cfg, predictor, generation, phrases, image_file, attention, device,
                                     mask_source))
        except ImageFailure as exc:
            out.extend([*propagated, _error_row(generation, str(exc))])
        except CorruptArtifactError:
            raise
        except Exception as exc:  # one sample's failure (e.g. out of memory) must not lose the shard
            log.exception("segmenting sample %s failed", sample_id)
            reason = f"segmentation failed: {type(exc).__name__}: {exc}"
            out.extend([*propagated, _error_row(generation, reason)])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for phrases in phrases_by_sample.values():
        out.append(_error_row(phrases[0], "sample not in the generations table"))
    models = [] if predictor is None else [provenance.model("sam", str(sam_cfg.checkpoint))]
    if mask_source is not None and proposals is not None:
        models.append(provenance.model("proposals", str(proposals)))
    if mask_source is not None and proposals_folder is not None:   # thousands of PNGs: named, not hashed
        models.append({"role": "proposals_folder", "path": str(proposals_folder), "revision": None,
                       "sha256": None})
    inputs = [read_provenance(manifest_path), read_provenance(generations_path),
              attention_attrs(attention_path).get("provenance"), read_provenance(phrases_path)]
    record = provenance.record("segment", "masks", sections, models=models, inputs=inputs)
    write_table(out, masks_path, "masks", record)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.segment --manifest M --generations G --attention A --phrases P --out O``."""
    parser = argparse.ArgumentParser(prog="python -m stages.segment", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml", help="YAML config (sections `segment` and `sam`)")
    parser.add_argument("--dataset", default=None, help=DATASET_HELP)
    parser.add_argument("--manifest", required=True, help="manifest table (Parquet)")
    parser.add_argument("--generations", required=True, help="generations table of the shard (Parquet)")
    parser.add_argument("--attention", required=True, help="attention store of the shard (Zarr)")
    parser.add_argument("--phrases", required=True, help="phrases table of the shard (Parquet)")
    parser.add_argument("--out", required=True, help="masks table to write (Parquet)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--proposals", default=None, help="mask_source proposals: COCO results JSON of instance "
                        "masks, or the JSON of a panoptic prediction (with --proposals-folder)")
    parser.add_argument("--proposals-folder", default=None, help="the panoptic prediction's PNG folder")
    args = parser.parse_args(argv)
    config = read_sections(args.config, args.dataset)
    cfg = from_mapping(SegmentConfig, config.get("segment"), where="segment")
    sam_cfg = from_mapping(SamConfig, config.get("sam"), where="sam")
    run(cfg, sam_cfg, args.manifest, args.generations, args.attention, args.phrases, args.out, args.device,
        args.proposals, args.proposals_folder)


if __name__ == "__main__":
    main()
