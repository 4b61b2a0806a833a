"""Progress as periodic log lines (stages.progress): how many lines, what they say, when tqdm is used."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from stages.progress import DEFAULT_LINES, ProgressLog, progress_bar

log = logging.getLogger("test_progress")
LINE = re.compile(r"^train: step (\d+)/(\d+), loss \d+\.\d{3}, \d+ s elapsed, ETA \d+ s$")


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test_progress"]


@pytest.mark.parametrize(("total", "lines"), [(2400, 25), (1200, 25), (7, 7), (1, 1), (100, 25)])
def test_about_default_lines_for_a_whole_run_and_always_the_last_step(caplog, total, lines):
    caplog.set_level(logging.INFO)
    progress = ProgressLog(total, "train", logger=log)
    for _ in range(total):
        progress.update(loss=0.5)
    logged = messages(caplog)
    assert len(logged) == lines <= DEFAULT_LINES
    assert all(LINE.match(message) for message in logged), logged
    counts = [int(LINE.match(message)[1]) for message in logged]
    assert counts == sorted(counts) and counts[-1] == total
    assert logged[-1].endswith("ETA 0 s")


def test_updates_of_several_units_log_when_they_cross_a_multiple(caplog):
    caplog.set_level(logging.INFO)
    with ProgressLog(20, "generate shard 0", logger=log, unit="image", every=5) as progress:
        for _ in range(7):
            progress.update(3)
    logged = messages(caplog)
    # 3 6 9 12 15 18 21: lines at 6 (>= 5), 12 (>= 10), 15, 21 (>= 20 = total)
    assert [re.search(r"image (\d+)/20", message)[1] for message in logged] == ["6", "12", "15", "21"]
    assert "iou2" not in logged[0] and "elapsed" in logged[0]


def test_values_are_shown_by_name(caplog):
    caplog.set_level(logging.INFO)
    ProgressLog(1, "training tiny SAM", logger=log).update(loss=1.23456, iou2=0.5, note="x")
    expected = "training tiny SAM: step 1/1, loss 1.235, iou2 0.500, note x, 0 s elapsed, ETA 0 s"
    assert messages(caplog) == [expected]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_anything_else_log_lines(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(3, "x", logger=log), ProgressLog)
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    with progress_bar(3, "x", logger=log) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
