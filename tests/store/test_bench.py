"""The store benchmark's --quick smoke run still works (it runs from a source checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_store.py"


def test_bench_store_quick(tmp_path):
    if not BENCH.exists():
        pytest.skip("benchmarks/ is not present next to the tests")
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-s3", "--tokens", "8192"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "store/plain =" in out.stdout and "smaller" in out.stdout
