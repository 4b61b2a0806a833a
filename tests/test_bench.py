"""The capture benchmark runs and prints its ratios (a smoke run; timings themselves are not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_capture_benchmark_quick_run_prints_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_capture.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "capture/plain" in result.stdout and "eager/plain" in result.stdout
