"""Text encoders for phrase/category matching and GCG recall.

Every encoder maps a list of strings to an L2-normalised float32 array of shape (n, dim), so that
cosine similarity is a dot product. Each distinct string is embedded once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stages.config import ConfigError, resolve_model_path


class TextEncoder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _embed_distinct(texts: list[str], embed_unique) -> np.ndarray:
    unique = list(dict.fromkeys(texts))
    if not unique:
        return np.zeros((0, 0), dtype=np.float32)
    table = embed_unique(unique)
    index = {t: i for i, t in enumerate(unique)}
    return table[[index[t] for t in texts]]


@dataclass
class SpacyVectorEncoder:
    """spaCy document vectors (mean of word vectors), as the release's category matching."""

    nlp: object
    name: str = "spacy"

    def embed(self, texts: list[str]) -> np.ndarray:
        return _embed_distinct(texts, lambda unique: _normalise(np.stack([d.vector for d in self.nlp.pipe(unique)])))


class TransformerMeanEncoder:
    """Mean of the last hidden states over all tokens (special tokens included), then L2 norm.

    This is GLaMM's ``text_similarity_bert`` embedding (bert-base-uncased), batched with a padding
    mask so that batching does not change any vector.
    """

    def __init__(self, path: str, *, batch_size: int = 64, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        resolved = resolve_model_path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(resolved, trust_remote_code=False).to(device).eval()
        except (OSError, ValueError) as exc:  # ValueError: e.g. a model that needs its own code (never run)
            raise ConfigError(f"text encoder {path!r} cannot be loaded: {exc}") from None
        self.name = path
        self.batch_size = batch_size
        self.device = device
        self._torch = torch

    def _embed_unique(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=512).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy())
        return _normalise(np.concatenate(out))

    def embed(self, texts: list[str]) -> np.ndarray:
        return _embed_distinct(texts, self._embed_unique)


def load_text_encoder(kind: str, path: str | None, *, spacy_nlp=None) -> TextEncoder:
    """Return the encoder of ``kind``: ``spacy`` (needs a pipeline with word vectors),
    ``transformer`` (``path``: folder, hub id or ``python:<module>``) or ``auto`` (spaCy vectors when
    ``spacy_nlp`` has them, else the transformer at ``path``)."""
    has_vectors = spacy_nlp is not None and spacy_nlp.vocab.vectors.shape[0] > 0
    if kind == "spacy" or (kind == "auto" and has_vectors):
        if not has_vectors:
            raise ConfigError("text_encoder.kind=spacy but the spaCy model has no word vectors; "
                              "use kind: transformer with a path, or a spaCy model with vectors (e.g. en_core_web_lg)")
        return SpacyVectorEncoder(spacy_nlp)
    if kind in ("transformer", "auto"):
        if not path:
            raise ConfigError(f"text_encoder.kind={kind} needs a path (transformer folder or hub id)")
        return TransformerMeanEncoder(path)
    raise ConfigError(f"unknown text_encoder.kind {kind!r}; use auto, spacy or transformer")
