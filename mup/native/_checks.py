"""Input validation shared by the pooling and batching front ends (one message per error,
whatever the backend).

Axis letters: T tokens (all sequences concatenated), N sequences, D model width,
B rows in a padded batch, P padded length of a batch, M batches, K buckets.

Ragged layout: sequence i is acts[offsets[i]:offsets[i+1]]; offsets is int64 [N+1] with
offsets[0] == 0 and offsets[-1] == T. A per-token bool mask selects which tokens a pooling
reads (None = all). Both backends see exactly the same validated, normalised inputs, so the
error messages do not depend on the backend.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
# Name used by the C++ side for each supported activation dtype.
KIND = {F32: "float32", F16: "float16", BF16: "bfloat16"}
BY_NAME = {"float32": F32, "float16": F16, "bfloat16": BF16}
EXPECTED_ACTS = "float32, float16 or bfloat16 (ml_dtypes.bfloat16, or uint16 bits with "
EXPECTED_ACTS += "acts_dtype='bfloat16')"


def as_dtype(dt, what: str) -> np.dtype:
    if isinstance(dt, str):
        if dt not in BY_NAME:
            raise TypeError(f"{what} must be one of {sorted(BY_NAME)}, got {dt!r}")
        return BY_NAME[dt]
    try:
        out = np.dtype(dt)
    except TypeError as exc:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dt!r}") from exc
    if out not in KIND:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {out}")
    return out


def check_acts(acts, acts_dtype, fn: str) -> np.ndarray:
    """acts as a [T, D] array of float32 / float16 / bfloat16 (uint16 bits re-viewed)."""
    a = np.asarray(acts)
    if a.dtype == np.uint16:
        if acts_dtype is None:
            raise TypeError(
                f"{fn}: acts has dtype uint16; pass acts_dtype='bfloat16' (or 'float16') to "
                "say how to read the bits"
            )
        a = a.view(as_dtype(acts_dtype, "acts_dtype"))
    elif a.dtype not in KIND:
        raise TypeError(f"{fn}: acts must be {EXPECTED_ACTS}, got dtype {a.dtype}")
    elif acts_dtype is not None and as_dtype(acts_dtype, "acts_dtype") != a.dtype:
        raise TypeError(f"{fn}: acts has dtype {a.dtype} but acts_dtype={acts_dtype!r}")
    if a.ndim != 2:
        raise ValueError(f"{fn}: acts must be 2-D [T, D] (tokens x width), got shape {a.shape}")
    return a


def check_offsets(offsets, t: int, fn: str, what: str = "acts.shape[0]") -> np.ndarray:
    o = np.asarray(offsets)
    expected = f"{fn}: offsets must be int64 [N+1] with offsets[0] == 0 and offsets[-1] == "
    expected += f"{what} == {t}"
    if o.ndim != 1 or o.shape[0] < 1:
        raise ValueError(f"{expected}, got shape {o.shape}")
    if not np.issubdtype(o.dtype, np.integer):
        raise TypeError(f"{fn}: offsets must be int64 [N+1], got dtype {o.dtype}")
    o = np.ascontiguousarray(o, dtype=np.int64)
    if o[0] != 0 or o[-1] != t:
        raise ValueError(f"{expected}, got offsets[0] == {o[0]}, offsets[-1] == {o[-1]}")
    steps = np.diff(o)
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise ValueError(
            f"{expected}, non-decreasing; got offsets[{i}] == {o[i]} > offsets[{i + 1}] == "
            f"{o[i + 1]}"
        )
    return o


def check_mask(mask, t: int, fn: str) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"{fn}: mask must be bool [T] = [{t}], got dtype {m.dtype}")
    if m.shape != (t,):
        raise ValueError(
            f"{fn}: mask must be bool [T] = [{t}] (one per token of acts), got shape {m.shape}"
        )
    return np.ascontiguousarray(m)


def check_rows(rows, n: int, fn: str) -> np.ndarray:
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise TypeError(f"{fn}: rows must be int64 [B] row indices, got {r.dtype} {r.shape}")
    r = np.ascontiguousarray(r, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= n):
        bad = int(r[(r < 0) | (r >= n)][0])
        raise ValueError(f"{fn}: rows must lie in [0, N) = [0, {n}), got row {bad}")
    return r


def check_threads(num_threads) -> int:
    if num_threads is None:
        # The CPUs this process may use (a container or taskset can allow fewer than exist).
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return max(1, len(usable) if usable else (os.cpu_count() or 1))
    if not isinstance(num_threads, int | np.integer) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    return int(num_threads)


def native_view(a: np.ndarray) -> np.ndarray:
    """What the C++ side reads: float32 as is, 16-bit floats as uint16 bits, unit stride in D."""
    if a.ndim >= 1 and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        a = np.ascontiguousarray(a)
    if a.dtype in (F16, BF16):
        return a.view(np.uint16)
    return a
