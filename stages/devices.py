"""Which device a job computes on: one GPU per job for its lifetime, or the CPU.

Snakemake counts the `gpu` resource but does not tell a local job which GPU to use. A GPU job
therefore claims one free device with an exclusive file lock per device (``gpu-<id>.lock`` in a
lock folder shared by the jobs of a node), over the devices listed in ``CUDA_VISIBLE_DEVICES``
(or all devices), and holds it until the process exits — an OS-level ``flock`` is released even
when the job is killed. With ``snakemake --resources gpu=G`` and G devices, a job always finds one
free. Under Slurm the scheduler sets ``CUDA_VISIBLE_DEVICES`` to the job's own GPU(s), so the
claim simply takes the first of them (no other job of ours can see it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

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


def claim_gpu(device_ids: Sequence[str], lock_dir: str | os.PathLike, *, timeout_s: float = 3600.0,
              poll_s: float = 1.0) -> tuple[int, FileLock]:
    """Lock the first free device of ``device_ids``; return (its index in the list, the held lock).

    Waits (polling every ``poll_s``) up to ``timeout_s`` when every device is held by another job;
    raises ``TimeoutError`` naming the lock folder then.
    """
    if not device_ids:
        raise ValueError("no GPU ids to claim from")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index, device_id in enumerate(device_ids):
            lock = FileLock(str(lock_dir / f"gpu-{device_id}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return index, lock
        if time.monotonic() > deadline:
            raise TimeoutError(f"all GPUs {list(device_ids)} stayed locked for {timeout_s:.0f} s "
                               f"(locks in {lock_dir}); run with --resources gpu=<number of GPUs>")
        time.sleep(poll_s)


@contextlib.contextmanager
def claimed_device(requested: str | None = None, *, lock_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield the torch device string this job computes on, holding its GPU claim meanwhile.

    ``requested``: None/"auto" (a free GPU if CUDA is available, else "cpu"), "cpu", or an explicit
    "cuda:N" (used as given, no claim).
    """
    import torch

    if requested not in (None, "auto"):
        yield requested
        return
    if not torch.cuda.is_available():
        yield "cpu"
        return
    ids = visible_device_ids(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    if len(ids) == 1:
        yield "cuda:0"
        return
    index, lock = claim_gpu(ids, lock_dir or default_lock_dir())
    log.info("claimed GPU %s (cuda:%d)", ids[index], index)
    try:
        torch.cuda.set_device(index)
        yield f"cuda:{index}"
    finally:
        lock.release()
