"""Pure numpy reference of every native kernel (and the fallback when `mup._native` is absent).

Axis letters: T tokens (all sequences concatenated), N sequences, D model width,
B rows in a padded batch, P padded length of a batch, K buckets.

Inputs here are already validated and normalised by `mup.native._api`:
acts is [T, D] float32 / float16 / ml_dtypes.bfloat16, offsets int64 [N+1] with
offsets[0] == 0 and offsets[-1] == T, mask bool [T] or None, and no selected sequence is empty.
Everything accumulates in float32 (rolling sums in float64: a float32 prefix sum over a long
sequence cancels badly when two large prefixes are subtracted).
"""

from __future__ import annotations

import numpy as np

# Rows are processed in groups of about this many elements so that the float32 copy of a
# float16 / bfloat16 input stays small (a 1 GiB float16 store would otherwise need 2 GiB more).
_CHUNK_ELEMS = 1 << 22


def _row_groups(offsets: np.ndarray, d: int):
    """Yield (r0, r1) row ranges whose tokens hold about `_CHUNK_ELEMS` elements each."""
    n = offsets.shape[0] - 1
    per = max(1, _CHUNK_ELEMS // max(d, 1))
    r0 = 0
    while r0 < n:
        # First row end beyond the token target; always at least one row.
        r1 = int(np.searchsorted(offsets, offsets[r0] + per, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)
        yield r0, r1
        r0 = r1


def _compact(x: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None):
    """Keep masked tokens only; return (x_kept [T', D], starts [n], counts [n]) of each row."""
    if mask is None:
        starts = offsets[:-1] - offsets[0]
        counts = np.diff(offsets)
        return x, starts, counts
    kept = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # [T+1]
    local = offsets - offsets[0]
    ends = kept[local]
    return x[mask], ends[:-1], np.diff(ends)


def pool_many(
    acts: np.ndarray,
    offsets: np.ndarray,
    *,
    methods: tuple[str, ...],
    mask: np.ndarray | None,
    scores: np.ndarray | None,
    temperature: float,
    window: int,
) -> dict[str, np.ndarray]:
    """Every pooling in `methods` for every sequence: {method: [N, D] float32}."""
    n = offsets.shape[0] - 1
    d = acts.shape[1]
    out = {m: np.empty((n, d), np.float32) for m in methods}
    for r0, r1 in _row_groups(offsets, d):
        t0, t1 = int(offsets[r0]), int(offsets[r1])
        x = acts[t0:t1].astype(np.float32)  # [t, D]
        sub_off = offsets[r0 : r1 + 1]
        sub_mask = None if mask is None else mask[t0:t1]
        xk, starts, counts = _compact(x, sub_off, sub_mask)  # [t', D], [n], [n]
        for m in methods:
            out[m][r0:r1] = _pool_group(
                m, xk, starts, counts, sub_off, sub_mask, scores, t0, temperature, window
            )
    return out


# ufunc.reduceat along axis 0 runs far slower than slicing out a row and reducing it; the Python
# loop over rows only pays off when rows are long enough to amortise its overhead.
_LOOP_MIN_AVG_LEN = 16
_REDUCE = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


def _pool_group(m, xk, starts, counts, sub_off, sub_mask, scores, t0, temperature, window):
    if m in _REDUCE and xk.shape[0] >= _LOOP_MIN_AVG_LEN * starts.shape[0]:
        ufunc = _REDUCE[m]
        res = np.empty((starts.shape[0], xk.shape[1]), np.float32)
        for i, (s0, c) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
            ufunc.reduce(xk[s0 : s0 + c], axis=0, out=res[i])
        return res / counts[:, None].astype(np.float32) if m == "mean" else res
    if m == "sum":
        return np.add.reduceat(xk, starts, axis=0)
    if m == "mean":
        return np.add.reduceat(xk, starts, axis=0) / counts[:, None].astype(np.float32)
    if m == "max":
        return np.maximum.reduceat(xk, starts, axis=0)
    if m == "min":
        return np.minimum.reduceat(xk, starts, axis=0)
    if m == "last":
        return xk[starts + counts - 1]
    if m == "softmax":
        s = scores[t0 : t0 + (int(sub_off[-1]) - int(sub_off[0]))]
        if sub_mask is not None:
            s = s[sub_mask]
        z = s.astype(np.float32) / np.float32(temperature)  # [t']
        zmax = np.maximum.reduceat(z, starts)  # [n]
        e = np.exp(z - np.repeat(zmax, counts))  # [t']
        denom = np.add.reduceat(e, starts)  # [n]
        w = e / np.repeat(denom, counts)  # [t']
        return np.add.reduceat(xk * w[:, None], starts, axis=0)
    if m == "rolling_mean_max":
        res = np.empty((starts.shape[0], xk.shape[1]), np.float32)
        for i, (s0, c) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
            seg = xk[s0 : s0 + c].astype(np.float64)  # [c, D]
            if c <= window:
                res[i] = (seg.sum(axis=0) / c).astype(np.float32)
                continue
            cs = np.concatenate([np.zeros((1, seg.shape[1])), np.cumsum(seg, axis=0)])
            means = ((cs[window:] - cs[:-window]) / window).astype(np.float32)  # [c-w+1, D]
            res[i] = means.max(axis=0)
        return res
    raise ValueError(f"unknown pooling method {m!r}")


def gather_padded(
    acts: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    padded_len: int,
    *,
    mask: np.ndarray | None,
    out_dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Padded block [B, P, D] (zeros past each row's end) and block_mask bool [B, P]."""
    b, d = rows.shape[0], acts.shape[1]
    block = np.zeros((b, padded_len, d), out_dtype)  # [B, P, D]
    block_mask = np.zeros((b, padded_len), np.bool_)  # [B, P]
    for i, r in enumerate(rows.tolist()):
        s, e = int(offsets[r]), int(offsets[r + 1])
        block[i, : e - s] = acts[s:e].astype(out_dtype)
        block_mask[i, : e - s] = True if mask is None else mask[s:e]
    return block, block_mask


def scatter_padded(
    block: np.ndarray, offsets: np.ndarray, rows: np.ndarray, out: np.ndarray
) -> None:
    """Write each row's real tokens block[i, :len] into out[offsets[r]:offsets[r+1]]."""
    for i, r in enumerate(rows.tolist()):
        s, e = int(offsets[r]), int(offsets[r + 1])
        out[s:e] = block[i, : e - s].astype(out.dtype)


def plan_batches(
    lengths: np.ndarray,
    order: np.ndarray,
    buckets: np.ndarray,
    *,
    token_budget: int,
    max_rows: int,
) -> list[tuple[np.ndarray, int]]:
    """Group rows (visited in `order`) by the smallest bucket >= their length, then cut each
    bucket's rows into batches of max(1, min(max_rows, token_budget // bucket)) rows.

    Returns [(rows int64 [B], padded_len)], buckets ascending, rows in `order` within a bucket.
    """
    which = np.searchsorted(buckets, lengths[order], side="left")  # [N] bucket index
    plan = []
    for k, p in enumerate(buckets.tolist()):
        rows_k = order[which == k]
        per = max(1, min(max_rows, token_budget // p))
        for i in range(0, rows_k.shape[0], per):
            plan.append((rows_k[i : i + per], int(p)))
    return plan
