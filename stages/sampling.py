"""Sampled decoding that a seed reproduces per sample, whatever the batch or the shard it runs in.

Each batch item draws its tokens from its own ``torch.Generator`` (on the CPU), seeded from the run's
seed and the item's ``sample_id`` (:func:`sample_seed`), and consumes exactly one uniform number per
token it emits. So the answer of a sample depends on the model, its prompt, its image, the settings and
the seed only, never on which other samples share its batch or its shard, and two runs of one config on
one machine give the same answers.

How it plugs into ``model.generate``: decoding stays greedy (``do_sample=False``) and
:class:`SeededSampler` is passed as a ``logits_processor``. At each step it takes the scores the model's
own processors left (B, V), draws each row's next token (:func:`draw_token`: temperature, then top-p,
then one draw by inverse CDF) and returns scores that are -inf everywhere except 0 at the drawn token,
so that greedy picks exactly that token. The attention capture (:mod:`stages.capture`) then records the
rows of the tokens actually emitted, as for a greedy answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


def sample_seed(seed: int, sample_id: str) -> int:
    """The seed of one sample's generator: the first 8 bytes of sha256(``"{seed}/{sample_id}"``) as a
    little-endian integer, 63 bits (``torch.Generator.manual_seed`` takes it). Different samples of one
    run, and one sample under different run seeds, get unrelated generators."""
    digest = hashlib.sha256(f"{int(seed)}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_token(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token drawn from one row of next-token scores.

    ``scores``: (V,) float logits (-inf = forbidden) on any device. The logits are divided by
    ``temperature`` (> 0) and turned into probabilities in float64; top-p keeps the most likely tokens
    (ties in token order) up to and including the first whose cumulative probability reaches ``top_p``
    (in (0, 1]; at least one token); the token is the first kept one whose cumulative kept mass exceeds
    ``u * total``, ``u`` one ``torch.rand`` draw of ``generator`` (a CPU generator). Returns its id.
    """
    probs = torch.softmax(scores.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    cumulative = sorted_probs.cumsum(0)
    kept = int(((cumulative - sorted_probs) < top_p).sum().clamp(min=1))
    bounds = cumulative[:kept]
    threshold = torch.rand((), generator=generator, dtype=torch.float64).to(bounds.device) * bounds[-1]
    index = int(torch.searchsorted(bounds, threshold, right=True).clamp(max=kept - 1))
    return int(order[index])


class SeededSampler(LogitsProcessor):
    """A ``logits_processor`` for greedy ``generate`` that samples instead (module docstring).

    ``seeds``: one generator seed per batch item (:func:`sample_seed`), in batch order;
    ``temperature`` > 0 and ``top_p`` in (0, 1] as :func:`draw_token` takes them. Called with
    ``input_ids`` (B, L) and ``scores`` (B, V) float; returns (B, V) scores of ``scores``' dtype,
    0 at each row's drawn token and -inf elsewhere. A row that has finished still draws (its tokens
    after the end are dropped), so each item uses its generator the same way alone or in a batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"the sampler has {len(self.generators)} generators for a batch of {scores.shape[0]}")
        chosen = torch.full_like(scores, float("-inf"))
        for b, generator in enumerate(self.generators):
            chosen[b, draw_token(scores[b], self.temperature, self.top_p, generator)] = 0
        return chosen
