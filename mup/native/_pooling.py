"""Pooling of ragged sequences: validate once, then run the C++ kernels or numpy.

Axis letters: T tokens (all sequences concatenated), N sequences, D model width,
B rows in a padded batch, P padded length of a batch, M batches, K buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mup.native import _reference
from mup.native._backend import backend, native_module
from mup.native._checks import (
    KIND,
    check_acts,
    check_mask,
    check_offsets,
    check_threads,
    native_view,
)

POOL_METHODS = ("mean", "max", "min", "last", "sum", "softmax", "rolling_mean_max")


def pool_many(
    acts,
    offsets,
    *,
    methods: Sequence[str],
    mask=None,
    scores=None,
    temperature: float = 1.0,
    window: int = 40,
    num_threads: int | None = None,
    acts_dtype: str | None = None,
) -> dict[str, np.ndarray]:
    """Several poolings of every sequence in one call: {method: [N, D] float32}.

    See `pool` for the arguments; `scores` is needed when "softmax" is among `methods`.
    """
    methods = tuple(methods)
    fn = f"pool(method={methods[0]!r})" if len(methods) == 1 else f"pool_many(methods={methods!r})"
    for m in methods:
        if m not in POOL_METHODS:
            raise ValueError(f"{fn}: unknown method {m!r}; expected one of {POOL_METHODS}")
    if not methods:
        raise ValueError(f"{fn}: methods is empty; expected some of {POOL_METHODS}")
    a = check_acts(acts, acts_dtype, fn)
    t, d = a.shape
    o = check_offsets(offsets, t, fn)
    n = o.shape[0] - 1
    m = check_mask(mask, t, fn)
    if not (isinstance(window, int | np.integer) and window >= 1):
        raise ValueError(f"{fn}: window must be an int >= 1, got {window!r}")
    window = int(window)
    s = None
    if "softmax" in methods:
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
        if scores is None:
            raise ValueError(f"{fn}: method 'softmax' needs scores, float32 [T] = [{t}]")
        s = np.asarray(scores)
        if not np.issubdtype(s.dtype, np.floating):
            raise TypeError(f"{fn}: scores must be float32 [T] = [{t}], got dtype {s.dtype}")
        if s.shape != (t,):
            raise ValueError(f"{fn}: scores must be float32 [T] = [{t}], got shape {s.shape}")
        s = np.ascontiguousarray(s, dtype=np.float32)
        bad = ~np.isfinite(s) if m is None else (~np.isfinite(s) & m)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{fn}: scores[{i}] == {s[i]} is not finite (token {i})")
    elif scores is not None:
        raise ValueError(f"{fn}: scores is only used by method 'softmax'")
    threads = check_threads(num_threads)

    # Empty and all-masked sequences have no pooled value: name the first one.
    counts = np.diff(o) if m is None else np.diff(np.concatenate([[0], np.cumsum(m)])[o])
    if n and counts.min() == 0:
        i = int(np.argmax(counts == 0))
        if o[i] == o[i + 1]:
            raise ValueError(f"{fn}: row {i} is empty (offsets[{i}] == offsets[{i + 1}] == {o[i]})")
        raise ValueError(
            f"{fn}: row {i} has no masked tokens ({o[i + 1] - o[i]} tokens, mask all False)"
        )
    if n == 0:
        return {k: np.zeros((0, d), np.float32) for k in methods}

    if backend() == "native":
        res = native_module().pool(
            native_view(a),
            KIND[a.dtype],
            o,
            None if m is None else m.view(np.uint8),
            s,
            list(methods),
            float(temperature),
            window,
            threads,
        )
        return dict(zip(methods, res, strict=True))
    return _reference.pool_many(
        a, o, methods=methods, mask=m, scores=s, temperature=float(temperature), window=window
    )


def pool(
    acts,
    offsets,
    *,
    method: str,
    mask=None,
    scores=None,
    temperature: float = 1.0,
    window: int = 40,
    num_threads: int | None = None,
    acts_dtype: str | None = None,
) -> np.ndarray:
    """Pool every ragged sequence to one vector: [N, D] float32, accumulated in float32.

    acts [T, D] float32 / float16 / bfloat16 (ml_dtypes.bfloat16, or uint16 bits with
    acts_dtype="bfloat16"); offsets int64 [N+1]; mask bool [T] (None = every token).
    method: "mean", "max", "min", "sum", "last" (last masked token), "softmax"
    (weights softmax(scores / temperature) over the masked tokens; scores float32 [T]), or
    "rolling_mean_max" (max over windows of the mean of `window` consecutive masked tokens;
    a sequence with fewer masked tokens than `window` gets its full mean).
    An empty or all-masked sequence raises ValueError naming the row.
    """
    if method not in POOL_METHODS:
        raise ValueError(f"pool: unknown method {method!r}; expected one of {POOL_METHODS}")
    return pool_many(
        acts,
        offsets,
        methods=(method,),
        mask=mask,
        scores=scores,
        temperature=temperature,
        window=window,
        num_threads=num_threads,
        acts_dtype=acts_dtype,
    )[method]
