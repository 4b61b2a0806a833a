"""Which devices a job computes on, and how a model is laid over them.

Claiming. Snakemake counts the `gpu` resource but does not tell a local job which GPUs to use. A GPU
job therefore claims as many free devices as its rule requested (``gpu=N``; the generate rule asks
for ``lmm.gpus``) with an exclusive file lock per device (``gpu-<id>.lock`` in a lock folder shared
by the jobs of a node), over the devices listed in ``CUDA_VISIBLE_DEVICES`` (or all devices), and
holds them until the process exits — an OS-level ``flock`` is released even when the job is killed.
A claim of N devices is all or nothing: a job never waits while holding a lock (it releases what it
holds when it cannot get all N and tries again later), so two jobs can never deadlock each holding
part of what the other needs. With ``snakemake --resources gpu=G`` and G devices, a job always finds
its N free. When exactly N devices are visible (Slurm sets ``CUDA_VISIBLE_DEVICES`` to the job's own
GPUs; a workstation with N GPUs) the job simply takes them (no other job of ours can use them).

Placement. On one device a model is moved there whole (``model.to``). Over several CUDA devices it
is spread with accelerate: a balanced device map over exactly those devices (each device's free
memory is its budget; the model's ``_no_split_modules``, e.g. decoder layers, are never cut), then
hooks that move each block's inputs to its device (``dispatch_model``; ``from_pretrained`` with
``device_map="auto"`` and the same ``max_memory`` does the same while loading). A model that does not
fit on the claimed devices is a ConfigError (no offloading to the CPU or disk). The caller feeds
token inputs to the device of the input embedding and pixel values to the vision tower's device
(:func:`input_devices`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from stages.config import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "AAS_GPU_LOCK_DIR"


def default_lock_dir() -> Path:
    """``$AAS_GPU_LOCK_DIR`` or ``<tmp>/aas-gpu-locks`` (shared by all jobs of one node)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "aas-gpu-locks")


def visible_device_ids(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """Physical ids (or UUIDs) of the visible GPUs, in CUDA's index order.

    ``cuda_visible_devices`` is the environment value (None = unset: all ``device_count`` devices).
    Index i of the returned list is what torch calls ``cuda:i``.
    """
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    ids = [part.strip() for part in cuda_visible_devices.split(",") if part.strip()]
    return ids[:device_count]


def claim_gpus(device_ids: Sequence[str], lock_dir: str | os.PathLike, count: int = 1, *,
               timeout_s: float = 3600.0, poll_s: float = 1.0) -> tuple[list[int], list[FileLock]]:
    """Lock ``count`` free devices of ``device_ids`` together; return (their indices in the list, in
    increasing order, and the held locks).

    Each try takes the free devices in list order without waiting; when fewer than ``count`` were
    free it releases those it took (all or nothing), sleeps ``poll_s`` times a random factor in
    [0.5, 1.5) (so that claimants that collided do not collide again in step) and tries again, up to
    ``timeout_s``; then it raises ``TimeoutError`` naming the lock folder. ValueError when ``count``
    is below 1 or above the number of ids.
    """
    if not device_ids:
        raise ValueError("no GPU ids to claim from")
    if not 1 <= count <= len(device_ids):
        raise ValueError(f"cannot claim {count} of the {len(device_ids)} GPUs {list(device_ids)}")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    jitter = random.SystemRandom()
    while True:
        indices: list[int] = []
        locks: list[FileLock] = []
        for index, device_id in enumerate(device_ids):
            lock = FileLock(str(lock_dir / f"gpu-{device_id}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            indices.append(index)
            locks.append(lock)
            if len(locks) == count:
                return indices, locks
        for lock in locks:
            lock.release()
        if time.monotonic() > deadline:
            wanted = "one free GPU" if count == 1 else f"{count} free GPUs at once"
            raise TimeoutError(f"all GPUs {list(device_ids)} stayed locked for {timeout_s:.0f} s ({wanted} "
                               f"needed; locks in {lock_dir}); run with --resources gpu=<number of GPUs>")
        time.sleep(poll_s * jitter.uniform(0.5, 1.5))


@contextlib.contextmanager
def claimed_devices(count: int = 1, *, lock_dir: str | os.PathLike | None = None) -> Iterator[list[str]]:
    """Yield the ``count`` torch device strings this job computes on, holding their claim meanwhile.

    Without CUDA, or with ``count`` 0 (the rule asked for no GPU: config ``cluster.request_gpus``
    false): ``["cpu"]`` (the whole model runs on the CPU). With exactly ``count`` visible GPUs: all of
    them, unclaimed (Slurm: the job's own). With more: ``count`` free ones claimed with
    :func:`claim_gpus` (the first becomes torch's current device). ValueError when fewer than ``count``
    GPUs are visible.
    """
    import torch

    if count < 0:
        raise ValueError(f"a job cannot ask for {count} GPUs")
    if count == 0 or not torch.cuda.is_available():
        yield ["cpu"]
        return
    ids = visible_device_ids(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    if len(ids) < count:
        raise ValueError(f"the job needs {count} GPUs but sees {len(ids)} ({ids}; CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if len(ids) == count:
        yield [f"cuda:{index}" for index in range(count)]
        return
    indices, locks = claim_gpus(ids, lock_dir or default_lock_dir(), count)
    log.info("claimed GPU(s) %s (%s)", ", ".join(ids[i] for i in indices),
             ", ".join(f"cuda:{i}" for i in indices))
    try:
        torch.cuda.set_device(indices[0])
        yield [f"cuda:{index}" for index in indices]
    finally:
        for lock in locks:
            lock.release()


@contextlib.contextmanager
def claimed_device(requested: str | None = None, *,
                   lock_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield the torch device string this job computes on, holding its GPU claim meanwhile.

    ``requested``: None/"auto" (a free GPU if CUDA is available, else "cpu": :func:`claimed_devices`
    with one device), "cpu", or an explicit "cuda:N" (used as given, no claim).
    """
    if requested not in (None, "auto"):
        yield requested
        return
    with claimed_devices(1, lock_dir=lock_dir) as devices:
        yield devices[0]


def as_devices(device: str | torch.device | Sequence[str | torch.device]) -> list[torch.device]:
    """One device, or several, as a list of torch devices.

    Several devices must be distinct CUDA devices with an index ("cuda:0", "cuda:1", ...): only
    those can share a model. ValueError otherwise, or for an empty sequence.
    """
    import torch

    if isinstance(device, (str, torch.device)):
        return [torch.device(device)]
    devices = [torch.device(d) for d in device]
    if not devices:
        raise ValueError("no device given")
    if len(devices) > 1 and (any(d.type != "cuda" or d.index is None for d in devices)
                             or len(set(devices)) != len(devices)):
        raise ValueError("a model is spread over distinct CUDA devices cuda:N only, "
                         f"got {[str(d) for d in devices]}")
    return devices


def max_memory_of(devices: Sequence[torch.device]) -> dict[int, int]:
    """accelerate's ``max_memory`` for CUDA ``devices``: index -> free bytes now (what accelerate
    assumes by default for every visible GPU, restricted to these)."""
    import torch

    return {d.index: int(torch.cuda.mem_get_info(d.index)[0]) for d in devices}


def no_split_classes(model: nn.Module, keep_whole: Sequence[str] = ()) -> list[str]:
    """Class names accelerate must not cut across devices: the model's ``_no_split_modules`` (its
    decoder and encoder layers, gathered by transformers from every sub-model) plus ``keep_whole``."""
    return sorted(set(getattr(model, "_no_split_modules", None) or ()) | set(keep_whole))


def plan_device_map(model: nn.Module, max_memory: Mapping[int, int],
                    keep_whole: Sequence[str] = ()) -> dict[str, int]:
    """A balanced device map of ``model`` (module name -> CUDA index) within ``max_memory`` (CUDA
    index -> bytes; sizes are the parameters' and buffers' as they are now).

    accelerate's ``get_balanced_memory`` + ``infer_auto_device_map`` (what ``from_pretrained``'s
    ``device_map="auto"`` runs), never cutting a module of a class in :func:`no_split_classes`.
    ConfigError naming lmm.gpus when some modules would have to go to the CPU or disk.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = no_split_classes(model, keep_whole)
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
    device_map = dict(infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split))
    check_device_map(device_map, list(max_memory))
    return device_map


def check_device_map(device_map: Mapping[str, Any], indices: Sequence[int]) -> None:
    """ConfigError naming lmm.gpus unless every module of ``device_map`` (module name -> CUDA index,
    "cpu" or "disk") sits on one of the CUDA devices ``indices``."""
    elsewhere = {name: device for name, device in device_map.items() if device not in indices}
    if elsewhere:
        gpus = ", ".join(f"cuda:{index}" for index in indices)
        raise ConfigError(f"the model does not fit in the free memory of its {len(indices)} GPUs ({gpus}): "
                          f"{len(elsewhere)} modules would go to {sorted(set(map(str, elsewhere.values())))} "
                          f"(e.g. {next(iter(elsewhere)) or 'the whole model'}); raise lmm.gpus")


def pretrained_placement(device: str | torch.device | Sequence[str | torch.device]) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that load a model straight onto several devices:
    ``device_map="auto"`` with ``max_memory`` restricted to them (:func:`max_memory_of`); none for one
    device (the loader then moves the model with :func:`place_model`)."""
    devices = as_devices(device)
    if len(devices) == 1:
        return {}
    return {"device_map": "auto", "max_memory": max_memory_of(devices)}


def place_model(model: nn.Module, device: str | torch.device | Sequence[str | torch.device], *,
                keep_whole: Sequence[str] = ()) -> None:
    """Put ``model`` on ``device`` (one device or several CUDA devices), in place.

    One device: ``model.to(device)``. Several: a model that ``from_pretrained`` already spread
    (:func:`pretrained_placement`, it has ``hf_device_map``) is checked to sit on exactly those
    devices; a model built in memory is spread with :func:`plan_device_map` (``keep_whole``: further
    class names to keep on one device, e.g. a vision tower whose forward mixes its sub-modules'
    outputs itself) and accelerate's ``dispatch_model`` (the model's ``_skip_keys_device_placement``,
    e.g. the KV cache, are not moved by the hooks). ConfigError naming lmm.gpus when it does not fit.
    """
    devices = as_devices(device)
    if len(devices) == 1:
        model.to(devices[0])
        return
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        from accelerate import dispatch_model

        device_map = plan_device_map(model, max_memory_of(devices), keep_whole)
        dispatch_model(model, device_map, main_device=devices[0],      # where the input embedding sits
                       skip_keys=sorted(getattr(model, "_skip_keys_device_placement", None) or ()))
    else:
        check_device_map(device_map, [d.index for d in devices])
    per_device = Counter(f"cuda:{index}" for index in device_map.values())
    log.info("%s spread over %s (modules per device: %s)", type(model).__name__,
             ", ".join(map(str, devices)), dict(sorted(per_device.items())))


@dataclasses.dataclass(frozen=True)
class InputDevices:
    """Where a placed LMM takes its inputs: token ids and masks at its input embedding (``tokens``),
    pixel values at its vision tower (``pixels``); both the model's device when it has one."""

    tokens: torch.device
    pixels: torch.device


def input_devices(model: nn.Module) -> InputDevices:
    """:class:`InputDevices` of a LLaVA-family or Qwen2.5-VL model: the device of
    ``model.get_input_embeddings().weight`` and of the first parameter of the image encoder
    (``model.get_encoder(modality="image")``: ``vision_tower`` / ``visual``)."""
    tower = model.get_encoder(modality="image")
    return InputDevices(tokens=model.get_input_embeddings().weight.device,
                        pixels=next(tower.parameters()).device)
