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
import dataclasses
import datetime
import errno
import json
import logging
import os
import re
import shutil
import signal
import itertools
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import tensorstore as ts

from mup.store import _format as F
from mup.store._integrity import DamagedStoreError, describe_faults, list_objects, missing_objects
from mup.store._location import Location, StoreError, parse_location

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_S3_UPLOAD",
    "Occupant",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreWriter",
    "create",
    "inspect",
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
# tensorstore status codes (the start of its error messages) worth retrying.
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")

# How completed shards reach S3: "tensorstore" (its s3 kvstore PUTs each encoded shard) or
# "boto3" (tensorstore encodes the shard into a local staging file, boto3 uploads it). Measured
# against a moto server process on loopback (benchmarks/bench_store.py, 2 layers x D=576,
# 2-CPU shared box): 4 MiB shards, 153 MB, two commits in flight: tensorstore 44.8 MB/s vs
# boto3 36.1 MB/s (1.24x); one commit in flight: 7.6 vs 9.4; 32 MiB shards, 132 MB, 3 rounds:
# 20.6/21.1/31.8 vs 21.5/28.9/24.4. Equal or better, with one code path for local and S3, no
# staging disk and byte-identical objects (tested), so tensorstore is the default. Shards stay
# below the multipart threshold, so R2's equal-part rule never applies to either path.
DEFAULT_S3_UPLOAD: Literal["tensorstore", "boto3"] = "tensorstore"


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No (fully created) store at the URL: create one with `create`."""


class StoreExistsError(StoreError, FileExistsError):
    """`create` will not write there: a store, or something that is not a store (one line)."""


def _transient(error: BaseException) -> bool:
    """Whether a failed write may succeed if tried again (network, endpoint, throttling)."""
    if isinstance(error, ValueError):  # tensorstore: "CODE: message"
        return str(error).startswith(TRANSIENT_CODES)
    try:
        import botocore.exceptions as bexc
    except ImportError:
        return False
    if isinstance(error, bexc.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429
    return isinstance(
        error,
        bexc.EndpointConnectionError
        | bexc.ConnectionClosedError
        | bexc.ConnectTimeoutError
        | bexc.ReadTimeoutError,
    )


def _short_error(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _kv(loc: Location, sub: str = "") -> ts.KvStore:
    return ts.KvStore.open(loc.kvstore(sub)).result()


def read_group_attrs(loc: Location) -> dict | None:
    """The group attributes at `loc`, or None if there is no zarr.json there."""
    got = _kv(loc).read("zarr.json").result()
    if got.state != "value":
        return None
    try:
        meta = json.loads(bytes(got.value))
    except ValueError as e:
        raise StoreError(f"{loc.url}/zarr.json is not valid JSON: {e}") from None
    if meta.get("node_type") != "group":
        raise StoreError(f"{loc.url} is a zarr {meta.get('node_type')}, not a mup store group")
    attrs = meta.get("attributes", {})
    if attrs.get("format") != F.FORMAT_NAME:
        raise StoreError(
            f"{loc.url} is a zarr group but not a {F.FORMAT_NAME} store "
            f"(format attribute {attrs.get('format')!r})"
        )
    if attrs.get("format_version") not in F.READABLE_VERSIONS:
        raise StoreError(
            f"{loc.url}: format version {attrs.get('format_version')!r} is not supported "
            f"(this mup reads versions {', '.join(map(str, F.READABLE_VERSIONS))})"
        )
    return attrs


def write_group(loc: Location, sub: str, attrs: dict) -> None:
    body = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, indent=1)
    _kv(loc, sub).write("zarr.json", body.encode()).result()


def _has_key(loc: Location, key: str) -> bool:
    return _kv(loc).read(key).result().state == "value"


# The top-level names of a store: anything else in its directory is a stray.
STORE_NAMES = frozenset(
    {"zarr.json", "layers", "done", "offsets", "ids", "input_ids", "roles", "mask", "labels"}
)
_SHARD_KEY = re.compile(r"layers/\d+/c/.+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Occupant:
    """What a location holds, as `create` and the extractor judge it (see `inspect`).

    kind: "empty"; "store" (a fully created mup store: group and `done` array); "unfinished"
      (parts of a mup store whose creation, or deletion, was interrupted); "foreign" (anything
      else, which no mup command deletes).
    attrs: the group attributes of a "store".
    recreatable: an "unfinished" store that holds no layer shard and no stray, i.e. only what an
      interrupted `create` leaves: creating it again loses nothing, so no overwrite is needed.
    detail: one line on what is there, for error messages.
    """

    kind: Literal["empty", "store", "unfinished", "foreign"]
    attrs: dict | None = None
    recreatable: bool = False
    detail: str = ""


def inspect(url) -> Occupant:
    """Judge what `url` holds (one listing) before anything is written there."""
    loc = url if isinstance(url, Location) else parse_location(url)
    if loc.kind == "file" and os.path.exists(loc.path) and not os.path.isdir(loc.path):
        return Occupant(kind="foreign", detail="is a file, not a directory")
    objects = list_objects(loc)
    if not objects:
        return Occupant(kind="empty")
    strays = sorted({key.split("/", 1)[0] for key in objects} - STORE_NAMES)
    named = ", ".join(repr(s) for s in strays[:4]) + (" ..." if len(strays) > 4 else "")
    mup_group = readable = False
    if "zarr.json" in objects:
        try:
            meta = json.loads(bytes(_kv(loc).read("zarr.json").result().value))
            readable = True
        except ValueError:
            meta = None  # truncated or empty: a crash or a full disk while it was written
        if isinstance(meta, dict):
            attrs = meta.get("attributes")
            mup_group = (
                meta.get("node_type") == "group"
                and isinstance(attrs, dict)
                and attrs.get("format") == F.FORMAT_NAME
            )
        if readable and not mup_group:
            return Occupant(kind="foreign", detail="holds a zarr.json that is not a mup store's")
    markers = [k for k in objects if k != "zarr.json" and k.split("/", 1)[0] in STORE_NAMES]
    if not mup_group and not markers and ("zarr.json" not in objects or strays):
        return Occupant(kind="foreign", detail=f"is not empty and holds no mup store ({named})")
    if mup_group and "done/zarr.json" in objects:
        return Occupant(kind="store", attrs=read_group_attrs(loc))
    shards = any(_SHARD_KEY.fullmatch(k) for k in objects)
    what = ["this store was never fully created (done/zarr.json is missing)"]
    if not mup_group:
        what = ["this store was never fully created (no readable group zarr.json)"]
    if shards:
        what.append("yet it holds layer shards")
    if strays:
        what.append(f"and stray files ({named})")
    return Occupant(
        kind="unfinished", recreatable=not shards and not strays, detail=", ".join(what)
    )


def _delete_all(loc: Location) -> None:
    # The group metadata goes first: a deletion cut short leaves no store that looks whole
    # (what remains is "unfinished", and --overwrite deletes it).
    if loc.kind == "file":
        try:
            os.remove(os.path.join(loc.path, "zarr.json"))
        except FileNotFoundError:
            pass
        _after("zarr.json deleted")
        shutil.rmtree(loc.path, ignore_errors=True)
    else:
        _kv(loc).write("zarr.json", None).result()
        _after("zarr.json deleted")
        _kv(loc).delete_range(ts.KvStore.KeyRange()).result()


# Test hook: MUP_STORE_FAIL_AFTER="<step>:kill" makes `create` SIGKILL its own process right
# after that step (an object key such as "zarr.json", "offsets/zarr.json", "offsets/c" or
# "done/zarr.json"; or "deleted", "zarr.json deleted"), as kill -9 would; "<step>:raise" raises
# ENOSPC there, as a full disk would. The crash tests walk every step.
FAIL_AFTER_ENV = "MUP_STORE_FAIL_AFTER"


def _after(step: str) -> None:
    spec = os.environ.get(FAIL_AFTER_ENV)
    if not spec:
        return
    target, _, how = spec.rpartition(":")
    if target != step:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (injected after {step})")


def _open_array(
    kvstore: dict, metadata: dict | None = None, *, fill_missing: bool = True
) -> ts.TensorStore:
    """Create (with `metadata`) or open a zarr v3 array.

    fill_missing=False makes a read of a missing chunk or shard fail (naming its object) instead
    of returning the fill value: every array of a complete store is fully materialised, so a
    missing object is always a lost one. Only `done` (unset flags are absent) needs filling.
    """
    spec = {"driver": "zarr3", "kvstore": kvstore}
    if metadata is not None:
        spec.update(metadata=metadata, create=True, delete_existing=True)
        # Always materialise shards (even all-zero ones) so that every shard is one object.
        spec["store_data_equal_to_fill_value"] = True
    else:
        spec["open"] = True
    if not fill_missing:
        spec["fill_missing_data_reads"] = False
    return ts.open(spec).result()


def _as_int_array(name: str, value, ndim: int = 1) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a {ndim}-D integer array, got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def create(
    url,
    *,
    layers,
    d_model: int,
    dtype: str = "float16",
    offsets,
    ids,
    input_ids,
    roles,
    mask,
    labels=None,
    attrs: dict,
    overwrite: bool = False,
    chunk_tokens: int | None = None,
    shard_tokens: int | None = None,
    s3_upload: Literal["tensorstore", "boto3"] | None = None,
    retries: int = DEFAULT_RETRIES,
) -> StoreWriter:
    """Create an empty store for N records / T tokens and return its writer.

    Args:
      url: local directory or `s3://bucket/prefix` (the store itself, not its parent).
      layers: layer numbers to store (hidden_states index; 0 = embeddings).
      d_model: width D of every layer array.
      dtype: storage dtype, one of float16 (default), bfloat16, float32.
      offsets: int [N+1], offsets[0] == 0, non-decreasing; record i owns tokens
        offsets[i]:offsets[i+1].
      ids: N record ids (str). input_ids: int [T]. roles: uint8 [T]. mask: bool [T].
      labels: optional int [N] with values in {-1, 0, 1}.
      attrs: job description; must contain the keys in `JOB_ATTRS`.
      overwrite: replace an existing store at `url` (only a mup store or an empty location).
      chunk_tokens, shard_tokens: override the chunk/shard lengths derived from CHUNK_BYTES and
        SHARD_BYTES (shard_tokens must be a multiple of chunk_tokens).
      s3_upload: how shards reach S3 (default `DEFAULT_S3_UPLOAD`); ignored for local stores.
      retries: transient failures of one shard commit retried before the writer fails (see
        `StoreWriter`).
    """
    loc = parse_location(url)
    if loc.kind == "s3" and not loc.prefix:
        raise ValueError(
            f"{loc.url}: a store needs its own prefix (s3://bucket/prefix), not a bucket root"
        )
    # ---- validate everything before touching storage
    layers = [int(x) for x in layers]
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise ValueError(f"layers must be distinct non-negative ints, got {layers}")
    if int(d_model) <= 0:
        raise ValueError(f"d_model must be positive, got {d_model}")
    d_model = int(d_model)
    if dtype not in F.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {F.STORAGE_DTYPES}, got {dtype!r}")
    offsets = _as_int_array("offsets", offsets)
    if offsets.size < 2 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"offsets must be int [N+1] with N >= 1, offsets[0] == 0 and non-decreasing; "
            f"got shape {offsets.shape}"
        )
    n, t = offsets.size - 1, int(offsets[-1])
    if t == 0:
        raise ValueError("offsets describe 0 tokens; a store needs at least one token")
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"ids must have N={n} entries (offsets has N+1={n + 1}), got {len(ids)}")
    ids_raw = F.encode_ids(ids)  # [N, W]
    input_ids = _as_int_array("input_ids", input_ids)
    roles_a = np.asarray(roles)
    mask_a = np.asarray(mask)
    for name, arr in (("input_ids", input_ids), ("roles", roles_a), ("mask", mask_a)):
        if arr.shape != (t,):
            raise ValueError(f"{name} must have shape [T]=[{t}] (offsets[-1]), got {arr.shape}")
    if roles_a.size and (
        not np.issubdtype(roles_a.dtype, np.integer) or roles_a.min() < 0 or roles_a.max() > 255
    ):
        raise ValueError(f"roles must be integers in 0..255 (uint8), got dtype {roles_a.dtype}")
    if mask_a.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array [T]=[{t}], got dtype {mask_a.dtype}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= 2**31):
        raise ValueError("input_ids must fit int32 and be non-negative")
    labels_a = None
    if labels is not None:
        labels_a = _as_int_array("labels", labels)
        if labels_a.shape != (n,):
            raise ValueError(f"labels must have shape [N]=[{n}], got {labels_a.shape}")
        bad = ~np.isin(labels_a, (-1, 0, 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"labels[{i}] = {labels_a[i]}: expected 1 (high), 0 (low) or -1 (none)"
            )
    if not isinstance(attrs, dict):
        raise ValueError(f"attrs must be a dict, got {type(attrs).__name__}")
    missing = [k for k in F.JOB_ATTRS if k not in attrs]
    if missing:
        raise ValueError(
            f"attrs is missing job attributes {missing} (required: {list(F.JOB_ATTRS)})"
        )
    reserved = [k for k in attrs if k in F.RESERVED_ATTRS]
    if reserved:
        raise ValueError(f"attrs may not set store-owned attributes {reserved}")
    try:
        json.dumps(attrs)
    except TypeError as e:
        raise ValueError(f"attrs must be JSON-serialisable: {e}") from None
    ct = chunk_tokens or F.default_chunk_tokens(d_model, dtype)
    st = shard_tokens or F.default_shard_tokens(d_model, dtype, ct)
    if ct <= 0 or st <= 0 or st % ct:
        raise ValueError(f"shard_tokens ({st}) must be a positive multiple of chunk_tokens ({ct})")

    # ---- decide what may be replaced
    found = inspect(loc)
    if found.kind == "foreign":
        raise StoreExistsError(f"{loc.url} {found.detail}; refusing to write there")
    if found.kind == "store" and not overwrite:
        state = "complete" if found.attrs.get("complete") else "incomplete"
        raise StoreExistsError(
            f"an {state} store already exists at {loc.url}; resume it with open_writer() "
            "or pass overwrite=True"
        )
    if found.kind == "unfinished" and not overwrite and not found.recreatable:
        raise StoreExistsError(f"{loc.url}: {found.detail}; pass overwrite=True (--overwrite)")
    if found.kind != "empty":
        _delete_all(loc)
    _after("deleted")

    from mup import __version__

    store_attrs = {
        "format": F.FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        **attrs,
        "layers": layers,
        "d_model": d_model,
        "dtype": dtype,
        "n_records": n,
        "n_tokens": t,
        "chunk_tokens": ct,
        "shard_tokens": st,
        "ids_encoding": "utf-8, zero-padded uint8 [N, W]",
        "mup_version": __version__,
        "created": _now(),
        "complete": False,
        "has_labels": labels_a is not None,
    }
    # Written one object at a time, in this order, the `done` array last: a location whose
    # `done/zarr.json` is missing was interrupted here, holds no activations, and `create`
    # redoes it (see `inspect`).
    write_group(loc, "", store_attrs)
    _after("zarr.json")
    write_group(loc, "layers", {})
    _after("layers/zarr.json")
    small = [
        ("offsets", "int64", offsets, [F.RECORD_META_CHUNK]),
        ("ids", "uint8", ids_raw, [F.RECORD_META_CHUNK, ids_raw.shape[1]]),
        ("input_ids", "int32", input_ids.astype(np.int32), [F.TOKEN_META_CHUNK]),
        ("roles", "uint8", roles_a.astype(np.uint8), [F.TOKEN_META_CHUNK]),
        ("mask", "bool", mask_a, [F.TOKEN_META_CHUNK]),
    ]
    if labels_a is not None:
        small.append(("labels", "int8", labels_a.astype(np.int8), [F.RECORD_META_CHUNK]))
    for name, dt, data, chunk in small:
        arr = _open_array(loc.kvstore(name), F.meta_array_metadata(dt, list(data.shape), chunk))
        _after(f"{name}/zarr.json")
        arr.write(data).result()
        _after(f"{name}/c")
    for layer in layers:
        md = F.layer_array_metadata(
            n_tokens=t, d_model=d_model, dtype=dtype, chunk_tokens=ct, shard_tokens=st
        )
        _open_array(loc.kvstore(f"layers/{layer}"), md)
        _after(f"layers/{layer}/zarr.json")
    n_shards = -(-t // st)
    _open_array(loc.kvstore("done"), F.done_array_metadata(n_shards))
    _after("done/zarr.json")
    return StoreWriter(loc, store_attrs, offsets, s3_upload=s3_upload, retries=retries)


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
    if not _has_key(loc, "done/zarr.json"):
        raise StoreNotFoundError(
            f"creation of the store at {loc.url} was interrupted; create it again"
        )
    offsets = _open_array(loc.kvstore("offsets")).read().result().astype(np.int64)
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
        self._shard_done = _open_array(loc.kvstore("done")).read().result().astype(bool)  # [S]
        # Writes fail fast and `_commit` retries them, reporting each retry (see `retries`).
        self._done_flags = _open_array(loc.kvstore("done", quick_retries=True))
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
                got = _kv(loc, f"layers/{layer}").read("zarr.json").result()
                if got.state != "value":
                    raise StoreError(f"{loc.url}: layers/{layer}/zarr.json is missing")
                meta = {
                    k: v
                    for k, v in json.loads(bytes(got.value)).items()
                    if k not in ("zarr_format", "node_type")
                }
                kv = {"driver": "file", "path": os.path.join(self._staging, str(layer)) + "/"}
                self._arrays[layer] = _open_array(kv, meta)
            else:
                self._arrays[layer] = _open_array(
                    loc.kvstore(f"layers/{layer}", quick_retries=True)
                )
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
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(
                f"rows must be a 1-D integer array, got dtype {rows.dtype} shape {rows.shape}"
            )
        rows = rows.astype(np.int64)
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
        total = int(lengths.sum())
        if not isinstance(acts, dict) or sorted(int(k) for k in acts) != sorted(self.layers):
            got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
            raise ValueError(
                f"acts must map every stored layer {sorted(self.layers)} to an array; got {got}"
            )
        cast = {}
        for layer in self.layers:
            a = np.asarray(acts[layer])
            if a.shape != (total, self.d_model):
                raise ValueError(
                    f"acts[{layer}] must have shape [sum of row lengths, D]="
                    f"[{total}, {self.d_model}], got {a.shape}"
                )
            if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
                raise ValueError(f"acts[{layer}] must be floating point, got dtype {a.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                a = a.astype(self._np_dtype, copy=False)  # [R_tokens, D]
            finite = np.isfinite(a).all(axis=1)
            if not finite.all():
                tok = int(np.argmin(finite))
                row = int(rows[np.searchsorted(np.cumsum(lengths), tok, side="right")])
                raise ValueError(
                    f"acts[{layer}] has a non-finite value at row {row} after casting to "
                    f"{self.dtype} (overflow? store as float32 or bfloat16)"
                )
            cast[layer] = a
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
                    if attempt >= self.retries or not _transient(e):
                        if attempt:
                            self._error_note = f" after {attempt} retries"
                        raise
                    delay = min(RETRY_DELAY_S * 2**attempt, MAX_RETRY_DELAY_S)
                    self.on_retry(
                        f"writing shard {s} of {self.url} failed ({_short_error(e)}); "
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
                f"{_short_error(self._error, 400)}"
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
        self._attrs["completed"] = _now()
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
