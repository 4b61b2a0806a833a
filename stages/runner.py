"""What every workflow job does around its stage: logging into the rule's log file, thread limits."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def stage_logging(log_path: str | os.PathLike, *, threads: int = 1) -> Iterator[logging.Logger]:
    """Send logging, warnings, stdout and stderr (progress bars) of the job to ``log_path``;
    limit torch's intra-op threads to the job's ``threads`` (:func:`limit_torch_threads`). A failure is logged with its traceback
    before it propagates, so the log file always says why a job failed."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Third-party progress bars (checkpoint loading) in a log file: one refresh every 10 s, not one per
    # update. The stages' own progress goes to the log as plain lines (stages.progress).
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    with open(log_path, "w", buffering=1) as stream, contextlib.redirect_stderr(stream), \
            contextlib.redirect_stdout(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        limit_torch_threads(threads)
        logger = logging.getLogger("stage")
        try:
            yield logger
        except BaseException:
            logger.exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)
            logging.captureWarnings(False)
    if sys.stderr is not None:
        sys.stderr.flush()


def limit_torch_threads(threads: int) -> None:
    """Give torch ``threads`` intra-op threads without importing it: a job that never uses torch
    (manifest, evaluation, summary) does not pay its import. ``OMP_NUM_THREADS`` is what torch reads
    when it is first imported; if it already is, its thread count is set directly."""
    count = max(1, int(threads))
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)
