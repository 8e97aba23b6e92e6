"""Padded batches over ragged rows: plan, gather, scatter (C++ or numpy).

Axis letters: T tokens (all sequences concatenated), N sequences, D model width,
B rows in a padded batch, P padded length of a batch, M batches, K buckets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mup.native import _reference
from mup.native._backend import backend, native_module
from mup.native._checks import (
    EXPECTED_ACTS,
    F32,
    KIND,
    as_dtype,
    check_acts,
    check_mask,
    check_offsets,
    check_rows,
    check_threads,
    native_view,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """One padded batch: which ragged rows it holds and the padded length it uses."""

    rows: np.ndarray  # int64 [B], indices into the ragged set
    padded_len: int  # P: every row of the batch fits in P tokens

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return f"Batch(rows={self.rows.tolist()}, padded_len={self.padded_len})"


def length_buckets(max_len: int, *, min_len: int = 16, growth: float = 2.0) -> tuple[int, ...]:
    """Padded lengths min_len, min_len * growth, ... up to the first one >= max_len.

    Buckets after the first are rounded up to a multiple of 8 (tile sizes of TPU/GPU kernels).
    A small fixed set keeps the number of XLA programs small.
    """
    if not (isinstance(min_len, int | np.integer) and min_len >= 1):
        raise ValueError(f"length_buckets: min_len must be an int >= 1, got {min_len!r}")
    if not growth > 1.0:
        raise ValueError(f"length_buckets: growth must be > 1, got {growth!r}")
    if max_len < 0:
        raise ValueError(f"length_buckets: max_len must be >= 0, got {max_len!r}")
    out = [int(min_len)]
    while out[-1] < max_len:
        nxt = math.ceil(out[-1] * growth)
        if nxt >= 8:
            nxt = -(-nxt // 8) * 8
        out.append(max(nxt, out[-1] + 1))
    return tuple(out)


def plan_batches(
    lengths,
    *,
    token_budget: int,
    buckets: Sequence[int] | None = None,
    max_rows: int | None = None,
    shuffle_seed: int | None = None,
) -> list[Batch]:
    """Plan padded batches over ragged rows of the given lengths.

    Each row goes to the smallest bucket >= its length (buckets default to
    `length_buckets(max(lengths))`); each bucket's rows are cut into batches of
    B = min(max_rows, token_budget // bucket) rows, so B * padded_len <= token_budget
    (a single row longer than the budget gets a batch of its own). Every row appears exactly
    once. Batches come bucket by bucket, rows in index order; with `shuffle_seed` the rows
    within each bucket and the order of batches are shuffled reproducibly.
    """
    fn = "plan_batches"
    ln = np.asarray(lengths)
    if ln.ndim != 1 or (ln.size and not np.issubdtype(ln.dtype, np.integer)):
        raise TypeError(f"{fn}: lengths must be an int array [N], got {ln.dtype} {ln.shape}")
    ln = np.ascontiguousarray(ln, dtype=np.int64)
    n = ln.shape[0]
    if n and ln.min() < 0:
        i = int(np.argmax(ln < 0))
        raise ValueError(f"{fn}: lengths[{i}] == {ln[i]} is negative")
    if not (isinstance(token_budget, int | np.integer) and token_budget >= 1):
        raise ValueError(f"{fn}: token_budget must be an int >= 1, got {token_budget!r}")
    if max_rows is not None and not (isinstance(max_rows, int | np.integer) and max_rows >= 1):
        raise ValueError(f"{fn}: max_rows must be an int >= 1 or None, got {max_rows!r}")
    if buckets is None:
        buckets = length_buckets(int(ln.max()) if n else 1)
    bk = np.asarray(buckets, dtype=np.int64)
    if bk.ndim != 1 or bk.size == 0 or bk.min() < 1 or np.any(np.diff(bk) <= 0):
        raise ValueError(f"{fn}: buckets must be strictly increasing ints >= 1, got {buckets!r}")
    if n and ln.max() > bk[-1]:
        i = int(np.argmax(ln > bk[-1]))
        raise ValueError(
            f"{fn}: row {i} has length {ln[i]} > largest bucket {bk[-1]}; truncate it or add "
            "a larger bucket"
        )
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    order = np.arange(n, dtype=np.int64) if rng is None else rng.permutation(n).astype(np.int64)
    cap = n if max_rows is None else int(max_rows)
    cap = max(cap, 1)
    if backend() == "native":
        rows, starts, padded = native_module().plan_batches(ln, order, bk, int(token_budget), cap)
        plan = [(rows[starts[j] : starts[j + 1]], int(padded[j])) for j in range(padded.shape[0])]
    else:
        plan = _reference.plan_batches(ln, order, bk, token_budget=int(token_budget), max_rows=cap)
    batches = [Batch(rows=r, padded_len=p) for r, p in plan]
    for b in batches:
        b.rows.setflags(write=False)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def _check_fits(o: np.ndarray, r: np.ndarray, padded_len: int, fn: str) -> None:
    lens = o[r + 1] - o[r]
    if lens.size and lens.max() > padded_len:
        i = int(np.argmax(lens > padded_len))
        raise ValueError(
            f"{fn}: row {r[i]} has {lens[i]} tokens > padded_len {padded_len}; truncate "
            "explicitly (choose which end to keep) or use a larger padded_len"
        )


def gather_padded(
    acts,
    offsets,
    rows,
    padded_len: int,
    *,
    mask=None,
    out_dtype=None,
    acts_dtype: str | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Copy ragged rows into a zero-padded block.

    Returns block [B, P, D] (out_dtype, default the dtype of acts) and block_mask bool [B, P]:
    True at real tokens (and where `mask` is True, when given), False at padding.
    A row longer than padded_len raises ValueError: the caller truncates explicitly.
    """
    fn = "gather_padded"
    a = check_acts(acts, acts_dtype, fn)
    t, d = a.shape
    o = check_offsets(offsets, t, fn)
    m = check_mask(mask, t, fn)
    r = check_rows(rows, o.shape[0] - 1, fn)
    if not (isinstance(padded_len, int | np.integer) and padded_len >= 0):
        raise ValueError(f"{fn}: padded_len must be an int >= 0, got {padded_len!r}")
    padded_len = int(padded_len)
    _check_fits(o, r, padded_len, fn)
    od = a.dtype if out_dtype is None else as_dtype(out_dtype, "out_dtype")
    threads = check_threads(num_threads)
    if backend() == "native" and od in (a.dtype, F32):
        block, bmask = native_module().gather_padded(
            native_view(a),
            KIND[a.dtype],
            o,
            r,
            padded_len,
            None if m is None else m.view(np.uint8),
            KIND[od],
            threads,
        )
        return block.view(od), bmask.view(np.bool_)
    return _reference.gather_padded(a, o, r, padded_len, mask=m, out_dtype=od)


def scatter_padded(
    block, offsets, rows, out, *, block_dtype: str | None = None, num_threads: int | None = None
) -> None:
    """Inverse of `gather_padded`: write block[i, :len(row)] into out[offsets[r]:offsets[r+1]].

    block [B, P, D], out [T, D] (writable), both float32 / float16 / bfloat16; values are
    cast to out's dtype. Rows longer than P raise ValueError.
    """
    fn = "scatter_padded"
    b = np.asarray(block)
    if b.dtype == np.uint16:
        if block_dtype is None:
            raise TypeError(f"{fn}: block has dtype uint16; pass block_dtype='bfloat16'")
        b = b.view(as_dtype(block_dtype, "block_dtype"))
    if b.dtype not in KIND:
        raise TypeError(f"{fn}: block must be {EXPECTED_ACTS}, got dtype {b.dtype}")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: out must be a writable numpy array [T, D], got {type(out)}")
    if out.dtype not in KIND:
        raise TypeError(f"{fn}: out must be float32, float16 or bfloat16, got dtype {out.dtype}")
    if out.ndim != 2:
        raise ValueError(f"{fn}: out must be 2-D [T, D], got shape {out.shape}")
    t, d = out.shape
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is read-only")
    o = check_offsets(offsets, t, fn, what="out.shape[0]")
    r = check_rows(rows, o.shape[0] - 1, fn)
    if b.ndim != 3 or b.shape[0] != r.shape[0] or b.shape[2] != d:
        raise ValueError(
            f"{fn}: block must be [B, P, D] = [{r.shape[0]}, P, {d}] (B = len(rows), D = "
            f"out.shape[1]), got shape {b.shape}"
        )
    _check_fits(o, r, b.shape[1], fn)
    threads = check_threads(num_threads)
    native_ok = b.dtype == out.dtype or out.dtype == F32
    if backend() == "native" and native_ok and out.flags.c_contiguous:
        native_module().scatter_padded(
            native_view(np.ascontiguousarray(b)),
            KIND[b.dtype],
            o,
            r,
            native_view(out),
            KIND[out.dtype],
            threads,
        )
        return
    _reference.scatter_padded(b, o, r, out)
