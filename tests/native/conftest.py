"""Fixtures of the native-core tests: every test runs on both backends ("native", "numpy")."""

import numpy as np
import pytest

import mup.native as mn

NOT_BUILT = "mup._native is not built (cmake build + copy, or pip install .)"


@pytest.fixture(params=["native", "numpy"])
def backend(request):
    """Force one backend for the whole test; native skips when the extension is absent."""
    if request.param == "native" and not mn.native_available():
        pytest.skip(NOT_BUILT)
    with mn.use_backend(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def make_ragged(rng):
    """make_ragged(lengths, d, dtype) -> random acts [T, D] of dtype and offsets int64 [N+1]."""

    def make(lengths, d, dtype=np.float32, scale=3.0):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        acts = (rng.standard_normal((int(offsets[-1]), d)) * scale).astype(dtype)
        return acts, offsets

    return make
