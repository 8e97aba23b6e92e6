"""Chunked, prefetched reading of ragged activations: the one way every package streams a store.

Axis letters: N records, T tokens, R selected records, T' their tokens.

A store larger than memory is read in chunks of consecutive records (`plan_chunks`), the next
chunk read while the caller works on the current one (`prefetched`), so a reader holds about two
chunks. `ActivationStore.iter_row_chunks` is this for one layer; probes read several layers per
chunk with the same two pieces.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from mup.store import _format as F

__all__ = [
    "READ_CHUNK_BYTES",
    "masked_lengths",
    "plan_chunks",
    "prefetched",
    "token_bytes",
    "token_indices",
]

READ_CHUNK_BYTES = 256 << 20
"""Largest chunk of stored activations read at once when a store is streamed (pooling, scoring,
streamed training, steering vectors): big enough that one read amortises a store round trip (S3
included), small enough that two in flight (current and prefetched) fit any host's memory."""


def token_bytes(store, n_layers: int = 1) -> int:
    """Bytes one token takes in `store`, over `n_layers` layers."""
    name = str(store.dtype)
    size = F.itemsize(name) if name in F.STORAGE_DTYPES else np.dtype(store.dtype).itemsize
    return int(store.d_model) * size * n_layers


def plan_chunks(lengths, token_bytes: int, max_bytes: int) -> list[np.ndarray]:
    """Cut positions 0..R-1 of records with `lengths` [R] tokens into consecutive runs of at most
    `max_bytes` of activations (`token_bytes` per token); a larger single record forms a run of
    its own."""
    cum = np.cumsum(np.asarray(lengths, np.int64))  # [R]
    max_tokens = max(1, int(max_bytes) // int(token_bytes))
    runs, start = [], 0
    while start < cum.size:
        base = cum[start - 1] if start else 0
        end = max(int(np.searchsorted(cum, base + max_tokens, side="right")), start + 1)
        runs.append(np.arange(start, end))
        start = end
    return runs


def prefetched(read: Callable, items: Iterable) -> Iterator[tuple]:
    """(item, read(item)) for each item, the next read running in a thread while the caller
    works on the current result (store reads release the GIL)."""
    items = list(items)
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mup-store-read") as pool:
        nxt = pool.submit(read, items[0])
        try:
            for i, item in enumerate(items):
                got = nxt.result()
                if i + 1 < len(items):
                    nxt = pool.submit(read, items[i + 1])
                yield item, got
        finally:
            nxt.cancel()


def masked_lengths(offsets, mask=None) -> np.ndarray:
    """[N] masked tokens per record of ragged `offsets` [N+1] and `mask` [T] (None: every token
    counts), from the small arrays alone (no activations)."""
    offsets = np.asarray(offsets, np.int64)
    if mask is None:
        return np.diff(offsets)
    kept = np.r_[0, np.cumsum(np.asarray(mask, bool), dtype=np.int64)]  # [T+1]
    return kept[offsets[1:]] - kept[offsets[:-1]]


def token_indices(offsets, rows) -> np.ndarray:
    """[T'] indices of the tokens of records `rows` [R], in row order (to gather per-token arrays
    such as the mask or the token ids of a selection)."""
    offsets = np.asarray(offsets, np.int64)
    rows = np.asarray(rows, np.int64)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    return np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
