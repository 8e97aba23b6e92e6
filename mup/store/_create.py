"""Creating a store, and judging what a location holds before anything is written there.

Creation is step 1 of the write protocol (see `mup.store._writer`): the group attributes
(complete=false), the arrays' metadata and the small token/record arrays are written one object
at a time, and the `done` array LAST, so that a store without `done/zarr.json` is known to have
been interrupted during creation (it holds no activations and `create` redoes it).

Axis letters: N records, T tokens, D model width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
from typing import Literal

import numpy as np
import tensorstore as ts

from mup.store import _format as F
from mup.store._integrity import list_objects
from mup.store._io import kv, now, open_array, read_group_attrs, write_group
from mup.store._location import Location, StoreError, parse_location
from mup.store._validate import check_create
from mup.store._writer import DEFAULT_RETRIES, StoreWriter

__all__ = ["FAIL_AFTER_ENV", "Occupant", "StoreExistsError", "create", "inspect"]


class StoreExistsError(StoreError, FileExistsError):
    """`create` will not write there: a store, or something that is not a store (one line)."""


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
            meta = json.loads(bytes(kv(loc).read("zarr.json").result().value))
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
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(loc.path, "zarr.json"))
        _after("zarr.json deleted")
        shutil.rmtree(loc.path, ignore_errors=True)
    else:
        kv(loc).write("zarr.json", None).result()
        _after("zarr.json deleted")
        kv(loc).delete_range(ts.KvStore.KeyRange()).result()


# Test hook: MUP_STORE_FAIL_AFTER="<step>:kill" makes `create` SIGKILL its own process right
# after that step (an object key such as "zarr.json", "offsets/zarr.json", "offsets/c" or


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
    args = check_create(
        layers=layers,
        d_model=d_model,
        dtype=dtype,
        offsets=offsets,
        ids=ids,
        input_ids=input_ids,
        roles=roles,
        mask=mask,
        labels=labels,
        attrs=attrs,
        chunk_tokens=chunk_tokens,
        shard_tokens=shard_tokens,
    )
    layers, d_model, offsets = args.layers, args.d_model, args.offsets
    n, t, ct, st = args.n_records, args.n_tokens, args.chunk_tokens, args.shard_tokens
    ids_raw, labels_a = args.ids_raw, args.labels

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
        "created": now(),
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
        ("input_ids", "int32", args.input_ids.astype(np.int32), [F.TOKEN_META_CHUNK]),
        ("roles", "uint8", args.roles.astype(np.uint8), [F.TOKEN_META_CHUNK]),
        ("mask", "bool", args.mask, [F.TOKEN_META_CHUNK]),
    ]
    if labels_a is not None:
        small.append(("labels", "int8", labels_a.astype(np.int8), [F.RECORD_META_CHUNK]))
    for name, dt, data, chunk in small:
        arr = open_array(loc.kvstore(name), F.meta_array_metadata(dt, list(data.shape), chunk))
        _after(f"{name}/zarr.json")
        arr.write(data).result()
        _after(f"{name}/c")
    for layer in layers:
        md = F.layer_array_metadata(
            n_tokens=t, d_model=d_model, dtype=dtype, chunk_tokens=ct, shard_tokens=st
        )
        open_array(loc.kvstore(f"layers/{layer}"), md)
        _after(f"layers/{layer}/zarr.json")
    n_shards = -(-t // st)
    open_array(loc.kvstore("done"), F.done_array_metadata(n_shards))
    _after("done/zarr.json")
    return StoreWriter(loc, store_attrs, offsets, s3_upload=s3_upload, retries=retries)
