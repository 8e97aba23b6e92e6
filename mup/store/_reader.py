"""Reading activation stores, and listing the stores under a prefix.

Axis letters: N records, T tokens, D model width, R selected records, T' their tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator

import numpy as np
import tensorstore as ts

from mup.store import _format as F
from mup.store._chunks import READ_CHUNK_BYTES, plan_chunks, prefetched, token_bytes
from mup.store._integrity import DamagedStoreError, describe_faults, list_objects, missing_objects
from mup.store._io import TRANSIENT_CODES, StoreNotFoundError, open_array, read_group_attrs
from mup.store._location import Location, StoreError, parse_location

__all__ = ["ActivationStore", "IncompleteStoreError", "StoreListing", "list_stores", "open"]


class IncompleteStoreError(StoreError):
    """The store exists but its writer never set `complete` (interrupted or still running)."""


def open(url, *, require_complete: bool = True) -> ActivationStore:  # noqa: A001 (mirrors zarr.open)
    """Open a store for reading. Raises IncompleteStoreError unless it is complete (or
    require_complete=False, for inspecting a partial store: see `done_rows()`).

    One listing checks that every object the store vouches for is there and not empty; a loss
    raises DamagedStoreError naming the objects. In an incomplete store a lost shard that is
    flagged done only counts as not done (resuming writes it again). Checksums are checked by
    every read (format 2) and for the whole store by `mup store verify`.
    """
    loc = parse_location(url)
    attrs = read_group_attrs(loc)
    if attrs is None:
        raise StoreNotFoundError(f"no mup store at {loc.url}")
    if require_complete and not attrs.get("complete"):
        raise IncompleteStoreError(
            f"store {loc.url} is incomplete (its writer did not finish); resume the extraction "
            "(--resume) or open it with require_complete=False"
        )
    objects = list_objects(loc)
    if "done/zarr.json" not in objects:
        raise StoreNotFoundError(
            f"the store at {loc.url} was never fully created (its creation was interrupted); "
            "create it again (--overwrite)"
        )
    faults = missing_objects(
        objects, F.creation_objects(attrs, labels="labels/zarr.json" in objects)
    )
    lost: list[int] = []
    if attrs.get("complete"):
        faults += missing_objects(objects, F.shard_objects(attrs, range(F.n_shards(attrs))))
    else:
        done = open_array(loc.kvstore("done")).read().result()  # [S]
        lost = [
            int(s)
            for s in np.flatnonzero(done)
            if missing_objects(objects, F.shard_objects(attrs, [s]))
        ]
    if faults:
        raise DamagedStoreError(
            f"store {loc.url} is damaged: {describe_faults(faults)}; its activations cannot be "
            "trusted: extract it again (--overwrite)"
        )
    return ActivationStore(loc, attrs, lost_shards=lost)


class ActivationStore:
    """Read access to one store. Small per-token arrays load lazily on first use."""

    def __init__(self, loc: Location, attrs: dict, *, lost_shards=()):
        self.url = loc.url
        self._lost_shards = list(lost_shards)  # flagged done, yet an object is missing
        self._loc = loc
        self.attrs = attrs
        self.layers: list[int] = [int(x) for x in attrs["layers"]]
        self.d_model: int = int(attrs["d_model"])
        self.dtype: str = attrs["dtype"]
        self.n_records: int = int(attrs["n_records"])
        self.n_tokens: int = int(attrs["n_tokens"])
        self.complete: bool = bool(attrs.get("complete"))
        self.offsets = self._read_small("offsets").astype(np.int64)  # [N+1]
        if self.offsets.shape != (self.n_records + 1,) or self.offsets[-1] != self.n_tokens:
            raise StoreError(
                f"{self.url}: offsets has shape {self.offsets.shape} ending at {self.offsets[-1]}, "
                f"attributes say N={self.n_records}, T={self.n_tokens}"
            )
        self._arrays: dict[int, ts.TensorStore] = {}
        self._shard_tokens = int(attrs["shard_tokens"])

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.url!r}, layers={self.layers}, N={self.n_records}, "
            f"T={self.n_tokens}, D={self.d_model}, dtype={self.dtype}, complete={self.complete})"
        )

    def _read_small(self, name: str) -> np.ndarray:
        try:
            return open_array(self._loc.kvstore(name), fill_missing=False).read().result()
        except ValueError as e:  # tensorstore: a lost object or a failed checksum
            raise _read_error(e)(f"{self.url}: reading {name} failed: {_one_line(e)}") from None

    @functools.cached_property
    def ids(self) -> list[str]:
        return F.decode_ids(self._read_small("ids"))

    @functools.cached_property
    def input_ids(self) -> np.ndarray:
        return self._read_small("input_ids")  # [T] int32

    @functools.cached_property
    def roles(self) -> np.ndarray:
        return self._read_small("roles")  # [T] uint8

    @functools.cached_property
    def mask(self) -> np.ndarray:
        return self._read_small("mask")  # [T] bool

    @functools.cached_property
    def labels(self) -> np.ndarray | None:
        got = ts.KvStore.open(self._loc.kvstore("labels")).result().read("zarr.json").result()
        return self._read_small("labels") if got.state == "value" else None  # [N] int8

    def done_rows(self) -> np.ndarray:
        """bool [N]: records whose activations are written (all True for a complete store)."""
        done = open_array(self._loc.kvstore("done")).read().result().astype(bool)  # [S]
        done[self._lost_shards] = False
        return F.rows_done(self.offsets, done, int(self.attrs["shard_tokens"]))

    def _array(self, layer: int) -> ts.TensorStore:
        if int(layer) not in self.layers:
            raise KeyError(
                f"layer {layer} is not in store {self.url}; available layers: {self.layers}"
            )
        layer = int(layer)
        if layer not in self._arrays:
            self._arrays[layer] = open_array(
                self._loc.kvstore(f"layers/{layer}"), fill_missing=False
            )
        return self._arrays[layer]

    def _result(self, future, layer: int, t0: int, t1: int) -> np.ndarray:
        """A layer read's data; a lost shard or a failed checksum raises, naming the object."""
        try:
            return future.result()
        except ValueError as e:
            s0, s1 = t0 // self._shard_tokens, max(t0, t1 - 1) // self._shard_tokens
            shards = F.shard_key(layer, s0) if s0 == s1 else f"layers/{layer}/c/{s0}..{s1}/0"
            raise _read_error(e)(
                f"{self.url}: reading tokens {t0}:{t1} of layer {layer} ({shards}) failed: "
                f"{_one_line(e)}"
            ) from None

    def read_layer(self, layer: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Activations of `rows` (default: all) -> (acts [T', D], offsets' [R+1]) in row order."""
        arr = self._array(layer)
        if rows is None:
            return self._result(arr.read(), layer, 0, self.n_tokens), self.offsets.copy()
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(
                f"rows must be a 1-D integer array, got dtype {rows.dtype} shape {rows.shape}"
            )
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_records):
            raise ValueError(
                f"rows must be in [0, {self.n_records}), got min {rows.min()} max {rows.max()}"
            )
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        out_offsets = np.concatenate([[0], np.cumsum(ends - starts)])  # [R+1]
        out = np.empty((int(out_offsets[-1]), self.d_model), F.numpy_dtype(self.dtype))  # [T', D]
        # Merge runs of rows that are adjacent on disk into one read each; reads run concurrently.
        futures, i = [], 0
        while i < rows.size:
            j = i
            while j + 1 < rows.size and starts[j + 1] == ends[j]:
                j += 1
            if ends[j] > starts[i]:
                futures.append((i, j, arr[int(starts[i]) : int(ends[j])].read()))
            i = j + 1
        for i, j, f in futures:
            t0, t1 = int(starts[i]), int(ends[j])
            out[out_offsets[i] : out_offsets[j + 1]] = self._result(f, layer, t0, t1)
        return out, out_offsets

    def iter_row_chunks(
        self, layer: int, max_bytes: int = READ_CHUNK_BYTES
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (rows [R], acts [T', D], offsets' [R+1]) over consecutive rows, each chunk at
        most `max_bytes` of activations (a longer single record comes alone). The next chunk is
        read while the caller works on this one, so peak memory is about 2 * max_bytes."""
        arr = self._array(layer)
        runs = plan_chunks(np.diff(self.offsets), token_bytes(self), max_bytes)

        def read(rows: np.ndarray) -> np.ndarray:
            t0, t1 = int(self.offsets[rows[0]]), int(self.offsets[rows[-1] + 1])
            return self._result(arr[t0:t1].read(), layer, t0, t1)

        for rows, acts in prefetched(read, runs):
            yield rows, acts, self.offsets[rows[0] : rows[-1] + 2] - self.offsets[rows[0]]


def _read_error(error: BaseException) -> type[StoreError]:
    """DamagedStoreError for what the data says (lost object, checksum), StoreError for a read
    that failed on the way (an S3 endpoint that stopped answering)."""
    return StoreError if str(error).startswith(TRANSIENT_CODES) else DamagedStoreError


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreListing:
    """One store found by `list_stores`: its URL, key (directory name) and attributes."""

    url: str
    key: str
    attrs: dict

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))


def child_names(loc: Location) -> list[str]:
    """The names of the directories (S3: common prefixes) directly below `loc`, sorted."""
    names: list[str] = []
    if loc.kind == "file":
        import os

        if os.path.isdir(loc.path):
            names = [e.name for e in os.scandir(loc.path) if e.is_dir()]
    else:
        client = loc.boto3_client()
        prefix = loc.prefix + "/" if loc.prefix else ""
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=prefix, Delimiter="/"
        ):
            names += [
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
    return sorted(names)


def list_stores(url) -> list[StoreListing]:
    """The mup stores directly below `url` (an --out directory or s3:// prefix), sorted by key."""
    loc = parse_location(url)
    out = []
    for name in child_names(loc):
        child = loc.child(name)
        try:
            attrs = read_group_attrs(child)
        except (StoreError, json.JSONDecodeError):
            continue  # another zarr group or unrelated data under the same prefix
        if attrs is not None:
            out.append(StoreListing(url=child.url, key=name, attrs=attrs))
    return out
