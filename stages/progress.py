"""Progress of a long loop as periodic log lines, for log files (a terminal gets a tqdm bar).

A tqdm bar written to a file is a stream of carriage-return refreshes on one ever-growing line;
:class:`ProgressLog` writes instead one ordinary log line every ``every`` units (by default about
:data:`DEFAULT_LINES` lines for the whole loop, and always one at the end) with the count, the total,
optional values (a running loss), the elapsed time and the estimated time left.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Self

DEFAULT_LINES = 25


class ProgressLog:
    """Counts units of work towards ``total`` and logs ``"{desc}: {unit} k/total, ..., elapsed, ETA"``
    to ``logger`` (INFO) whenever the count reaches a multiple of ``every`` and when it reaches
    ``total``. ``every`` defaults to ``ceil(total / lines)``. Usable as a context manager, like tqdm."""

    def __init__(self, total: int, desc: str, *, logger: logging.Logger, unit: str = "step",
                 lines: int = DEFAULT_LINES, every: int | None = None):
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.logger = logger
        self.every = max(1, int(every) if every is not None else math.ceil(self.total / max(1, lines)))
        self.count = 0
        self.start = time.perf_counter()
        self._next = self.every

    def update(self, n: int = 1, **values: Any) -> None:
        """Add ``n`` units; when a line is due, log it with ``values`` (``name value``, floats with three
        decimals)."""
        self.count += n
        if self.count < self._next and self.count != self.total:
            return
        self._next = (self.count // self.every + 1) * self.every
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.count * max(0, self.total - self.count) if self.count else float("nan")
        shown = "".join(f", {name} {value:.3f}" if isinstance(value, float) else f", {name} {value}"
                        for name, value in values.items())
        self.logger.info("%s: %s %d/%d%s, %.0f s elapsed, ETA %.0f s", self.desc, self.unit, self.count,
                         self.total, shown, elapsed, eta)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def progress_bar(total: int, desc: str, *, logger: logging.Logger, unit: str = "step") -> Any:
    """A tqdm bar when stderr is a terminal, else a :class:`ProgressLog` (a job's log file, a pipe):
    either has ``update(n)`` and is a context manager."""
    if sys.stderr is not None and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return ProgressLog(total, desc, logger=logger, unit=unit)
