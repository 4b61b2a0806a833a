"""Capture of the attention rows attend-and-segment reads, without ``output_attentions``.

For every forward call of a generating model ("step"), the row captured is the softmax attention of
the *newest* query position (step 0: the last prompt position at prefill; step j > 0: the position
of the token generated at step j - 1) over *all* keys, restricted to the image-token keys, averaged
over the selected heads and the selected language-model layers (docs/method.md, section 1).
Generated token g_j gets row j.

How: the language model's attention implementation is switched, for the duration of
:meth:`AttentionCapture.recording`, to a function registered with transformers'
``AttentionInterface`` (``aas_capture_sdpa`` or ``aas_capture_flash_attention_2``). It returns the
unchanged SDPA (or flash) output, so the model computes exactly what it computes without capture,
and on the side computes ``softmax(q_newest · K^T * scaling + mask)`` for each head (grouped-query
attention: each query head reads its key/value head) and adds it to a float32 (batch, heads, keys)
buffer of the step; at the end of the step (a forward hook on the model) the selected heads are
summed, the image-key columns gathered and divided by layers x heads. Memory is O(steps x image
tokens) plus that one buffer; no (heads x queries x keys) tensor is kept. Each batch item may have
its own number of image keys (per-image grids: LLaVA-NeXT, Qwen2.5-VL): the gather indices are then
padded to the longest item and each item keeps its own length, so a step still costs one gather.
The vision tower's attention is never touched (its sub-config keeps its own implementation).

Cost: besides three small kernels per layer and step, the capture reads each layer's keys once more
for the newest query (the SDPA/flash kernel does not return its probabilities), i.e. about half the
cost of decoding attention; see bench/bench_capture.py.

Teacher forcing (scoring a forced answer in one forward pass): ``recording(positions, queries=Q)``
records, per step, the rows of the last Q query positions of each sequence instead of the newest
only (oldest first), each with its own causal mask: the query at position p sees the keys <= p that
the padding mask allows (SDPA's 4D mask holds this already; with no mask, or flash's 2D padding
mask, the capture builds the causal part). The step buffer becomes (batch, heads, Q, keys) float32.
One forward over the left-padded ``prompt + answer`` batch (:func:`left_pad`) with Q = the longest
answer's length + 1 then gives every answer token its row: :meth:`AttentionCapture.query_rows` per
item, :func:`forced_rows` to pick the "emitting" query (the one before the token: what generation
records) or the token's "own" query.

Models spread over several GPUs (``lmm.gpus``, :mod:`stages.devices`): each layer's rows are
computed on that layer's device, against the mask as it reaches that layer (the additive bias is
cached per device), then moved to one accumulator device, the device of the image positions (the
input embedding's); the head sum, the image-column gather and the rows stay there. On one device
every such move is a no-op (``Tensor.to`` returns the tensor itself): no copy, the same numbers.

Supported: decoder layers reached through ``model.model.language_model.layers[i].self_attn`` (the
LLaVA family), the default dynamic KV cache (a newest query attends to every key in the cache that
its mask allows), greedy or sampled decoding (one sequence per batch element).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from torch import nn

CAPTURE_PREFIX = "aas_capture_"
CAPTURABLE_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")


class CaptureError(RuntimeError):
    """The model's attention did not go through the capture: a model-level problem, not an input's."""


# id(attention module) -> the recording it reports to; filled only while a recording is open.
_ACTIVE_RECORDINGS: dict[int, _Recording] = {}


def _sdpa_with_capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, plus the capture of the newest query's row (see module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recording = _ACTIVE_RECORDINGS.get(id(module))
    if recording is not None:
        recording.observe(query, key, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _flash_attention_2_with_capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                                    dropout: float = 0.0, scaling: float | None = None,
                                    sliding_window: int | None = None, softcap: float | None = None,
                                    is_causal: bool | None = None, **kwargs):
    """transformers' flash-attention-2 path, plus the capture of the newest query's row.

    ``attention_mask`` is flash's 2D padding mask (batch, keys), 1 = real token, or None.
    transformers' own ``flash_attention_forward`` picks its kernel from the config's implementation
    name (here the capture's name), so the kernel call is made directly with "flash_attention_2".
    """
    from transformers.integrations.flash_attention import _use_top_left_mask, get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    recording = _ACTIVE_RECORDINGS.get(id(module))
    if recording is not None:
        recording.observe(query, key, attention_mask, scaling)
    output = _flash_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
        query_length=query.shape[2], is_causal=module.is_causal if is_causal is None else is_causal,
        dropout=dropout, softmax_scale=scaling, sliding_window=sliding_window, softcap=softcap,
        use_top_left_mask=_use_top_left_mask, target_dtype=get_target_dtype(query, module),
        attn_implementation="flash_attention_2", layer_idx=getattr(module, "layer_idx", None), **kwargs)
    return output, None


def register_capture_attention() -> None:
    """Register the capture implementations and their mask builders with transformers (idempotent).

    The mask builder must be registered under the same name, or transformers silently builds no
    mask for an unknown implementation and padding is ignored.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

    AttentionInterface.register(f"{CAPTURE_PREFIX}sdpa", _sdpa_with_capture)
    AttentionMaskInterface.register(f"{CAPTURE_PREFIX}sdpa", sdpa_mask)
    AttentionInterface.register(f"{CAPTURE_PREFIX}flash_attention_2", _flash_attention_2_with_capture)
    AttentionMaskInterface.register(f"{CAPTURE_PREFIX}flash_attention_2", flash_attention_mask)


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Key positions of the image tokens of each sequence.

    ``input_ids``: (B, L) int64 prompt ids (left padding allowed). Returns (B, N_img) int64, positions
    in increasing order (row-major over the feature grid for LLaVA-1.5). Raises ValueError when the
    sequences hold different numbers of image tokens (or none).
    """
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if counts.numel() == 0 or int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        raise ValueError("every sequence must hold the same, non-zero number of image tokens; "
                         f"got {counts.tolist()}")
    return is_image.nonzero()[:, 1].view(input_ids.shape[0], -1)


def padded_positions(
        image_positions: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Key positions of the image tokens of a batch as one gather index and per-item lengths.

    ``image_positions``: a (B, N) int tensor (every item has N image keys), or B 1-D int tensors
    (item b has N_b image keys, in the order its rows are wanted, e.g. row-major over its grid), all
    on one device. Returns ``(padded, lengths)``: ``padded`` (B, max N_b) int64 on that device, item
    b's positions first, then copies of its first position as padding (any valid key would do: the
    padded columns are dropped); ``lengths`` [N_0, ..., N_{B-1}]. ValueError for an empty batch or
    an item without image keys.
    """
    if isinstance(image_positions, torch.Tensor):
        if image_positions.dim() != 2 or 0 in image_positions.shape:
            raise ValueError("image positions must be (B, N) with B, N > 0, "
                             f"got {tuple(image_positions.shape)}")
        return image_positions.long(), [image_positions.shape[1]] * image_positions.shape[0]
    items = [torch.as_tensor(p).long().reshape(-1) for p in image_positions]
    lengths = [len(p) for p in items]
    if not items or min(lengths) == 0:
        raise ValueError(f"every batch item needs image positions; got lengths {lengths}")
    longest = max(lengths)
    padded = torch.stack([torch.cat([p, p[:1].expand(longest - len(p))]) for p in items])
    return padded, lengths


def _normalise_indices(selection: Literal["all"] | Sequence[int], size: int, what: str) -> list[int]:
    """``"all"`` -> 0..size-1; a list of (possibly negative, Python-style) indices -> non-negative ones."""
    if isinstance(selection, str):
        if selection != "all":
            raise ValueError(f"{what} must be 'all' or a list of indices, got {selection!r}")
        return list(range(size))
    indices = [int(i) for i in selection]
    if not indices:
        raise ValueError(f"{what}: empty selection")
    out_of_range = [i for i in indices if not -size <= i < size]
    if out_of_range:
        raise ValueError(f"{what} {out_of_range} out of range for {size} {what}")
    normalised = [i % size for i in indices]
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"{what} {indices} select the same index twice")
    return normalised


def _additive_mask_row(attention_mask: torch.Tensor | None, batch: int, num_kv_heads: int, keys: int,
                       like: torch.Tensor, queries: int = 1, group: int = 1) -> torch.Tensor:
    """The captured queries' mask rows as an additive bias in ``like``'s dtype and device: 0 where the
    key is visible, -inf where masked.

    ``queries`` == 1 (the newest query): (B * H_kv, 1, K), broadcast over the query heads of each
    key/value head; a zero (1, 1, 1) when there is no mask (the newest query sees every key).
    ``queries`` = Q > 1 (the last Q queries, query i at position K - Q + i): (B * H_kv, group * Q, K),
    row g * Q + i the mask of query i for the g-th of the ``group`` query heads that read one
    key/value head (the row order of the queries in :meth:`_Recording.observe`).

    ``attention_mask``: None (causal, no padding), SDPA's 4D mask (B or 1, 1, Q_step, K) (bool: True =
    attend; float: additive; it already holds the causal part) or flash's 2D padding mask (B, K)
    (nonzero = real token; the causal part is added here), on any device (moved to ``like``'s; a
    no-op when it is there already).
    """
    if attention_mask is None and queries == 1:
        return like.new_zeros(1, 1, 1)
    if attention_mask is not None and attention_mask.dim() == 4:
        visible = attention_mask[:, :, -queries:, :].to(like.device)                  # (B or 1, 1, Q, K)
    else:
        visible = torch.ones(queries, keys, dtype=torch.bool, device=like.device).tril(keys - queries)[None, None]
        if attention_mask is not None:
            visible = visible & (attention_mask[:, None, None, :].to(like.device) != 0)
    if visible.dtype == torch.bool:
        bias = torch.zeros(visible.shape, dtype=like.dtype, device=like.device)
        bias.masked_fill_(~visible, float("-inf"))
    else:
        bias = visible.to(like.dtype)
    heads_per_row = group if queries > 1 else 1
    return (bias[:, :, None].expand(batch, num_kv_heads, heads_per_row, queries, keys)
            .reshape(batch * num_kv_heads, heads_per_row * queries, keys))


@dataclasses.dataclass
class _Recording:
    """State of one open recording: the current step's buffer and the rows of finished steps.

    Per selected layer the capture runs three kernels: one batched matmul that also scales the
    scores and adds the mask (``baddbmm``), a softmax that upcasts to float32, and an in-place add
    into the step buffer. The mask's bias is built once per step and device (the layers of one
    device share the mask object); head selection, the head sum and the image-column gather run
    once per step, on the accumulator device (``image_positions``' device), to which each layer's
    softmax rows are moved (a no-op for layers already there).
    """

    image_positions: torch.Tensor          # (B, N_max) int64 key positions, padded per item
    heads: torch.Tensor | None             # selected query heads, None = all
    num_layers: int                        # number of selected layers
    num_heads: int                         # number of selected heads
    queries: int = 1                       # Q: the last Q query positions of each step are captured
    # (B, H, Q, K) float32: this step's softmax rows summed over layers (all on image_positions' device)
    step_sum: torch.Tensor | None = None
    layers_seen: int = 0
    # device -> (the attention mask the bias was built from, its :func:`_additive_mask_row` bias of
    # the captured queries in the query dtype on that device)
    biases: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor]] = dataclasses.field(
        default_factory=dict)
    # per step (B, N_max) float32 when queries == 1, (B, Q, N_max) float32 (oldest query first) when > 1
    rows: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def start_step(self) -> None:
        self.step_sum = None
        self.biases = {}
        self.layers_seen = 0

    def _newest_query_bias(self, attention_mask: torch.Tensor | None, batch: int, num_kv_heads: int,
                           keys: int, like: torch.Tensor, group: int = 1) -> torch.Tensor:
        """:func:`_additive_mask_row` of the captured queries on ``like``'s device, built once per
        step and device (the layers of one device get the same mask object); ``group``: query heads
        per key/value head."""
        cached = self.biases.get(like.device)
        if cached is None or attention_mask is not cached[0]:
            bias = _additive_mask_row(attention_mask, batch, num_kv_heads, keys, like, self.queries, group)
            cached = (attention_mask, bias)
            self.biases[like.device] = cached
        return cached[1]

    def observe(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None) -> None:
        """Add one layer's softmax rows of the last ``queries`` queries (all heads) to the step buffer.

        ``query``: (B, H, Q_step, D), Q_step >= ``queries`` (ValueError otherwise, e.g. a decoding
        step of ``generate`` under ``queries`` > 1); ``key``: (B, H_kv, K, D) including the cache
        (query head h reads key head h // (H / H_kv), as transformers' ``repeat_kv``; the query
        positions are the last Q_step key positions); ``attention_mask``: None (causal, no padding),
        SDPA's 4D mask (B, 1, Q_step, K) (bool: True = attend; float: additive) or flash's 2D
        padding mask (B, K) (nonzero = real token); all on the layer's device, which may differ
        from the accumulator's (the rows are moved there).
        """
        batch, num_heads, step_queries, head_dim = query.shape
        if step_queries < self.queries:
            raise ValueError(f"the recording captures the last {self.queries} queries of each forward call, "
                             f"but a call brought {step_queries} (a decoding step of generate?)")
        num_kv_heads, keys = key.shape[1], key.shape[2]
        group = num_heads // num_kv_heads
        captured = query[:, :, -self.queries:, :].reshape(batch * num_kv_heads, group * self.queries, head_dim)
        keys_t = key.reshape(batch * num_kv_heads, keys, head_dim).transpose(1, 2)
        bias = self._newest_query_bias(attention_mask, batch, num_kv_heads, keys, query, group)
        scores = torch.baddbmm(bias, captured, keys_t, beta=0 if attention_mask is None and self.queries == 1 else 1,
                               alpha=head_dim ** -0.5 if scaling is None else scaling)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).view(batch, num_heads, self.queries, keys)
        probs = probs.to(self.image_positions.device)
        if self.step_sum is None:
            self.step_sum = probs
        else:
            self.step_sum.add_(probs)
        self.layers_seen += 1

    def end_step(self) -> None:
        if self.layers_seen != self.num_layers:
            raise CaptureError(
                f"attention capture saw {self.layers_seen} of {self.num_layers} selected layers in one "
                "forward call; the model's attention does not go through the capture implementation")
        selected = self.step_sum if self.heads is None else self.step_sum.index_select(1, self.heads)
        index = self.image_positions[:, None, :].expand(-1, self.queries, -1)
        image_columns = selected.sum(dim=1).gather(2, index) / (self.num_layers * self.num_heads)
        self.rows.append(image_columns[:, 0] if self.queries == 1 else image_columns)
        self.start_step()


class AttentionCapture:
    """Record, per forward step of ``model``, the newest query's attention over the image tokens.

    ``model``: a LLaVA-family ``*ForConditionalGeneration`` whose language model runs "sdpa" or
    "flash_attention_2". ``layers`` / ``heads``: ``"all"`` or lists of language-model layer / query
    head indices (negative indices count from the end, as in Python). Rows are the mean over the
    selected layers and heads of the softmax probabilities (each row sums to at most 1).

    Usage::

        capture = AttentionCapture(model, layers="all", heads="all")
        positions = image_token_positions(inputs["input_ids"], model.config.image_token_id)
        with capture.recording(positions):
            out = model.generate(**inputs, do_sample=False, max_new_tokens=T)
        rows = capture.rows()        # (B, steps, N_img) float32; row j belongs to generated token j

    With a different number of image keys per item, pass one 1-D position tensor per item and read
    ``capture.item_rows()``: item b's (steps, N_b) rows.

    Teacher forcing: one forward over prompts + forced answers (:func:`left_pad`), the last
    ``queries`` = T_max + 1 query positions captured::

        input_ids, attention_mask = left_pad([torch.cat([p, a]) for p, a in zip(prompts, answers)], pad_id)
        positions = image_token_positions(input_ids, model.config.image_token_id)
        with capture.recording(positions, queries=max(len(a) for a in answers) + 1):
            model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        rows = [forced_rows(q, len(a), "emitting") for q, a in zip(capture.query_rows(), answers)]

    Outside ``recording`` the model is untouched.
    """

    def __init__(self, model: nn.Module, layers: Literal["all"] | Sequence[int] = "all",
                 heads: Literal["all"] | Sequence[int] = "all"):
        try:
            decoder_layers = model.model.language_model.layers
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no model.language_model.layers; "
                             "attention capture supports the LLaVA family") from None
        text_config = model.config.get_text_config()
        self.model = model
        self.layers = _normalise_indices(layers, len(decoder_layers), "layers")
        self.heads = _normalise_indices(heads, text_config.num_attention_heads, "heads")
        self._all_heads = isinstance(heads, str)
        self._attention_modules = [decoder_layers[i].self_attn for i in self.layers]
        self._recording: _Recording | None = None
        self._rows: torch.Tensor | None = None
        self._lengths: list[int] = []
        self._queries = 1
        self._text_implementation()
        register_capture_attention()

    def _text_implementation(self) -> str:
        """The language model's attention implementation; ValueError when capture cannot run over it."""
        implementation = self.model.config.get_text_config()._attn_implementation
        if implementation not in CAPTURABLE_IMPLEMENTATIONS:
            raise ValueError(f"attention capture runs over {list(CAPTURABLE_IMPLEMENTATIONS)}; "
                             f"the language model uses {implementation!r}")
        return implementation

    @contextlib.contextmanager
    def recording(self, image_positions: torch.Tensor | Sequence[torch.Tensor],
                  queries: int = 1) -> Iterator[AttentionCapture]:
        """Capture every forward call of the model made inside the block.

        ``image_positions``: key positions of the image tokens of each sequence, on the device of
        the model's input embedding (where the rows are accumulated): a (B, N_img) int64 tensor
        (see :func:`image_token_positions`), or B 1-D tensors when items have different numbers of
        image tokens (see :func:`padded_positions`). ``queries``: how many query positions, the
        last of each forward call, are captured: 1 (the newest; generation, read :meth:`rows`) or
        Q > 1 (teacher forcing, read :meth:`query_rows`; every forward call inside the block must
        bring at least Q positions, else ValueError). Rows of a previous recording are discarded.
        """
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an integer >= 1, got {queries!r}")
        if self._recording is not None:
            raise RuntimeError("a recording is already open on this model")
        padded, lengths = padded_positions(image_positions)
        original = self._text_implementation()
        heads = None if self._all_heads else torch.tensor(self.heads, device=padded.device)
        recording = _Recording(image_positions=padded, heads=heads, num_layers=len(self.layers),
                               num_heads=len(self.heads), queries=queries)
        self._recording, self._rows, self._lengths, self._queries = recording, None, lengths, queries
        hooks = [self.model.register_forward_pre_hook(lambda module, args: recording.start_step()),
                 self.model.register_forward_hook(lambda module, args, output: recording.end_step())]
        for module in self._attention_modules:
            _ACTIVE_RECORDINGS[id(module)] = recording
        try:
            self.model.set_attn_implementation({"text_config": CAPTURE_PREFIX + original})
            yield self
        finally:
            self.model.set_attn_implementation({"text_config": original})
            for module in self._attention_modules:
                _ACTIVE_RECORDINGS.pop(id(module), None)
            for hook in hooks:
                hook.remove()
            self._recording = None
            query_shape = () if queries == 1 else (queries,)
            self._rows = (torch.stack(recording.rows, dim=1) if recording.rows else
                          torch.zeros(padded.shape[0], 0, *query_shape, padded.shape[1], device=padded.device))
            _zero_padding(self._rows, lengths)

    def _finished_rows(self) -> torch.Tensor:
        """The last recording's rows: (B, steps, N_max), or (B, steps, Q, N_max) with queries > 1."""
        if self._rows is None:
            raise RuntimeError("no finished recording")
        return self._rows

    def rows(self) -> torch.Tensor:
        """Rows of the last recording: (B, steps, N_max) float32 on the image positions' device;
        item b's rows are ``[:, :, :N_b]``, the columns after them are 0 (see :meth:`item_rows`).
        RuntimeError when the recording captured several queries per step (see :meth:`query_rows`)."""
        rows = self._finished_rows()
        if self._queries != 1:
            raise RuntimeError(f"the last recording captured {self._queries} queries per forward call; "
                               "read query_rows()")
        return rows

    def query_rows(self) -> list[torch.Tensor]:
        """Rows of the last ``queries`` = Q > 1 recording's one forward call, per batch item: B tensors
        (Q, N_b) float32 (views) on the image positions' device; row i is the query at position
        L - Q + i of the (left-padded, length L) input, i.e. the oldest query first, column k item
        b's k-th image position. A row of a query at a padding position is meaningless (it may be
        NaN). RuntimeError when the recording had queries=1 (read :meth:`rows`) or did not hold
        exactly one forward call.
        """
        rows = self._finished_rows()
        if self._queries == 1:
            raise RuntimeError("the last recording captured one query per forward call; read rows()")
        if rows.shape[1] != 1:
            raise RuntimeError(f"query_rows() reads a recording of one forward call; the last one held "
                               f"{rows.shape[1]}")
        return [rows[b, 0, :, :length] for b, length in enumerate(self._lengths)]

    def item_rows(self) -> list[torch.Tensor]:
        """Rows of the last recording per batch item: B tensors (steps, N_b) float32 (views of
        :meth:`rows`), column k belonging to item b's k-th image position."""
        rows = self.rows()
        return [rows[b, :, :length] for b, length in enumerate(self._lengths)]


def _zero_padding(rows: torch.Tensor, lengths: Sequence[int]) -> None:
    """Set the padded columns of ``rows`` (B, ..., N_max) to 0 in place: item b's columns >= N_b."""
    for b, length in enumerate(lengths):
        rows[b, ..., length:] = 0


def left_pad(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded batch of token sequences, e.g. each item's unpadded prompt ids followed by its
    forced answer's ids (teacher forcing).

    ``sequences``: B 1-D int tensors (lengths L_b >= 1) on one device. Returns ``(input_ids,
    attention_mask)``, both (B, max L_b) int64 on that device: item b's ids in the last L_b columns
    after ``pad_id`` padding, and 1 on them, 0 on the padding. Every item ends at the last column,
    which :func:`forced_rows` relies on. ValueError for an empty batch or an empty sequence.

    As for any batch of ``model(...)`` without a cache, the positions of a plain forward start at 0
    in the first column (padding included), while ``generate`` counts them from each item's first
    real token; rotary embeddings depend on relative positions only, so the attention matches the
    generated one up to float rounding.
    """
    items = [torch.as_tensor(sequence).long().reshape(-1) for sequence in sequences]
    if not items or min(len(item) for item in items) == 0:
        raise ValueError(f"left_pad needs non-empty sequences; got lengths {[len(item) for item in items]}")
    longest = max(len(item) for item in items)
    input_ids = items[0].new_full((len(items), longest), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for b, item in enumerate(items):
        input_ids[b, longest - len(item):] = item
        attention_mask[b, longest - len(item):] = 1
    return input_ids, attention_mask


def forced_rows(query_rows: torch.Tensor, answer_length: int,
                semantics: Literal["emitting", "own"]) -> torch.Tensor:
    """The rows of a forced answer's tokens, from one item's :meth:`AttentionCapture.query_rows`.

    Convention: the forward input is left-padded ``[pad..., prompt_0 .. prompt_{P-1}, a_0 ..
    a_{T-1}]`` (:func:`left_pad`: every item ends at the last column) and the recording captured
    ``queries`` = Q = T_max + 1 (T_max: the batch's longest answer), so that the item's last T + 1
    captured queries are the positions of prompt_{P-1}, a_0, ..., a_{T-1}.

    ``query_rows``: (Q, N) float32, oldest query first; ``answer_length``: T, 0 <= T <= Q - 1
    (ValueError otherwise); ``semantics``: "emitting" gives a_j the row of the query at a_{j-1}
    (prompt_{P-1} for j = 0), the query whose logits predict a_j, exactly what generation records
    when it emits a_j; "own" gives a_j the row of its own position. Returns (T, N) float32, a view
    of ``query_rows``: row j belongs to a_j.
    """
    queries = query_rows.shape[0]
    if not 0 <= answer_length < queries:
        raise ValueError(f"an answer of {answer_length} tokens needs 0 <= length <= queries - 1 = {queries - 1} "
                         "(record with queries = longest answer + 1)")
    if semantics == "emitting":
        return query_rows[queries - answer_length - 1:queries - 1]
    if semantics == "own":
        return query_rows[queries - answer_length:]
    raise ValueError(f"semantics must be 'emitting' or 'own', got {semantics!r}")


def eager_reference_rows(attentions: Sequence[Sequence[torch.Tensor]], image_positions: torch.Tensor,
                         layers: Sequence[int] | None = None,
                         heads: Sequence[int] | None = None) -> torch.Tensor:
    """The same rows computed the release's way, from eager ``output_attentions=True`` generation.

    ``attentions``: ``generate(..., output_attentions=True, return_dict_in_generate=True).attentions``,
    per step a tuple over layers of (B, H, Q, K) probabilities; ``image_positions``: (B, N_img), or
    B 1-D tensors of per-item lengths N_b; ``layers`` / ``heads``: non-negative indices, None = all.
    Returns (B, steps, N_max) float32, item b's rows in ``[:, :, :N_b]`` and 0 after them, as
    :meth:`AttentionCapture.rows`. Used as the reference in tests and benchmarks.
    """
    image_positions, lengths = padded_positions(image_positions)
    steps = []
    for step_attentions in attentions:
        selected = layers if layers is not None else range(len(step_attentions))
        per_layer = [step_attentions[i] for i in selected]
        device = per_layer[0].device       # a model spread over GPUs: rows gathered on the first layer's
        newest = torch.stack([a[:, :, -1, :].float().to(device) for a in per_layer])  # (layers, B, H, K)
        if heads is not None:
            newest = newest[:, :, list(heads)]
        mean = newest.mean(dim=(0, 2))                                             # (B, K)
        steps.append(mean.gather(1, image_positions.to(mean.device)))
    rows = torch.stack(steps, dim=1)
    _zero_padding(rows, lengths)
    return rows
