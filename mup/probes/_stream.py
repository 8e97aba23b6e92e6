"""Probes over activation stores streamed chunk by chunk (`mup.store`'s chunked reads).

Axis letters: T tokens, N records, R records of a chunk, D model width (times the number of
layers when layers are concatenated).

Stores are read `mup.store.READ_CHUNK_BYTES` at a time, the next chunk prefetched, so a layer
never has to fit in memory; an `Activations` (or anything else `as_activations` takes) comes
whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from mup.probes._data import (
    Activations,
    Combine,
    as_activations,
    check_store,
    is_store,
    labelled_rows,
    store_name,
)


def masked_lengths(store) -> np.ndarray:
    """[N] masked tokens per record of a store, read from its small arrays (no activations);
    errors for a record a probe could not read."""
    from mup import store as store_mod

    lengths = store_mod.masked_lengths(
        store.offsets, None if store.mask is None else np.asarray(store.mask, bool)
    )
    if (lengths == 0).any():
        i = int(np.argmax(lengths == 0))
        raise ValueError(
            f"record {i} (id {list(store.ids)[i]!r}) of store {store_name(store)} has no masked "
            "token; a probe would have nothing to read"
        )
    return lengths


def record_chunks(data, layer, *, combine: Combine) -> Iterator[Activations]:
    """Activations of consecutive records covering `data` in order: a store is read
    `mup.store.READ_CHUNK_BYTES` at a time, anything else comes whole."""
    from mup import store as store_mod

    if not is_store(data):
        yield as_activations(data, layer, combine=combine)
        return
    layers = check_store(data, layer, combine)
    runs = store_mod.plan_chunks(
        np.diff(np.asarray(data.offsets, np.int64)),
        store_mod.token_bytes(data, len(layers)),
        store_mod.READ_CHUNK_BYTES,
    )
    read = lambda rows: Activations.from_store(data, layers, rows=rows, combine=combine)  # noqa: E731
    for _, acts in store_mod.prefetched(read, runs):
        yield acts


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Pooled:
    """One pooled vector per record: x [N, D] float32, labels [N] int8 or None, layers."""

    x: np.ndarray
    labels: np.ndarray | None
    layers: tuple[int, ...]

    def labelled(self, what: str) -> Pooled:
        """The records with label 0 or 1; errors for missing labels or a single class."""
        keep = labelled_rows(self.labels, what)
        return (
            self
            if keep is None
            else Pooled(x=self.x[keep], labels=self.labels[keep], layers=self.layers)
        )


def pooled(data, layer, *, combine: Combine, method: str) -> Pooled:
    """Pool every record's masked tokens with `mup.native.pool` (`method`: mean / last).

    Stores are streamed chunk by chunk (`iter_row_chunks`), so a layer never has to fit in
    memory; lists are pooled part by part and concatenated.
    """
    from mup import native
    from mup import store as store_mod

    if isinstance(data, list | tuple):
        parts = [pooled(x, layer, combine=combine, method=method) for x in data]
        if len({p.x.shape[1] for p in parts}) != 1:
            raise ValueError(f"the parts have different widths {[p.x.shape[1] for p in parts]}")
        has_labels = all(p.labels is not None for p in parts)
        return Pooled(
            x=np.concatenate([p.x for p in parts]),
            labels=np.concatenate([p.labels for p in parts]) if has_labels else None,
            layers=parts[0].layers,
        )
    if isinstance(data, Activations) or not hasattr(data, "iter_row_chunks"):
        acts = as_activations(data, layer, combine=combine)
        x = native.pool(acts.acts, acts.offsets, method=method, mask=acts.mask)
        return Pooled(x=np.asarray(x, np.float32), labels=acts.labels, layers=acts.layers)
    layers = check_store(data, layer, combine)
    offsets = np.asarray(data.offsets, np.int64)
    mask = np.asarray(data.mask, bool)
    masked_lengths(data)  # every record must have a token to read
    per_layer = []
    for x_layer in layers:
        out = np.empty((data.n_records, data.d_model), np.float32)  # [N, D]
        for rows, acts, off in data.iter_row_chunks(x_layer, store_mod.READ_CHUNK_BYTES):
            t0 = offsets[rows[0]]
            m = mask[t0 : t0 + off[-1]]
            out[rows] = native.pool(acts, off, method=method, mask=m)
        per_layer.append(out)
    if len(per_layer) == 1:
        x = per_layer[0]
    elif combine == "concat":
        x = np.concatenate(per_layer, axis=1)  # [N, D * L]
    else:
        # Pooling (mean / last) is linear, so pooling the sum equals summing the pools.
        x = np.sum(per_layer, axis=0)
    labels = None if data.labels is None else np.asarray(data.labels, np.int8)
    return Pooled(x=x, labels=labels, layers=layers)
