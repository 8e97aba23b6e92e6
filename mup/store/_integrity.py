"""What a store must hold, checked against one listing of what it does hold.

A deleted or truncated object is invisible to a zarr reader: a missing chunk reads as the fill
value. So the writer lists the store before it sets `complete`, `open` lists it before it hands
out a reader, and `mup store verify` lists it before it reads every chunk. One listing (a
directory walk, or a paginated S3 LIST of 1000 keys per request) costs far less than a read.
"""

from __future__ import annotations

import os

from mup.store._location import Location, StoreError

__all__ = ["DamagedStoreError", "describe_faults", "list_objects", "missing_objects"]

# How many missing objects an error message names before it only counts the rest.
NAMED_FAULTS = 8


class DamagedStoreError(StoreError):
    """Objects a store must hold are missing, empty or fail their checksum (one line)."""


def list_objects(loc: Location, sub: str = "") -> dict[str, int]:
    """Every object below `loc` (or its subdirectory `sub`): relative key -> size in bytes."""
    out: dict[str, int] = {}
    if loc.kind == "file":
        root = os.path.join(loc.path, sub) if sub else loc.path
        for directory, _, files in os.walk(root):
            for name in files:
                full = os.path.join(directory, name)
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:
                    continue  # removed while walking (a writer's temporary file)
                out[os.path.relpath(full, loc.path).replace(os.sep, "/")] = size
        return out
    import botocore.exceptions as bexc

    client = loc.boto3_client()
    base = loc.prefix + "/" if loc.prefix else ""
    prefix = base + (sub.strip("/") + "/" if sub else "")
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                out[item["Key"][len(base) :]] = int(item["Size"])
    except (bexc.ClientError, bexc.BotoCoreError) as e:  # e.g. the bucket is gone
        raise StoreError(f"listing {loc.url} failed: {' '.join(str(e).split())}") from None
    return out


def missing_objects(objects: dict[str, int], keys) -> list[str]:
    """Faults of `keys` against a listing: "KEY missing" or "KEY empty (0 bytes)", in order."""
    faults = []
    for key in keys:
        size = objects.get(key)
        if size is None:
            faults.append(f"{key} missing")
        elif size == 0:
            faults.append(f"{key} empty (0 bytes)")
    return faults


def describe_faults(faults: list[str]) -> str:
    """'a; b; c (and 12 more)': the first NAMED_FAULTS faults on one line."""
    named = "; ".join(faults[:NAMED_FAULTS])
    more = len(faults) - NAMED_FAULTS
    return f"{named} (and {more} more)" if more > 0 else named
