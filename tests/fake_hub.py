"""A fake Hugging Face hub cache for the loader tests: snapshot folders under real hub ids, the
environment that makes transformers read them offline, and a Llama-shaped tokenizer to put in them."""

from __future__ import annotations

import json
from collections.abc import Sequence


def snapshot(cache, repo_id: str):
    """The snapshot folder of ``repo_id`` in a hub cache (models--owner--name/snapshots/<hash>, with
    refs/main naming the hash), created empty."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = format(abs(hash(repo_id)), "040x")[-40:]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


def use_offline_cache(monkeypatch, cache) -> None:
    """HF_HUB_CACHE = ``cache``, HF_HUB_OFFLINE=1, in the environment and in huggingface_hub's
    constants (which are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def llama_bpe_tokenizer(corpus: Sequence[str], **kwargs):
    """A Llama-2-shaped tokenizer (Vicuna, Mistral): BPE over "▁"-joined text learned from ``corpus``,
    byte fallback, specials <unk>=0, <s>=1, </s>=2, no pad token; ``kwargs`` go to LlamaTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner.train_from_iterator(list(corpus) * 5, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], **kwargs)
