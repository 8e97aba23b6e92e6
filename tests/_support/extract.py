"""Running `python -m mup.extract` as users do (a subprocess away from the source tree), and
comparing the stores it writes array by array."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LAYERS = "1,2"  # the --layers of the extraction tests: both blocks of the tiny checkpoint


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_cli(args, cwd, env=None, timeout=300, module="mup.extract") -> subprocess.CompletedProcess:
    """`python -m mup.extract ARGS` in a subprocess (cwd away from the source tree)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def store_dirs(out) -> list[Path]:
    """The store directories under a local --out (one per data set)."""
    return sorted(p.parent for p in Path(out).glob("*/*/zarr.json"))


def read_all(url: str) -> dict[str, np.ndarray]:
    """Every array of a store, read through tensorstore (works for local and s3 URLs)."""
    from mup import store
    from mup.store._io import open_array as _open_array
    from mup.store._location import parse_location

    opened = store.open(url, require_complete=False)
    loc = parse_location(url)
    names = ["offsets", "ids", "input_ids", "roles", "mask", "done"]
    if opened.labels is not None:
        names.append("labels")
    arrays = {name: _open_array(loc.kvstore(name)).read().result() for name in names}
    for layer in opened.layers:
        arrays[f"layers/{layer}"] = _open_array(loc.kvstore(f"layers/{layer}")).read().result()
    return arrays


def assert_same_store(a: str, b: str, layer_atol: float = 0.0) -> None:
    """Equal arrays (bit for bit; layer arrays within `layer_atol` when it is set) and equal
    job attributes (timestamps aside)."""
    from mup import store

    got, want = read_all(a), read_all(b)
    assert sorted(got) == sorted(want)
    for name in want:
        if layer_atol and name.startswith("layers/"):
            np.testing.assert_allclose(got[name], want[name], rtol=4e-6, atol=layer_atol)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"array {name}")
    skip = {"created", "completed"}
    attrs_a = {k: v for k, v in store.open(a).attrs.items() if k not in skip}
    attrs_b = {k: v for k, v in store.open(b).attrs.items() if k not in skip}
    assert attrs_a == attrs_b
    for url in (a, b):  # every object present, every chunk checksum sound
        verdict = store.verify(url)
        assert verdict.ok, verdict.line()
