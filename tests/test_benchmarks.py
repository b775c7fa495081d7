"""benchmarks/run.py works and prints `name: value` lines (bytes only: no timings here)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_quick_bytes_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "bytes"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = dict(re.findall(r"^(\w+): ([0-9.e+]+)$", result.stdout, re.M))
    assert set(figures) == {"bytes_ratio_mobilenet_v2", "bytes_ratio_resnet50"}
    # message sizes are deterministic: head-only traffic is far below the full model
    assert all(float(v) >= 100 for v in figures.values()), figures
