"""What every workflow job does around its stage (stages/runner.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stages.runner import stage_logging

JOB = """
import sys
from stages.runner import stage_logging
with stage_logging(sys.argv[1], threads={threads}):
    imported_before = "torch" in sys.modules
    import torch
    print(imported_before, torch.get_num_threads())
"""


def test_a_job_gets_its_threads_without_importing_torch_itself(tmp_path):
    """A job that never uses torch does not pay its import; one that does gets the job's thread count (one
    that differs from the count torch takes by itself, one per core)."""
    threads = 1 if os.cpu_count() != 1 else 2
    log = tmp_path / "job.log"
    subprocess.run([sys.executable, "-c", JOB.format(threads=threads), str(log)], check=True, timeout=120)
    assert log.read_text().split() == ["False", str(threads)]


def test_a_failing_job_logs_why(tmp_path):
    log = tmp_path / "logs" / "job.log"
    with pytest.raises(ValueError, match="no such image"), stage_logging(log):
        raise ValueError("no such image")
    assert "stage failed" in log.read_text() and "ValueError: no such image" in log.read_text()
