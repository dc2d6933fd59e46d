"""Every benchmark script starts and shows its --help (imports included) without running anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

# common.py is imported by the others; rank_entry.py is one training rank, started by them.
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("common.py", "rank_entry.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
