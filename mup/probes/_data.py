"""In-memory ragged activations, the common input of every probe.

Axis letters: T tokens (all records concatenated), N records, D model width (times the number of
layers when layers are concatenated).

A store (`mup.store.ActivationStore`) and an `Activations` are interchangeable everywhere in
`mup.probes`: `as_activations` turns either into an `Activations` for the requested layers
(`mup.probes._stream` reads stores chunk by chunk instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Combine = Literal["concat", "sum"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Activations:
    """Ragged per-token activations of N records.

    Attributes:
      acts: [T, D] float (float32 / float16 / bfloat16), records concatenated token-major.
      offsets: [N+1] int64, record i is acts[offsets[i]:offsets[i+1]]; offsets[0] == 0.
      mask: [T] bool, which tokens a probe may read (e.g. the conversation, not the template);
        None means every token. Every record needs at least one masked token.
      labels: [N] int8, 1 high stakes, 0 low stakes, -1 unlabelled / ambiguous; None if unknown.
      ids: optional [N] record ids (kept for results files).
      layers: the store layers these activations came from (metadata, may be empty).
    """

    acts: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None
    ids: Any = None
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        acts = self.acts
        if not isinstance(acts, np.ndarray):
            acts = np.asarray(acts)
            object.__setattr__(self, "acts", acts)
        if acts.ndim != 2:
            raise ValueError(f"Activations.acts must be [T, D], got shape {acts.shape}")
        if not np.issubdtype(acts.dtype, np.floating) and acts.dtype.name != "bfloat16":
            raise TypeError(f"Activations.acts must be floating point, got {acts.dtype}")
        offsets = np.asarray(self.offsets)
        if (
            offsets.ndim != 1
            or offsets.shape[0] < 2
            or not np.issubdtype(offsets.dtype, np.integer)
        ):
            raise ValueError(
                f"Activations.offsets must be integer [N+1] with N >= 1, got {offsets.dtype} "
                f"{offsets.shape}"
            )
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != acts.shape[0]:
            raise ValueError(
                f"Activations.offsets must start at 0 and end at T = {acts.shape[0]}, got "
                f"{offsets[0]} ... {offsets[-1]}"
            )
        steps = np.diff(offsets)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0))
            raise ValueError(f"Activations: record {i} is empty (offsets[{i}] == offsets[{i + 1}])")
        object.__setattr__(self, "offsets", offsets)
        n = offsets.shape[0] - 1
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.shape != (acts.shape[0],):
                raise ValueError(
                    f"Activations.mask must be bool [T] = [{acts.shape[0]}], got {mask.shape}"
                )
            mask = mask.astype(bool)
            counts = np.add.reduceat(mask.astype(np.int64), offsets[:-1])
            if (counts == 0).any():
                i = int(np.argmax(counts == 0))
                rid = f" (id {self.ids[i]!r})" if self.ids is not None else ""
                raise ValueError(
                    f"Activations: record {i}{rid} has no masked token; a probe would have "
                    "nothing to read"
                )
            object.__setattr__(self, "mask", mask)
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,):
                raise ValueError(f"Activations.labels must be [N] = [{n}], got {labels.shape}")
            bad = ~np.isin(labels, (-1, 0, 1))
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"Activations.labels[{i}] = {labels[i]}; expected 1, 0 or -1")
            object.__setattr__(self, "labels", labels.astype(np.int8))
        if self.ids is not None and len(self.ids) != n:
            raise ValueError(f"Activations.ids has {len(self.ids)} entries for {n} records")
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def n_records(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def d_model(self) -> int:
        return self.acts.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        """[N] number of tokens a probe reads in each record (masked tokens only)."""
        if self.mask is None:
            return np.diff(self.offsets)
        return np.add.reduceat(self.mask.astype(np.int64), self.offsets[:-1])

    def select(self, rows) -> Activations:
        """A copy holding the records `rows` (int indices or a bool [N] mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.nonzero(rows)[0]
        rows = rows.astype(np.int64)
        if rows.size == 0:
            raise ValueError("select: no rows selected")
        if rows.min() < 0 or rows.max() >= self.n_records:
            raise IndexError(f"select: rows must be in [0, {self.n_records}), got {rows.max()}")
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        tok = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(
            lengths.sum()
        )  # [T'] token indices in the source
        ids = None
        if self.ids is not None:
            ids = [self.ids[i] for i in rows.tolist()]
        return Activations(
            acts=self.acts[tok],
            offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
            mask=None if self.mask is None else self.mask[tok],
            labels=None if self.labels is None else self.labels[rows],
            ids=ids,
            layers=self.layers,
        )

    def compact(self) -> Activations:
        """Drop unmasked tokens: the result reads the same tokens with mask None."""
        if self.mask is None:
            return self
        kept = np.r_[0, np.cumsum(self.mask, dtype=np.int64)]  # [T+1]
        return dataclasses.replace(
            self, acts=self.acts[self.mask], offsets=kept[self.offsets], mask=None
        )

    @classmethod
    def from_store(
        cls, store, layer: int | Sequence[int], *, rows=None, combine: Combine = "concat"
    ) -> Activations:
        """Read one layer, or several combined by concatenation / sum, from an activation store.

        Raises for an incomplete store and for a layer the store does not hold.
        """
        layers = check_store(store, layer, combine)
        sel = None if rows is None else np.asarray(rows, dtype=np.int64)
        parts = []
        offsets = None
        for x in layers:
            a, off = store.read_layer(x, rows=sel)
            parts.append(np.asarray(a))
            offsets = np.asarray(off, dtype=np.int64)
        if len(parts) == 1:
            acts = parts[0]
        elif combine == "concat":
            acts = np.concatenate(parts, axis=1)  # [T, D * L]
        else:
            acts = np.sum([p.astype(np.float32) for p in parts], axis=0)  # [T, D]
        full_off = np.asarray(store.offsets, dtype=np.int64)
        store_mask = None if store.mask is None else np.asarray(store.mask, dtype=bool)
        labels = None if store.labels is None else np.asarray(store.labels)
        ids = None if store.ids is None else list(store.ids)
        if sel is not None:
            if store_mask is not None:
                from mup import store as store_mod

                store_mask = store_mask[store_mod.token_indices(full_off, sel)]
            labels = None if labels is None else labels[sel]
            ids = None if ids is None else [ids[r] for r in sel.tolist()]
        return cls(
            acts=acts, offsets=offsets, mask=store_mask, labels=labels, ids=ids, layers=layers
        )


def check_store(store, layer, combine) -> tuple[int, ...]:
    """The requested layers, after checking the store is complete and holds them."""
    layers = _layer_tuple(layer)
    if not getattr(store, "complete", False):
        raise ValueError(
            f"activation store {store_name(store)} is incomplete (its `complete` flag is "
            "not set: extraction did not finish); re-run or resume the extraction"
        )
    missing = [x for x in layers if x not in tuple(store.layers)]
    if missing:
        raise ValueError(
            f"layer(s) {missing} not in activation store {store_name(store)}; it holds "
            f"layers {list(store.layers)}"
        )
    if combine not in ("concat", "sum"):
        raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
    return layers


def is_store(data) -> bool:
    """True for an activation store (duck-typed: `mup.store.ActivationStore` or alike)."""
    return hasattr(data, "read_layer") and hasattr(data, "offsets")


def _layer_tuple(layer) -> tuple[int, ...]:
    if layer is None:
        raise ValueError("layer is required when reading from an activation store")
    if isinstance(layer, int | np.integer):
        return (int(layer),)
    layers = tuple(int(x) for x in layer)
    if not layers:
        raise ValueError("layer: empty list of layers")
    return layers


def store_name(store) -> str:
    return repr(getattr(store, "url", None) or getattr(store, "path", None) or store)


def concat(parts: Sequence[Activations]) -> Activations:
    """One `Activations` holding the records of every part, in order (e.g. several datasets)."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat: no activations given")
    widths = {p.d_model for p in parts}
    if len(widths) != 1:
        raise ValueError(f"concat: the parts have different widths {sorted(widths)}")
    layer_sets = {p.layers for p in parts}
    if len(layer_sets) != 1:
        raise ValueError(f"concat: the parts come from different layers {sorted(layer_sets)}")
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    dtypes = {p.acts.dtype for p in parts}
    acts = np.concatenate(
        [p.acts if len(dtypes) == 1 else p.acts.astype(np.float32) for p in parts]
    )
    masks = [p.mask if p.mask is not None else np.ones(p.acts.shape[0], bool) for p in parts]
    has_labels = all(p.labels is not None for p in parts)
    has_ids = all(p.ids is not None for p in parts)
    return Activations(
        acts=acts,
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        mask=None if all(p.mask is None for p in parts) else np.concatenate(masks),
        labels=np.concatenate([p.labels for p in parts]) if has_labels else None,
        ids=[i for p in parts for i in p.ids] if has_ids else None,
        layers=parts[0].layers,
    )


def as_activations(data, layer=None, *, combine: Combine = "concat") -> Activations:
    """An `Activations` from an `Activations` (returned as is), an activation store, or a list
    of those (their records concatenated, e.g. to train on several datasets)."""
    if isinstance(data, list | tuple):
        return concat([as_activations(x, layer, combine=combine) for x in data])
    if isinstance(data, Activations):
        if layer is not None and data.layers and _layer_tuple(layer) != data.layers:
            raise ValueError(
                f"layer {layer} requested but these in-memory activations hold layers "
                f"{list(data.layers)}"
            )
        return data
    if is_store(data):
        return Activations.from_store(data, layer, combine=combine)
    raise TypeError(
        f"expected mup.probes.Activations or an activation store (mup.store.open), got "
        f"{type(data).__name__}"
    )


def labelled(data: Activations, what: str) -> Activations:
    """The records with label 0 or 1; errors for missing labels or a single class."""
    keep = labelled_rows(data.labels, what)
    return data if keep is None else data.select(keep)


def labelled_rows(labels, what: str):
    """None if every record is labelled 0/1, else the bool [N] of those that are."""
    if labels is None:
        raise ValueError(f"{what} has no labels; probes train on labelled records")
    labels = np.asarray(labels)
    keep = labels != -1
    if not keep.any():
        raise ValueError(f"{what}: every one of the {labels.size} records is unlabelled (-1)")
    n_pos, n = int((labels[keep] == 1).sum()), int(keep.sum())
    if n_pos in (0, n):
        only = "high-stakes (1)" if n_pos else "low-stakes (0)"
        raise ValueError(
            f"{what} has single-class labels: all {n} labelled records are {only}; "
            "a probe needs both classes"
        )
    return None if keep.all() else keep
