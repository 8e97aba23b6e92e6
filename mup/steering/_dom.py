"""Difference-of-means (CAA) steering vectors, from a labelled store or from paired prompts.

Axis letters: N records, T tokens, D model width, P pairs, R rows (2P), B batch rows.

Block convention (see `mup.steering._vector`): the vector for block L (added to the output of
block L) is measured at layer L + 1, ``hidden_states[L + 1]``, i.e. store layer L + 1 or
forward capture L + 1, because that residual stream IS block L's output.

From a store: each record with a label in {0, 1} and at least one masked token is pooled to the
mean of its masked tokens; the vector is mean(positive records) - mean(negative records).
Records labelled -1 and records whose mask is empty have no place in either class; they are
counted in the result (never silently dropped from the report).

From pairs: the chosen and rejected response of each pair are pooled over their response tokens
("mean") or taken at the last response token ("last"); the vector is the mean of the P
chosen - rejected differences. "pca" takes the first right singular vector u of the (uncentred)
[P, D] mean-pooled differences, signed so that u . mean_diff > 0, and scaled to the length of
mean_diff's projection on it: (mean_diff . u) u, comparable in norm to the "mean" vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp
import numpy as np

from mup._renamed import old_keywords
from mup.steering._pairs import PreferencePair, encode_pairs
from mup.steering._vector import SteeringVector

PairMethod = Literal["mean", "last", "pca"]
PAIR_METHODS = ("mean", "last", "pca")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DomResult:
    """A difference-of-means vector and the counts it came from."""

    vector: SteeringVector
    n_positive: int  # records / pairs on the positive side
    n_negative: int
    n_unlabelled: int = 0  # store records with label -1 (not used)
    n_empty: int = 0  # labelled store records without masked tokens (not used)
    explained: float | None = None  # pca: share of the differences' energy on the component

    @property
    def norm(self) -> float:
        return self.vector.norm

    def summary(self) -> str:
        v = self.vector
        parts = [
            f"{v.method} vector for block {v.block} (measured at hidden_states[{v.block + 1}])",
            f"norm {v.norm:.4g}",
            f"d_model {v.d_model}",
            f"positive {self.n_positive}, negative {self.n_negative}",
        ]
        if self.n_unlabelled or self.n_empty:
            parts.append(f"not used: {self.n_unlabelled} unlabelled, {self.n_empty} empty-mask")
        if self.explained is not None:
            parts.append(f"PC1 explains {self.explained:.1%}")
        return "; ".join(parts)


@old_keywords(layer="block")
def dom_from_store(store, block: int, *, max_bytes: int | None = None) -> DomResult:
    """Difference of means between label-1 and label-0 records of an activation store.

    store: an `ActivationStore` or its URL. block: the steered block L; the store must hold
    layer L + 1. Activations stream chunk by chunk (`iter_row_chunks`, at most `max_bytes`
    each, default `mup.store.READ_CHUNK_BYTES`), so a store larger than memory works; sums
    accumulate in float64. ``layer=`` is the old name of ``block=``.
    """
    from mup import native
    from mup import store as store_mod
    from mup.probes import ClassMeans

    block = int(block)
    st = store_mod.open(store) if not isinstance(store, store_mod.ActivationStore) else store
    source = block + 1
    if source not in st.layers:
        hint = (
            f"; to steer with store layer S use block S-1 (available: {[s - 1 for s in st.layers]})"
            if st.layers
            else ""
        )
        raise ValueError(
            f"steering block {block} (its output) needs hidden_states"
            f"[{source}], but store {st.url} holds layers {st.layers}{hint}"
        )
    labels = st.labels
    if labels is None:
        raise ValueError(f"store {st.url} has no labels; a difference of means needs them")
    mask = st.mask  # [T]
    d = st.d_model
    means_by_class = ClassMeans(d)
    n_unlabelled = int(np.count_nonzero(labels == -1))
    n_empty = 0
    if max_bytes is None:
        max_bytes = store_mod.READ_CHUNK_BYTES
    for rows, acts, offsets in st.iter_row_chunks(source, max_bytes=max_bytes):
        start = int(st.offsets[rows[0]])
        chunk_mask = mask[start : start + len(acts)]  # [T']
        n_masked = store_mod.masked_lengths(offsets, chunk_mask)  # [R]
        lab = labels[rows]  # [R]
        usable = (lab >= 0) & (n_masked > 0)
        n_empty += int(np.count_nonzero((lab >= 0) & (n_masked == 0)))
        if not usable.any():
            continue
        keep = np.flatnonzero(usable)
        if keep.size == len(rows):
            sub_acts, sub_offsets, sub_mask = acts, offsets, chunk_mask
        else:
            pieces = [slice(int(offsets[i]), int(offsets[i + 1])) for i in keep]
            sub_acts = np.concatenate([acts[s] for s in pieces])  # [T'', D]
            sub_mask = np.concatenate([chunk_mask[s] for s in pieces])
            sub_offsets = np.concatenate([[0], np.cumsum([s.stop - s.start for s in pieces])])
        means = native.pool(sub_acts, sub_offsets, method="mean", mask=sub_mask)  # [K, D]
        means_by_class.add(means, lab[keep])
    counts = {c: int(means_by_class.counts[c]) for c in (0, 1)}
    for c, name in ((1, "positive (label 1)"), (0, "negative (label 0)")):
        if counts[c] == 0:
            raise ValueError(
                f"store {st.url}: no {name} records with masked tokens; "
                f"{n_unlabelled} unlabelled, {n_empty} with an empty mask"
            )
    vec = means_by_class.difference()  # [D]
    sv = SteeringVector(
        vector=vec.astype(np.float32),
        block=block,
        model=str(st.attrs.get("model", "")),
        method="dom-store",
        extra={
            "source_hidden_state": source,
            "store": st.url,
            "mask_mode": st.attrs.get("mask_mode"),
            "n_positive": counts[1],
            "n_negative": counts[0],
        },
    )
    return DomResult(
        vector=sv,
        n_positive=counts[1],
        n_negative=counts[0],
        n_unlabelled=n_unlabelled,
        n_empty=n_empty,
    )


@old_keywords(layer="block")
def pooled_responses(
    model,
    pairs: Sequence[PreferencePair],
    block: int,
    *,
    pool: Literal["mean", "last"] = "mean",
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [P, D], rejected [P, D]): responses pooled at the output of `block`, i.e. at
    hidden_states[block + 1].

    One forward capture per batch of rows; the last batch is padded with copies of its first
    row so every batch has one shape (one compile). ``layer=`` is the old name of ``block=``.
    """
    from mup.models import jit_forward

    block = int(block)
    if not 0 <= block < model.config.n_layers:
        raise ValueError(f"block must be in 0..{model.config.n_layers - 1}, got {block}")
    if pool not in ("mean", "last"):
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    enc = encode_pairs(model.tokenizer, pairs)
    n_rows, t = enc.tokens.shape
    b = min(batch_size, n_rows)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))  # [B, T]
    out = np.zeros((n_rows, model.config.d_model), np.float32)  # [R, D]
    starts = range(0, n_rows, b)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"capture hidden_states[{block + 1}]", unit="batch")
    for s in starts:
        idx = np.arange(s, s + b)
        idx = np.where(idx < n_rows, idx, s)  # pad the tail with row s
        got = jit_forward(
            model.params,
            jnp.asarray(enc.tokens[idx]),
            jnp.asarray(positions),
            config=model.config,
            valid=jnp.asarray(enc.valid[idx]),
            capture=(block + 1,),
            logits=False,
        )
        h = np.asarray(got.hidden[block + 1], np.float32)  # [B, T, D]
        resp = enc.response[idx]  # [B, T]
        if pool == "mean":
            pooled = (h * resp[:, :, None]).sum(1) / resp.sum(1, keepdims=True)  # [B, D]
        else:
            last = t - 1 - np.argmax(resp[:, ::-1], axis=1)  # [B] last response token
            pooled = h[np.arange(b), last]
        n_new = min(b, n_rows - s)
        out[s : s + n_new] = pooled[:n_new]
    p = len(pairs)
    return out[:p], out[p:]


@old_keywords(layer="block")
def dom_from_pairs(
    model,
    pairs: Sequence[PreferencePair],
    block: int,
    *,
    method: PairMethod = "mean",
    batch_size: int = 16,
    progress: bool = False,
) -> DomResult:
    """Difference of means over paired completions (see the module docstring for `method`),
    for steering `block`. ``layer=`` is the old name of ``block=``."""
    block = int(block)
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {PAIR_METHODS}, got {method!r}")
    if not pairs:
        raise ValueError("dom_from_pairs: no pairs")
    pool = "last" if method == "last" else "mean"
    chosen, rejected = pooled_responses(
        model, pairs, block, pool=pool, batch_size=batch_size, progress=progress
    )
    vec, explained = difference_vector(chosen - rejected, method)
    sv = SteeringVector(
        vector=vec,
        block=block,
        model=model.spec.name,
        method=f"dom-{method}",
        extra={"source_hidden_state": block + 1, "n_pairs": len(pairs)},
    )
    return DomResult(vector=sv, n_positive=len(pairs), n_negative=len(pairs), explained=explained)


def difference_vector(diffs: np.ndarray, method: PairMethod) -> tuple[np.ndarray, float | None]:
    """The steering vector of paired differences [P, D] (float64 maths, float32 result)."""
    diffs = np.asarray(diffs, np.float64)  # [P, D]
    if diffs.ndim != 2 or diffs.shape[0] == 0:
        raise ValueError(f"differences must be [P, D] with P >= 1, got {diffs.shape}")
    mean = diffs.mean(axis=0)  # [D]
    if method != "pca":
        return mean.astype(np.float32), None
    _, s, vt = np.linalg.svd(diffs, full_matrices=False)
    u = vt[0]  # [D], unit
    proj = float(mean @ u)
    if proj < 0:
        u, proj = -u, -proj
    explained = float(s[0] ** 2 / np.sum(s**2)) if np.sum(s**2) > 0 else 0.0
    return (proj * u).astype(np.float32), explained
