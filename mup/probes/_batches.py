"""Padded batches for the sequence probes: device-resident buckets, or stores streamed chunk by
chunk.

Axis letters: N records, R rows of a chunk, B rows of a batch, P padded length, D width.

Sequence kinds (max / softmax / rolling / attention) read every masked token of a record, so
they train on [B, P, D] blocks: each record compacted to its masked tokens and zero-padded to
the smallest length bucket that holds it. Two sources serve the same interface:

- `PaddedBuckets`: the whole data set on the device, one padded array per bucket; the jitted
  step gathers its rows from the bucket array (no host round trip per step).
- `StreamedBuckets`: activation stores whose padded buckets exceed the memory budget. Their
  records are cut once into contiguous chunks of at most `chunk_bytes` of activations; every
  epoch visits the chunks in a new random order (the next chunk is read while the current one
  trains) and cuts shuffled batches inside each chunk. The host holds about two chunks and one
  batch, the device one batch.

`batches(b, rng)` yields (x [n, P, D], m [n, P], y [n], idx [B], wb [B]): the batch is rows idx
of x, wb their weights (0 pads the last batch of a bucket to the fixed shape B, so a bucket
compiles one step program). `logits(forward, params)` scores every record, in source order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import jax
import numpy as np

try:
    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name)

    _HALF = (np.dtype(np.float16), np.dtype("bfloat16"))
except ImportError:  # pragma: no cover
    _HALF = (np.dtype(np.float16),)

from mup.probes._data import (
    Activations,
    as_activations,
    check_store,
    is_store,
    labelled,
    labelled_rows,
)
from mup.probes._stream import masked_lengths


def default_memory_budget() -> int:
    """Bytes of activations sequence-probe training may hold: a quarter of host RAM and, on an
    accelerator, half of its memory (the padded buckets live there)."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover (non-POSIX)
        host = 8 << 30
    device = jax.devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            host = min(host, int(limit) // 2)
    return int(host)


def batch_dtype(acts_dtype) -> np.dtype:
    """Half-precision stores stay half precision on accelerators (half the memory and the
    bandwidth of every batch gather); the probe upcasts inside its float32 products. XLA on CPU
    converts half precision several times slower than it reads float32 (`benchmarks/bench_probes.py`
    times the training that this choice serves), so CPU batches are float32."""
    half = np.dtype(acts_dtype) in _HALF and jax.default_backend() != "cpu"
    return np.dtype(acts_dtype) if half else np.dtype(np.float32)


def _bucket_index(lengths: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """[N] index of the smallest bucket >= each length (as `native.plan_batches` assigns)."""
    return np.searchsorted(buckets, lengths, side="left")


def _batch_plan(rows_by_bucket, b: int, rng) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Shuffle each bucket's rows, cut [b]-row batches, shuffle the batch order.

    Returns (bucket k, idx [b] int32 positions in that bucket's row list, wb [b]); the last
    batch of a bucket is padded with position 0 at weight 0.
    """
    batches = []
    for k, rows in enumerate(rows_by_bucket):
        perm = rng.permutation(len(rows))
        for i in range(0, len(rows), b):
            idx = perm[i : i + b]
            wb = np.zeros(b, np.float32)
            wb[: len(idx)] = 1.0
            batches.append((k, np.pad(idx, (0, b - len(idx))).astype(np.int32), wb))
    return [batches[j] for j in rng.permutation(len(batches)).tolist()]


def _pow2(n: int, at_least: int = 16) -> int:
    """n rounded up to a power of two, at least `at_least`: few distinct shapes to compile
    (every compile of a step costs about as much as an epoch on a small store)."""
    return max(1 << (n - 1).bit_length(), at_least)


def _n_steps(counts, b: int) -> int:
    return sum(math.ceil(c / b) for c in counts)


class PaddedBuckets:
    """Compacted records grouped by length bucket, each bucket one padded device array.

    x[k]: [n_k, P_k, D], m[k]: [n_k, P_k] bool, y[k]: [n_k] labels, rows[k]: [n_k] record
    indices.
    """

    def __init__(self, data: Activations, min_bucket: int):
        from mup import native

        self.layers, self.d_model, self.n = data.layers, data.d_model, data.n_records
        self.labels = data.labels
        data = data.compact()
        lengths = data.lengths
        buckets = np.asarray(native.length_buckets(int(lengths.max()), min_len=min_bucket))
        which = _bucket_index(lengths, buckets)
        dtype = batch_dtype(data.acts.dtype)
        self.x, self.m, self.y, self.rows = [], [], [], []
        for k, p in enumerate(buckets.tolist()):
            rows = np.nonzero(which == k)[0]
            if rows.size == 0:
                continue
            block, block_mask = native.gather_padded(
                data.acts, data.offsets, rows, p, out_dtype=dtype
            )  # [n_k, P_k, D], [n_k, P_k]
            # device_put, not jnp.asarray: the latter also compiles a per-shape conversion.
            self.x.append(jax.device_put(block))
            self.m.append(jax.device_put(block_mask))
            if self.labels is not None:
                self.y.append(jax.device_put(np.asarray(self.labels[rows], np.int32)))
            self.rows.append(rows)

    def n_steps(self, b: int) -> int:
        return _n_steps([len(r) for r in self.rows], b)

    def batches(self, b: int, rng) -> Iterator[tuple]:
        for k, idx, wb in _batch_plan(self.rows, b, rng):
            yield self.x[k], self.m[k], self.y[k], idx, wb

    def logits(self, forward, params) -> np.ndarray:
        out = np.empty(self.n, np.float32)
        for x, m, rows in zip(self.x, self.m, self.rows, strict=True):
            out[rows] = np.asarray(forward(params, x, m))
        return out


class StreamedBuckets:
    """Records of one or more activation stores, read chunk by chunk.

    parts: (store, rows) pairs, rows [R] increasing store row indices; records are numbered
    part by part in that order (labels, logits).
    """

    def __init__(self, parts, layers, combine: str, min_bucket: int, chunk_bytes: int):
        from mup import native
        from mup import store as store_mod

        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.parts, self.layers, self.combine = parts, tuple(layers), combine
        store0 = parts[0][0]
        self.d_model = store0.d_model * (len(self.layers) if combine == "concat" else 1)
        lengths, labels = [], []
        # (part, store rows [R], record numbers [R]) per chunk; chunks never span two stores.
        self.chunks: list[tuple[int, np.ndarray, np.ndarray]] = []
        start, self.max_chunk_bytes = 0, 0
        for j, (store, rows) in enumerate(parts):
            lengths.append(masked_lengths(store)[rows])
            labels.append(None if store.labels is None else np.asarray(store.labels)[rows])
            lengths_j = np.diff(store.offsets)[rows]  # [R] stored tokens
            row_bytes = store_mod.token_bytes(store, len(self.layers))
            for sel in store_mod.plan_chunks(lengths_j, row_bytes, chunk_bytes):
                self.chunks.append((j, rows[sel], start + sel))
                self.max_chunk_bytes = max(
                    self.max_chunk_bytes, int(lengths_j[sel].sum()) * row_bytes
                )
            start += len(rows)
        self.n = start
        self.lengths = np.concatenate(lengths)  # [N] masked tokens per record
        self.labels = None if any(x is None for x in labels) else np.concatenate(labels)
        self.buckets = np.asarray(
            native.length_buckets(int(self.lengths.max()), min_len=min_bucket)
        )
        self.which = _bucket_index(self.lengths, self.buckets)  # [N]

    def _read(self, c: int) -> Activations:
        j, rows, _ = self.chunks[c]
        store = self.parts[j][0]
        return Activations.from_store(store, self.layers, rows=rows, combine=self.combine).compact()

    def _chunk_rows_by_bucket(self, c: int) -> list[np.ndarray]:
        """Per bucket, the chunk-local row positions of chunk c's records in it."""
        which = self.which[self.chunks[c][2]]
        return [np.nonzero(which == k)[0] for k in range(len(self.buckets))]

    def n_steps(self, b: int) -> int:
        return sum(
            _n_steps([len(r) for r in self._chunk_rows_by_bucket(c)], b)
            for c in range(len(self.chunks))
        )

    def _gather(self, acts: Activations, local_rows: np.ndarray, k: int, n_rows: int):
        """Padded [n_rows, P_k, D] block of chunk rows `local_rows`, repeating its first row to
        fill (filler rows carry weight 0 or are cut from the output: any real row keeps every
        number finite)."""
        from mup import native

        rows = np.concatenate(
            [local_rows, np.full(n_rows - len(local_rows), local_rows[0], np.int64)]
        )
        x, m = native.gather_padded(
            acts.acts,
            acts.offsets,
            rows,
            int(self.buckets[k]),
            out_dtype=batch_dtype(acts.acts.dtype),
        )  # [n_rows, P_k, D], [n_rows, P_k]
        return jax.device_put(x), jax.device_put(m), rows

    def batches(self, b: int, rng) -> Iterator[tuple]:
        if self.labels is None:
            raise ValueError("streamed training data has no labels")
        from mup.store import prefetched

        for c, acts in prefetched(self._read, rng.permutation(len(self.chunks)).tolist()):
            by_bucket = self._chunk_rows_by_bucket(c)
            record = self.chunks[c][2]
            for k, idx, wb in _batch_plan(by_bucket, b, rng):
                local = by_bucket[k][idx[wb > 0]]
                # Only the real rows are copied, their count rounded up to a power of two (a
                # few compiled shapes per bucket); weight-0 batch rows point at row 0. A full
                # [B, P, D] block for the last few rows of a long bucket would cost as much as
                # a whole batch.
                n_rows = min(_pow2(len(local), min(16, b)), b)
                x, m, rows = self._gather(acts, local, k, n_rows)
                y = jax.device_put(np.asarray(self.labels[record[rows]], np.int32))
                yield x, m, y, np.where(wb > 0, np.arange(b), 0).astype(np.int32), wb

    def logits(self, forward, params) -> np.ndarray:
        from mup.store import prefetched

        out = np.empty(self.n, np.float32)
        for c, acts in prefetched(self._read, range(len(self.chunks))):
            record = self.chunks[c][2]
            for k, local in enumerate(self._chunk_rows_by_bucket(c)):
                if local.size == 0:
                    continue
                # Row counts rounded up to a power of two: a handful of compiled shapes serve
                # every chunk.
                x, m, _ = self._gather(acts, local, k, _pow2(len(local)))
                out[record[local]] = np.asarray(forward(params, x, m))[: len(local)]
        return out


def _store_parts(data):
    """[(store, ...)] when data is a store or a non-empty list of stores, else None."""
    if is_store(data):
        return [data]
    if isinstance(data, list | tuple) and data and all(is_store(x) for x in data):
        return list(data)
    return None


def sequence_source(
    data,
    layer,
    *,
    combine: str,
    min_bucket: int,
    what: str,
    train: bool,
    memory_budget: int | None = None,
):
    """The batch source for `data` (Activations, a store, or a list of either).

    train=True keeps the labelled records (erroring for a single class) and streams stores
    whose padded buckets would need more than `memory_budget` bytes (default
    `default_memory_budget()`); train=False keeps every record and always streams stores
    (scoring needs one pass, so holding the data buys nothing).
    """
    from mup import store as store_mod

    stores = _store_parts(data)
    if stores is None:
        acts = as_activations(data, layer, combine=combine)
        return PaddedBuckets(labelled(acts, what) if train else acts, min_bucket)
    layers = None
    for s in stores:
        layers = check_store(s, layer, combine)
    if len({s.d_model for s in stores}) != 1:
        raise ValueError(f"{what}: the stores have different widths {[s.d_model for s in stores]}")
    rows = [np.arange(s.n_records) for s in stores]
    if train:
        keep = labelled_rows(
            np.concatenate([_store_labels(s, what) for s in stores]), what
        )  # [N] bool or None
        if keep is not None:
            bounds = np.cumsum([0] + [s.n_records for s in stores])
            rows = [np.nonzero(keep[a:b])[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        if _in_memory_bytes(stores, rows, layers, combine, min_bucket) <= budget:
            acts = as_activations(data, layer, combine=combine)
            return PaddedBuckets(labelled(acts, what), min_bucket)
        chunk = max(1, min(store_mod.READ_CHUNK_BYTES, budget // 4))
    else:
        chunk = store_mod.READ_CHUNK_BYTES
    parts = [(s, r) for s, r in zip(stores, rows, strict=True) if r.size]
    return StreamedBuckets(parts, layers, combine, min_bucket, chunk)


def _store_labels(store, what: str) -> np.ndarray:
    if store.labels is None:
        raise ValueError(f"{what} has no labels; probes train on labelled records")
    return np.asarray(store.labels)


def _in_memory_bytes(stores, rows, layers, combine, min_bucket) -> int:
    """What `PaddedBuckets` of these records would hold: the stored activations read whole,
    their compacted copy and the padded float32 buckets."""
    from mup import native
    from mup import store as store_mod

    n_layers = len(layers)
    width = stores[0].d_model * (n_layers if combine == "concat" else 1)
    lengths = np.concatenate([masked_lengths(s)[r] for s, r in zip(stores, rows, strict=True)])
    buckets = np.asarray(native.length_buckets(int(lengths.max()), min_len=min_bucket))
    padded = int(buckets[_bucket_index(lengths, buckets)].sum())
    stored = sum(s.n_tokens * store_mod.token_bytes(s, n_layers) for s in stores)
    return stored + (int(lengths.sum()) + padded) * width * 4
