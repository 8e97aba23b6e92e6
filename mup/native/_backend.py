"""Which implementation runs: the compiled `mup._native` or the numpy reference.

The compiled module is optional at runtime (a source checkout without a build, an exotic
platform); every kernel then falls back to numpy and says so once through `logging`.
`MUP_NATIVE=0` in the environment forces numpy, `use_backend` forces either for a block.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import Literal

log = logging.getLogger("mup.native")

BackendName = Literal["native", "numpy"]

try:
    from mup import _native as _native_module

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _native_module = None
    _IMPORT_ERROR = str(exc)

_forced: contextvars.ContextVar[BackendName | None] = contextvars.ContextVar(
    "mup_native_backend", default=None
)
_warned = False

BUILD_HINT = (
    "build it with `pip install .` (or, in a checkout: cmake -S . -B build/dev "
    "-Dpybind11_DIR=$(python -m pybind11 --cmakedir) && cmake --build build/dev && "
    "cp build/dev/_native*.so mup/)"
)


def native_available() -> bool:
    """True when the compiled extension `mup._native` imported."""
    return _native_module is not None


def backend() -> BackendName:
    """The backend kernels use right now: "native" (C++) or "numpy" (reference fallback)."""
    global _warned
    forced = _forced.get()
    if forced is not None:
        return forced
    if os.environ.get("MUP_NATIVE", "1") == "0":
        return "numpy"
    if _native_module is None:
        if not _warned:
            _warned = True
            log.warning(
                "mup._native is not importable (%s); pooling and batching use the slower "
                "numpy fallback; %s",
                _IMPORT_ERROR,
                BUILD_HINT,
            )
        return "numpy"
    return "native"


@contextlib.contextmanager
def use_backend(name: BackendName) -> Iterator[None]:
    """Force "native" or "numpy" inside a `with` block (per thread / async task)."""
    if name not in ("native", "numpy"):
        raise ValueError(f"backend must be 'native' or 'numpy', got {name!r}")
    if name == "native" and _native_module is None:
        raise RuntimeError(f"backend 'native' requested but mup._native is missing: {BUILD_HINT}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def native_module():
    """The compiled module (only call when `backend() == "native"`)."""
    return _native_module
