"""`mup store verify`: check that stores hold every object they vouch for, and every checksum.

One listing finds missing and empty objects; then every chunk of every array is read, which
checks every crc32c (format 2: each inner chunk and each shard index; format 1: shard indexes
only, as its chunks carry no checksum). Layer arrays are read shard by shard, a few at a time,
so memory stays a few shards whatever the store's size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mup.store import _format as F
from mup.store._integrity import describe_faults, list_objects, missing_objects
from mup.store._io import open_array, read_group_attrs
from mup.store._location import StoreError, parse_location

__all__ = ["Verdict", "verify", "verify_all"]

# Shards read at once: enough to keep a disk or S3 busy, few enough to bound memory.
SHARDS_IN_FLIGHT = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """What `verify` found in one store: `faults` is empty when it is sound and complete."""

    url: str
    faults: tuple[str, ...]
    summary: str

    @property
    def ok(self) -> bool:
        return not self.faults

    def line(self) -> str:
        if self.ok:
            return f"ok     {self.url}: {self.summary}"
        return f"FAULT  {self.url}: {len(self.faults)} faults: {describe_faults(list(self.faults))}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def verify(url) -> Verdict:
    """Check one store: every expected object present and non-empty, every chunk readable."""
    loc = parse_location(url)
    try:
        attrs = read_group_attrs(loc)
    except StoreError as e:
        return Verdict(url=loc.url, faults=(_one_line(e),), summary="")
    if attrs is None:
        return Verdict(url=loc.url, faults=("no mup store here",), summary="")
    objects = list_objects(loc)
    labels = "labels/zarr.json" in objects
    faults: list[str] = []
    if "done/zarr.json" not in objects:
        faults.append("never fully created (done/zarr.json missing): create it again")
        return Verdict(url=loc.url, faults=tuple(faults), summary="")
    n_shards = F.n_shards(attrs)
    try:
        done = open_array(loc.kvstore("done")).read().result().astype(bool)  # [S]
    except ValueError as e:
        faults.append(f"done: {_one_line(e)}")
        done = np.ones(n_shards, bool)  # check every shard's objects and checksums instead
    if attrs.get("complete"):
        faults += missing_objects(objects, F.expected_objects(attrs, labels=labels))
        if not done.all():
            faults.append(f"complete, yet {int((~done).sum())} of {n_shards} shards are not done")
    else:
        faults.append(f"incomplete: {int(done.sum())} of {n_shards} shards done")
        faults += missing_objects(objects, F.creation_objects(attrs, labels=labels))
        faults += missing_objects(objects, F.shard_objects(attrs, np.flatnonzero(done)))
    absent = {f.split(" ", 1)[0] for f in faults}

    # ---- every chunk of the small arrays
    small = ["offsets", "ids", "input_ids", "roles", "mask"] + (["labels"] if labels else [])
    offsets = None
    for name in small:
        if f"{name}/zarr.json" in absent:
            continue
        try:
            data = open_array(loc.kvstore(name), fill_missing=False).read().result()
        except ValueError as e:
            faults.append(f"{name}: {_one_line(e)}")
            continue
        if name == "offsets":
            offsets = data
    n, t = int(attrs["n_records"]), int(attrs["n_tokens"])
    if offsets is not None and (
        offsets.shape != (n + 1,)
        or offsets[0] != 0
        or offsets[-1] != t
        or np.any(np.diff(offsets) < 0)
    ):
        faults.append(f"offsets {offsets.shape} do not describe N={n} records of T={t} tokens")

    # ---- every shard of every layer, a few at a time
    shard_tokens = int(attrs["shard_tokens"])
    checked = 0
    for layer in attrs["layers"]:
        if f"layers/{layer}/zarr.json" in absent:
            continue
        try:
            arr = open_array(loc.kvstore(f"layers/{layer}"), fill_missing=False)
        except ValueError as e:
            faults.append(f"layers/{layer}: {_one_line(e)}")
            continue
        todo = [s for s in range(n_shards) if done[s] and F.shard_key(layer, s) not in absent]
        for i in range(0, len(todo), SHARDS_IN_FLIGHT):
            reads = [
                (s, arr[s * shard_tokens : min((s + 1) * shard_tokens, t)].read())
                for s in todo[i : i + SHARDS_IN_FLIGHT]
            ]
            for s, future in reads:
                try:
                    future.result()
                    checked += 1
                except ValueError as e:
                    faults.append(f"{F.shard_key(layer, s)}: {_one_line(e)}")
    version = attrs.get("format_version")
    sums = (
        "every chunk checksum verified"
        if version >= 2
        else "format 1: chunks carry no checksum, only presence and shard indexes were checked"
    )
    summary = (
        f"format {version}, complete, {n} records, {t} tokens, {len(attrs['layers'])} layers x "
        f"{n_shards} shards ({checked} read), {len(objects)} objects, {sums}"
    )
    return Verdict(url=loc.url, faults=tuple(faults), summary=summary)


def verify_all(url) -> list[Verdict]:
    """Verify the store at `url`, or, when `url` holds none, every store below it (an --out
    location: stores sit one or two levels down, as <out>/<model>/<store>)."""
    from mup.store._reader import child_names, list_stores

    loc = parse_location(url)
    try:
        if read_group_attrs(loc) is not None:
            return [verify(loc.url)]
    except StoreError:
        return [verify(loc.url)]
    found = [listing.url for listing in list_stores(loc.url)]
    for name in child_names(loc):
        found += [listing.url for listing in list_stores(loc.child(name).url)]
    if not found:
        return [Verdict(url=loc.url, faults=("no mup store here or below",), summary="")]
    return [verify(u) for u in sorted(dict.fromkeys(found))]
