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


def save_shards(folder, state, shards: int, shard_of=None) -> None:
    """Write the tensors of ``state`` as the hub publishes a large checkpoint: ``shards`` files
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` (``weight_map``, ``total_size``
    in bytes). ``shard_of``: key -> shard index (0-based); default, the sorted keys cut into equal runs."""
    import json

    from safetensors.torch import save_file

    keys = sorted(state)
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[shard_of(key) if shard_of else i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        save_file({key: state[key] for key in keys if weight_map[key] == name}, folder / name,
                  metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map}, indent=2))
