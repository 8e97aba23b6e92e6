"""The pooling benchmark runs end to end on a tiny input and its three paths agree."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pooling.py"


@pytest.mark.slow
def test_bench_pooling_tiny_run(tmp_path):
    if not BENCH.exists():
        pytest.skip(f"{BENCH} is absent (tests run outside the repository)")
    pytest.importorskip("jax", reason="the benchmark compares against a jitted JAX version")
    out = subprocess.run(
        [sys.executable, str(BENCH), "--mib", "1", "--dim", "64", "--repeats", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("mean", "max", "min", "last", "sum", "softmax"):
            table[parts[0]] = parts
    assert set(table) == {"mean", "max", "min", "last", "sum", "softmax"}, out.stdout
    for name, parts in table.items():
        err_native, err_jax = float(parts[-3]), float(parts[-2])
        assert err_jax < 1e-5, (name, out.stdout)  # jax agrees with the numpy fallback
        if parts[1] != "nan":
            assert err_native < 1e-5, (name, out.stdout)
