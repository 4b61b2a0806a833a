"""Every artifact of the pipeline, declared once.

Tables are Parquet files written and read only through :mod:`stages.io.tables`; the attention
store is a Zarr v3 group written and read only through :mod:`stages.io.attention`; the metrics are
JSON files. Each table and store carries ``SCHEMA_VERSION`` (Parquet: schema metadata
``aas.schema_version``; Zarr: attribute ``schema_version``) and readers refuse a file of another
version. Every artifact the stages write also carries its provenance record (:data:`PROVENANCE_FIELDS`;
Parquet: schema metadata ``aas.provenance``, Zarr: attribute ``provenance``, metrics: field
``provenance``), which ``python -m stages.inspect`` prints.

Conventions used by all artifacts:
- A *sample* is one question about one image: ``sample_id`` (a string, unique within a data set) keys
  every row of every table. Instance segmentation, GCG and image folders have one sample per image
  (``sample_id`` equals ``image_id``); referring expressions have one per sentence
  (``"<ref_id>-<sent_id>"``) and narratives one per narrative (``"<image_id>-<k>"``), several per image.
- ``image_id`` is always a string (COCO's integer ids are written as decimal text); evaluators map
  it back to the ground truth's own id.
- Points are ``(x, y)`` = (column index, row index) of a pixel of the original image, x to the right
  and y down, integer-valued, exactly what is passed to SAM's ``apply_coords`` (as the release does).
  A point lies in a mask when ``mask[int(y), int(x)]`` is set.
- Character spans are ``[start, end)`` offsets into the stored ``answer`` string (Python str
  indices, i.e. code points).
- An ``error`` column is null on a good row and holds a human-readable reason on an error row; an
  error row keeps ``sample_id`` and ``image_id`` so that nothing is dropped silently.
"""

from __future__ import annotations

import pyarrow as pa

# "3": a row is a sample (sample_id) rather than an image; the manifest carries a sample's expression and
# forced answer, the generations table which forced piece each token comes from.
SCHEMA_VERSION = "3"
VERSION_KEY = b"aas.schema_version"
ARTIFACT_KEY = b"aas.artifact"
# Parquet schema metadata holding the provenance record as JSON (written by the stages, not by _schema).
PROVENANCE_KEY = b"aas.provenance"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode(), ARTIFACT_KEY: name.encode()})


MANIFEST = _schema(
    "manifest",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        # Path of the image file as the stages open it (absolute, or relative to the run's folder).
        pa.field("file", pa.string(), nullable=False),
        # Size read from the image header; null when the image cannot be read (see error).
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # The sample's referring expression (task res), put into the question where generate.question
        # says {expression}; null for the other tasks.
        pa.field("expression", pa.string()),
        # A teacher-forced answer (task png: the narrative's utterances, in order): generate scores these
        # pieces in one forward pass instead of generating; null = generate an answer.
        pa.field("forced_answer", pa.list_(pa.string())),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("error", pa.string()),
    ],
)

GENERATIONS = _schema(
    "generations",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("answer", pa.string()),
        # Answer token ids g_0..g_{T-1}: generated (including a final end-of-sequence token when emitted),
        # or a forced answer's pieces tokenised one by one and concatenated (no end-of-sequence token).
        pa.field("token_ids", pa.list_(pa.int32())),
        # Character span [start, end) of each token in `answer` (empty span for special tokens).
        pa.field("token_starts", pa.list_(pa.int32())),
        pa.field("token_ends", pa.list_(pa.int32())),
        pa.field("token_special", pa.list_(pa.bool_())),
        # Forced answers: the index of the manifest's forced_answer piece each token comes from; null for a
        # generated answer.
        pa.field("token_pieces", pa.list_(pa.int32())),
        pa.field("num_tokens", pa.int32(), nullable=False),
        # Element offset of this image's maps in the attention store's flat `values` array: with
        # n = grid_h * grid_w, token j's map is values[attention_offset + j * n : attention_offset +
        # (j + 1) * n], row-major over the grid; the image's num_tokens maps are one contiguous slice.
        # On an error row: the store's size at that point (nothing stored).
        pa.field("attention_offset", pa.int64(), nullable=False),
        # This image's feature grid (rows x columns) its maps are laid on; images of one shard may differ
        # (LLaVA-NeXT, Qwen2.5-VL). Null on an error row.
        pa.field("grid_h", pa.int32()),
        pa.field("grid_w", pa.int32()),
        # "eos" (end-of-sequence emitted), "length" (max_new_tokens reached), "forced" (a forced answer
        # scored, nothing generated), "error", or in a saved chat (stages.conversation) "stopped" (the user
        # stopped the answer).
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ],
)

PHRASES = _schema(
    "phrases",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        # 0-based index of the phrase: of the noun chunk in the answer (phrases.select noun_chunks), of the
        # forced piece (forced_pieces), 0 for a sample's single phrase (first_verb, expression_head); null
        # on an error row.
        pa.field("phrase_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("root", pa.string()),
        pa.field("root_start", pa.int32()),
        pa.field("root_end", pa.int32()),
        pa.field("chunk_start", pa.int32()),
        pa.field("chunk_end", pa.int32()),
        # Indices j of the generated tokens g_j grounding this phrase (into the generation's tokens).
        pa.field("token_indices", pa.list_(pa.int32())),
        # Matched ground-truth category (instance segmentation only; null otherwise).
        pa.field("category_id", pa.int64()),
        pa.field("category_name", pa.string()),
        pa.field("category_score", pa.float32()),
        pa.field("error", pa.string()),
    ],
)

MASKS = _schema(
    "masks",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("phrase_index", pa.int32()),
        # Which of SAM's multimask outputs (0, 1, 2) this is; 0 with segment.prompt: attention (no SAM) and
        # with segment.mask_source: proposals.
        pa.field("mask_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("category_id", pa.int64()),
        # SAM's predicted IoU for this mask (1.0 with segment.prompt: attention); with mask_source:
        # proposals the instance proposal's own score (1.0 for a panoptic segment).
        pa.field("score", pa.float32()),
        # Point prompt: (column, row) of the chosen pixel of the original image.
        pa.field("point_x", pa.float32()),
        pa.field("point_y", pa.float32()),
        # COCO compressed RLE: counts as text, size = [height, width].
        pa.field("rle_counts", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("area", pa.int64()),
        pa.field("error", pa.string()),
    ],
)

TABLES: dict[str, pa.Schema] = {
    "manifest": MANIFEST,
    "generations": GENERATIONS,
    "phrases": PHRASES,
    "masks": MASKS,
}

# The workflow rule that writes each artifact: what a reader names when a file must be rewritten (another
# schema version, a truncated or corrupt file).
WRITTEN_BY: dict[str, str] = {
    "manifest": "manifest",
    "generations": "generate",
    "attention": "generate",
    "phrases": "phrases",
    "masks": "segment",
}

# Attention store: one Zarr v3 group per shard, `attention/shard-K.zarr`.
ATTENTION_ARRAY = "values"
# Array `values`: float16, 1-D, shape (total_elements_of_shard,), dimension name below; every captured
# map of the shard, sample after sample, token after token, each map row-major over its image's grid
# (grid_h, grid_w from the generations table; a sample's maps are values[attention_offset :
# attention_offset + num_tokens * grid_h * grid_w]). Chunked and sharded along its only axis (chunks
# of about 2 MiB). A map is the attention of one query over the image tokens, reduced over the chosen
# layers and heads (raw softmax probabilities: a map sums to at most 1; no normalisation is applied):
# for a generated token the query that emitted it; for a forced token the query the attribute
# `forced_rows` names: "emitting" (as generated: the query before the token) or "own" (the token's
# own position).
ATTENTION_DIMENSIONS = ("element",)
ATTENTION_DTYPE = "float16"
# What the feature grids cover (attribute `grid_covers`): "padded_square" (the image was padded to a
# centred square of its longer side before encoding, LLaVA-1.5's expand2square; the grid covers that
# square), "centre_square" (the image was not padded and a CLIP-style processor resized its shorter
# side and cropped the centre: the grid covers the centred square of side min(height, width)) or
# "image" (the grid covers the whole image, stretched to the grid's aspect).
GRID_COVERS = ("padded_square", "centre_square", "image")
# Which query gives a forced token its row (attribute `forced_rows`).
FORCED_ROWS = ("emitting", "own")
# Group attributes: schema_version, artifact="attention", model (id or path), grid_covers,
# reduction {"layers": "all" | [int], "heads": "all" | [int], "statistic": "mean"}, forced_rows,
# provenance (the record below).
ATTENTION_ATTRS = ("schema_version", "artifact", "model", "grid_covers", "reduction", "forced_rows",
                   "provenance")

# Metrics: `{run}/{dataset}/metrics/{task}.json`, a JSON object {task: {metric: value}, "provenance": record}
# with task one of METRIC_TASKS (readers take the task's entry and may ignore the rest).
METRIC_TASKS = ("instance_seg", "gcg", "res", "png")
METRICS_PROVENANCE_FIELD = "provenance"

# The provenance record (stages.provenance.record): what produced an artifact, deterministic (no time, host
# or absolute path of its own), so two runs of one config on one machine write equal records.
# - schema_version, artifact: SCHEMA_VERSION and the artifact's name ("metrics" for a metrics file);
# - stage: the stage that wrote it; code_version: "<module> <hash>", the stages.code_version hash of the
#   stage's module and of every project module it imports;
# - config: {section: values} the stage ran with (e.g. {"segment": {...}, "sam": {...}}), config_sha256:
#   sha256 of that mapping as canonical JSON (sorted keys, no spaces);
# - models: every model behind the artifact, its own and those its inputs record, each {"role", "path",
#   "revision", "sha256"}: revision is the hub commit of a hub id (the cache's ref, null when the cache
#   names none), the package version of a `python:<module>` model or a spaCy pipeline's version;
#   sha256 the content hash of a local file or folder (null for a hub id);
# - upstream: each input artifact's {"artifact", "stage", "code_version", "config_sha256"}, and theirs;
# - libraries: {distribution: version} of python and the libraries the stages compute with.
PROVENANCE_FIELDS = ("schema_version", "artifact", "stage", "code_version", "config", "config_sha256", "models",
                     "upstream", "libraries")
