"""Crash-safe, bounded-memory writer of activation stores (local or S3/R2).

Axis letters: N records, T tokens, D model width, S shards (T split into shard_tokens pieces).

Write protocol (what makes kill -9 safe at any instant):
  1. `create` writes the group attributes (complete=false), the arrays' metadata and the small
     token/record arrays one object at a time, and creates the `done` array LAST: a store
     without `done/zarr.json` was interrupted during creation, holds no activations, and
     `create` redoes it without being asked to overwrite (see `inspect`, which also tells such
     a store from one that still holds shards or stray files, and from foreign data, which is
     never deleted). Overwriting deletes the group zarr.json first, so an interrupted deletion
     never leaves something that looks like a whole store.
  2. `write` buffers each batch's tokens in per-shard host buffers. A shard is written only when
     every token in it has arrived, as one whole-shard write per layer (no read-modify-write of a
     compressed shard), and only AFTER all layers' shard objects are durable is its `done[s]`
     flag written. A crash leaves at worst a rewritten-but-unflagged shard, which a resumed
     writer writes again with the same bytes.
  3. `finalize` waits for the last shards, lists the store and checks that every object it must
     hold is there and not empty (storage can lose acknowledged writes), and only then sets the
     group attribute `complete` (the group zarr.json is replaced atomically: rename locally, a
     single PUT on S3). A resumed writer likewise treats a shard flagged done whose object is
     missing as not done.

Shard commits that fail for a transient reason are retried `retries` times with doubling delays,
each retry reported through `StoreWriter.on_retry`.

Memory bound: the caller feeds rows in windows (any order within a window, windows advancing
through the token range). Pending shards are those a window touches, plus at most
MAX_INFLIGHT_SHARDS being written, so host memory is about
  (window_tokens + (2 + MAX_INFLIGHT_SHARDS) * shard_tokens) * D * itemsize * n_layers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import tensorstore as ts

from mup.store import _format as F
from mup.store._integrity import DamagedStoreError, describe_faults, list_objects, missing_objects
from mup.store._io import (
    StoreNotFoundError,
    has_key,
    kv,
    now,
    open_array,
    read_group_attrs,
    short_error,
    transient,
    write_group,
)
from mup.store._location import Location, StoreError, parse_location
from mup.store._validate import as_int_array, check_acts

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_S3_UPLOAD",
    "MAX_INFLIGHT_SHARDS",
    "StoreWriter",
    "open_writer",
]

log = logging.getLogger("mup.store")

# Shard commits run on background threads so compression and upload overlap with the model. Two
# in flight (each on its own thread; a shard's layers encode in parallel inside tensorstore)
# keep the disk or network busy while bounding memory; each shard's `done` flag still follows
# its own data, so commits may finish in any order.
MAX_INFLIGHT_SHARDS = 2

# Shard commits that fail for a transient reason are retried this often by default, after 1, 2,
# 4, ... 60 s: a dead endpoint fails a run after about 5 minutes, each retry reported on the way
# (tensorstore's own default retried 32 times over ~15 minutes in silence).
DEFAULT_RETRIES = 10
RETRY_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 60.0

# How completed shards reach S3: "tensorstore" (its s3 kvstore PUTs each encoded shard) or
# "boto3" (tensorstore encodes the shard into a local staging file, boto3 uploads it). Against
# a moto server on loopback the two ran at about the same speed (`benchmarks/bench_store.py`
# measures both in one run); tensorstore keeps one code path for local and S3, needs no staging
# disk and writes byte-identical objects (tested), so it is the default. Shards stay below the
# multipart threshold, so R2's equal-part rule never applies to either path.
DEFAULT_S3_UPLOAD: Literal["tensorstore", "boto3"] = "tensorstore"


def open_writer(
    url,
    *,
    part: tuple[int, int] | None = None,
    s3_upload: Literal["tensorstore", "boto3"] | None = None,
    retries: int = DEFAULT_RETRIES,
) -> StoreWriter:
    """Reopen an existing store to resume writing (its `pending_rows()` say what is left).

    part=(i, n): write only the i-th of n contiguous blocks of shards (one per host). Rows that
    straddle a block boundary belong to both neighbours, each keeping only its own tokens, so
    no shard object is ever written by two hosts. A part writer's `finalize` only flushes; once
    every part is finished, one process calls `open_writer(url).finalize()` to set `complete`.

    Raises StoreNotFoundError when there is no store or its creation was interrupted (then call
    `create` again). A complete store opens with every row done; `finalize` is then a no-op.
    """
    loc = parse_location(url)
    attrs = read_group_attrs(loc)
    if attrs is None:
        raise StoreNotFoundError(f"no mup store at {loc.url}")
    if not has_key(loc, "done/zarr.json"):
        raise StoreNotFoundError(
            f"creation of the store at {loc.url} was interrupted; create it again"
        )
    offsets = open_array(loc.kvstore("offsets")).read().result().astype(np.int64)
    return StoreWriter(loc, attrs, offsets, part=part, s3_upload=s3_upload, retries=retries)


class _Pending:
    """Host buffers of one shard: per layer [shard_len, D] plus how many tokens are missing."""

    __slots__ = ("bufs", "missing")

    def __init__(self, layers, length: int, d_model: int, dtype: np.dtype):
        self.bufs = {layer: np.empty((length, d_model), dtype) for layer in layers}  # [t, D]
        self.missing = length


class StoreWriter:
    """Writes layer activations into a created store; see the module docstring for the protocol.

    Use `create` or `open_writer` to get one. Not thread-safe: call from one thread.

    retries: how often a shard commit that failed for a transient reason (an S3 endpoint that
      does not answer, throttling) is tried again, with doubling delays from RETRY_DELAY_S up to
      MAX_RETRY_DELAY_S, each retry reported through `on_retry`; then the writer fails.
    """

    def __init__(
        self,
        loc: Location,
        attrs: dict,
        offsets: np.ndarray,
        *,
        part=None,
        s3_upload=None,
        retries: int = DEFAULT_RETRIES,
    ):
        self.url = loc.url
        self._loc = loc
        self._attrs = dict(attrs)
        self.layers: list[int] = [int(x) for x in attrs["layers"]]
        self.d_model: int = int(attrs["d_model"])
        self.dtype: str = attrs["dtype"]
        self._np_dtype = F.numpy_dtype(self.dtype)
        self.offsets = offsets  # [N+1]
        self.n_records = offsets.size - 1
        self.n_tokens = int(offsets[-1])
        self.shard_tokens = int(attrs["shard_tokens"])
        self.n_shards = -(-self.n_tokens // self.shard_tokens)
        if part is None:
            part = (0, 1)
        index, count = (int(x) for x in part)
        if not 0 <= index < count:
            raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part}")
        self.part = (index, count)
        # This writer owns shards [s_lo, s_hi); the whole store when part is (0, 1).
        self._s_lo = self.n_shards * index // count
        self._s_hi = self.n_shards * (index + 1) // count
        starts, ends = offsets[:-1], offsets[1:]
        first = starts // self.shard_tokens  # [N] first shard of each row
        end = np.where(ends > starts, -(-ends // self.shard_tokens), first)  # [N] one past last
        self._own_first = np.maximum(first, self._s_lo)  # [N] row's shards inside this part
        self._own_end = np.minimum(end, self._s_hi)
        self._owns_row = self._own_end > self._own_first  # [N]
        self._shard_done = open_array(loc.kvstore("done")).read().result().astype(bool)  # [S]
        # Writes fail fast and `_commit` retries them, reporting each retry (see `retries`).
        self._done_flags = open_array(loc.kvstore("done", quick_retries=True))
        self._forget_lost_shards()
        self._received = np.zeros(self.n_records, bool)  # [N] rows taken by write() this session
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._inflight: collections.deque = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            MAX_INFLIGHT_SHARDS, thread_name_prefix="mup-store"
        )
        self._staging: str | None = None
        mode = s3_upload or DEFAULT_S3_UPLOAD
        if mode not in ("tensorstore", "boto3"):
            raise ValueError(f"s3_upload must be 'tensorstore' or 'boto3', got {mode!r}")
        self._mode = mode if loc.kind == "s3" else "local"
        if self._mode == "boto3":
            self._staging = tempfile.mkdtemp(prefix="mup-store-")
            self._client = loc.boto3_client()
            self._transfer = loc.transfer_config()
        self._arrays: dict[int, ts.TensorStore] = {}
        for layer in self.layers:
            if self._mode == "boto3":
                # The staged shards must be encoded exactly as the store's own array says (a
                # resumed version 1 store keeps its codecs), so copy its metadata.
                got = kv(loc, f"layers/{layer}").read("zarr.json").result()
                if got.state != "value":
                    raise StoreError(f"{loc.url}: layers/{layer}/zarr.json is missing")
                meta = {
                    k: v
                    for k, v in json.loads(bytes(got.value)).items()
                    if k not in ("zarr_format", "node_type")
                }
                staged = {"driver": "file", "path": os.path.join(self._staging, str(layer)) + "/"}
                self._arrays[layer] = open_array(staged, meta)
            else:
                self._arrays[layer] = open_array(loc.kvstore(f"layers/{layer}", quick_retries=True))
        self.complete = bool(attrs.get("complete"))
        self._error: BaseException | None = None
        self._error_note = ""
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.retries = int(retries)
        # Called (from a writer thread) with one line per retry; the extractor shows it above
        # its progress bar. Assign another callable to redirect it.
        self.on_retry: Callable[[str], None] = log.warning

    # ---- bookkeeping
    def _forget_lost_shards(self) -> None:
        """Treat shards of this part flagged done whose objects are missing or empty as not done,
        so that resuming rewrites what the storage lost (one listing of the layer arrays)."""
        mine = np.zeros_like(self._shard_done)
        mine[self._s_lo : self._s_hi] = True
        flagged = np.flatnonzero(self._shard_done & mine)
        if not flagged.size:
            return
        listed = list_objects(self._loc, "layers")
        lost = [
            int(s)
            for s in flagged
            if any(listed.get(F.shard_key(layer, s), 0) == 0 for layer in self.layers)
        ]
        if lost:
            log.warning(
                "%s: %d shards flagged done have a missing or empty object (first: %s); "
                "they will be written again",
                self.url,
                len(lost),
                F.shard_key(self.layers[0], lost[0]),
            )
            self._shard_done[lost] = False

    def _check_objects(self, keys, what: str) -> None:
        """Raise DamagedStoreError unless every object in `keys` is present and non-empty."""
        objects = list_objects(self._loc)
        faults = missing_objects(objects, keys(objects))
        if faults:
            raise DamagedStoreError(
                f"cannot {what} {self.url}: {len(faults)} objects it must hold are missing or "
                f"empty ({describe_faults(faults)}); the storage lost writes it had "
                "acknowledged. Resuming rewrites lost layer shards; lost metadata needs "
                "--overwrite"
            )

    def _shard_range(self, s: int) -> tuple[int, int]:
        t0 = s * self.shard_tokens
        return t0, min(t0 + self.shard_tokens, self.n_tokens)

    def done_rows(self) -> np.ndarray:
        """bool [N]: records durable in every layer (records without tokens count as done)."""
        with self._lock:
            shard_done = self._shard_done.copy()
        return F.rows_done(self.offsets, shard_done, self.shard_tokens)

    def _done_here(self) -> np.ndarray:
        """bool [N]: rows with no missing shard inside this writer's part."""
        with self._lock:
            not_done = (~self._shard_done).astype(np.int64)
        prefix = np.concatenate([[0], np.cumsum(not_done)])  # [S+1]
        first, end = self._own_first, np.maximum(self._own_end, self._own_first)
        return prefix[end] - prefix[first] == 0

    def done_shards(self) -> np.ndarray:
        """bool [S]: shards durable in every layer."""
        with self._lock:
            return self._shard_done.copy()

    # ---- writing
    def write(self, rows, acts: dict) -> None:
        """Add the activations of `rows` (any order, not yet done) for every stored layer.

        acts[layer] is [sum of the rows' lengths, D]: the rows' tokens concatenated in the order
        of `rows`. Values are cast to the storage dtype and must be finite after the cast.
        """
        self._check_error()
        if self.complete:
            raise ValueError(f"store {self.url} is already complete; nothing left to write")
        rows = as_int_array("rows", rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_records):
            bad = rows[(rows < 0) | (rows >= self.n_records)][0]
            raise ValueError(f"row {bad} is out of range: the store has N={self.n_records} records")
        if np.unique(rows).size != rows.size:
            raise ValueError("rows contains duplicates")
        lengths = self.offsets[rows + 1] - self.offsets[rows]  # [R]
        empty = lengths == 0
        outside = ~self._owns_row[rows] & ~empty
        if outside.any():
            raise ValueError(
                f"rows {rows[outside][:8].tolist()} have no tokens in part {self.part} "
                f"(shards {self._s_lo}..{self._s_hi - 1}) of {self.url}"
            )
        done = self._done_here()[rows] & ~empty
        if done.any():
            raise ValueError(f"rows {rows[done][:8].tolist()} are already done in {self.url}")
        again = self._received[rows] & ~empty
        if again.any():
            raise ValueError(
                f"rows {rows[again][:8].tolist()} were already written in this session"
            )
        cast = check_acts(
            acts,
            layers=self.layers,
            d_model=self.d_model,
            dtype=self.dtype,
            rows=rows,
            lengths=lengths,
        )
        # ---- scatter into shard buffers
        pos = 0
        touched = set()
        for row, length in zip(rows.tolist(), lengths.tolist(), strict=True):
            a, b = int(self.offsets[row]), int(self.offsets[row + 1])
            if b == a:
                continue
            for s in range(int(self._own_first[row]), int(self._own_end[row])):
                if self._shard_done[s]:
                    continue
                t0, t1 = self._shard_range(s)
                lo, hi = max(a, t0), min(b, t1)
                p = self._pending.get(s)
                if p is None:
                    p = self._pending[s] = _Pending(
                        self.layers, t1 - t0, self.d_model, self._np_dtype
                    )
                for layer in self.layers:
                    p.bufs[layer][lo - t0 : hi - t0] = cast[layer][pos + lo - a : pos + hi - a]
                p.missing -= hi - lo
                touched.add(s)
            pos += length
        self._received[rows] = True
        for s in sorted(touched):
            if self._pending[s].missing == 0:
                self._submit(s, self._pending.pop(s))

    def _submit(self, s: int, pending: _Pending) -> None:
        while len(self._inflight) >= MAX_INFLIGHT_SHARDS:
            self._wait(self._inflight.popleft())
        self._inflight.append(self._pool.submit(self._commit, s, pending))

    def _commit(self, s: int, pending: _Pending) -> None:
        try:
            for attempt in itertools.count():
                try:
                    return self._commit_once(s, pending)
                except Exception as e:
                    if attempt >= self.retries or not transient(e):
                        if attempt:
                            self._error_note = f" after {attempt} retries"
                        raise
                    delay = min(RETRY_DELAY_S * 2**attempt, MAX_RETRY_DELAY_S)
                    self.on_retry(
                        f"writing shard {s} of {self.url} failed ({short_error(e)}); "
                        f"retry {attempt + 1} of {self.retries} in {delay:g} s"
                    )
                    time.sleep(delay)
        except BaseException as e:
            self._error = e
            raise

    def _commit_once(self, s: int, pending: _Pending) -> None:
        """Write shard s of every layer, then its `done` flag; idempotent (same bytes again)."""
        t0, t1 = self._shard_range(s)
        # The buffers are dropped after the commit and never modified, so tensorstore may
        # encode straight from them instead of copying each shard once more.
        futures = [
            self._arrays[layer][t0:t1].write(buf, can_reference_source_data_indefinitely=True)
            for layer, buf in pending.bufs.items()
        ]
        for f in futures:
            f.result()
        if self._mode == "boto3":
            self._upload_shard(s)
        # Only now, with every layer's shard durable, may the shard count as done.
        self._done_flags[s].write(np.uint8(1)).result()
        with self._lock:
            self._shard_done[s] = True

    def _upload_shard(self, s: int) -> None:
        for layer in self.layers:
            local = os.path.join(self._staging, str(layer), "c", str(s), "0")
            key = self._loc.key(f"layers/{layer}/c/{s}/0")
            self._client.upload_file(local, self._loc.bucket, key, Config=self._transfer)
            os.remove(local)

    def _check_error(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"writing a shard of {self.url} failed{self._error_note}: "
                f"{short_error(self._error, 400)}"
            ) from self._error

    def _wait(self, future) -> None:
        try:
            future.result()
        except Exception:
            self._check_error()  # the commit recorded its error: raise it as a StoreError
            raise

    def flush(self) -> None:
        """Wait until every completed shard is durable. Partly filled shards stay buffered."""
        while self._inflight:
            self._wait(self._inflight.popleft())
        self._check_error()

    def pending_rows(self) -> np.ndarray:
        """int64 rows this writer still has to write: they have tokens in its part that are not
        durable, and were not yet passed to `write` in this session."""
        return np.flatnonzero(self._owns_row & ~self._done_here() & ~self._received)

    def finalize(self) -> None:
        """Write what remains, then set `complete` (last). Every record must have been written.

        A part writer (see `open_writer`) only checks and flushes its own shards."""
        if self.complete:
            return
        self.flush()
        if self.part != (0, 1):
            missing = np.flatnonzero(self._owns_row & ~self._done_here())
            if missing.size:
                raise ValueError(
                    f"cannot finish part {self.part} of {self.url}: {missing.size} of its records "
                    f"have not been written (first: {missing[:8].tolist()})"
                )
            own = F.shard_objects(self._attrs, range(self._s_lo, self._s_hi))
            self._check_objects(lambda _: own, f"finish part {self.part} of")
            self.close()
            return
        missing = np.flatnonzero(~self.done_rows())
        if missing.size:
            raise ValueError(
                f"cannot finalize {self.url}: {missing.size} of {self.n_records} records have not "
                f"been written (first: {missing[:8].tolist()})"
            )
        # Every acknowledged write must still be there before `complete` vouches for them.
        self._check_objects(
            lambda objects: F.expected_objects(self._attrs, labels="labels/zarr.json" in objects),
            "complete",
        )
        self._attrs["complete"] = True
        self._attrs["completed"] = now()
        write_group(self._loc, "", self._attrs)
        self.complete = True
        self.close()

    def close(self) -> None:
        """Release the background thread and staging files (buffered partial shards are dropped)."""
        self._pool.shutdown(wait=True)
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.flush()
        self.close()
