"""Storage I/O shared by the reader, the writer and `verify`: tensorstore kvstores and zarr v3
arrays and groups at a `Location`, and which failures are worth retrying."""

from __future__ import annotations

import datetime
import json

import tensorstore as ts

from mup.store import _format as F
from mup.store._location import Location, StoreError

# tensorstore status codes (the start of its error messages) worth retrying.
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No (fully created) store at the URL: create one with `create`."""


def transient(error: BaseException) -> bool:
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


def short_error(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def kv(loc: Location, sub: str = "") -> ts.KvStore:
    return ts.KvStore.open(loc.kvstore(sub)).result()


def has_key(loc: Location, key: str) -> bool:
    return kv(loc).read(key).result().state == "value"


def read_group_attrs(loc: Location) -> dict | None:
    """The group attributes at `loc`, or None if there is no zarr.json there."""
    got = kv(loc).read("zarr.json").result()
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
    kv(loc, sub).write("zarr.json", body.encode()).result()


def open_array(
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
