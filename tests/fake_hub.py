"""A fake Hugging Face hub cache for the loader tests: snapshot folders under real hub ids, the
environment that makes transformers read them offline (real tokenizers to put in them:
:mod:`real_tokenizers`)."""

from __future__ import annotations


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
