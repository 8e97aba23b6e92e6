"""Argument checks of `create` and `StoreWriter.write`: everything is checked before storage is
touched, and each error names the argument, its expected shape and what it got.

Axis letters: N records, T tokens, D model width, R rows of a write.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from mup.store import _format as F


def as_int_array(name: str, value, ndim: int = 1) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a {ndim}-D integer array, got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class CreateArgs:
    """`create`'s arguments, checked and normalised (see `check_create`)."""

    layers: list[int]
    d_model: int
    offsets: np.ndarray  # [N+1] int64
    ids_raw: np.ndarray  # [N, W] uint8
    input_ids: np.ndarray  # [T] int64
    roles: np.ndarray  # [T]
    mask: np.ndarray  # [T] bool
    labels: np.ndarray | None  # [N] int64
    chunk_tokens: int
    shard_tokens: int

    @property
    def n_records(self) -> int:
        return self.offsets.size - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def check_create(
    *,
    layers,
    d_model,
    dtype,
    offsets,
    ids,
    input_ids,
    roles,
    mask,
    labels,
    attrs,
    chunk_tokens,
    shard_tokens,
) -> CreateArgs:
    """Raise ValueError for any argument `create` cannot store; else the normalised arguments."""
    layers = [int(x) for x in layers]
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise ValueError(f"layers must be distinct non-negative ints, got {layers}")
    if int(d_model) <= 0:
        raise ValueError(f"d_model must be positive, got {d_model}")
    d_model = int(d_model)
    if dtype not in F.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {F.STORAGE_DTYPES}, got {dtype!r}")
    offsets = as_int_array("offsets", offsets)
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
    input_ids = as_int_array("input_ids", input_ids)
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
        labels_a = as_int_array("labels", labels)
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
    return CreateArgs(
        layers=layers,
        d_model=d_model,
        offsets=offsets,
        ids_raw=ids_raw,
        input_ids=input_ids,
        roles=roles_a,
        mask=mask_a,
        labels=labels_a,
        chunk_tokens=ct,
        shard_tokens=st,
    )


def check_acts(
    acts, *, layers, d_model: int, dtype: str, rows: np.ndarray, lengths: np.ndarray
) -> dict:
    """The activations of one `StoreWriter.write`, each cast to the storage dtype.

    acts[layer] must be [sum of lengths, D] floating point for every stored layer, and finite
    after the cast; errors name the layer (and the row of a non-finite value).
    """
    total = int(lengths.sum())
    if not isinstance(acts, dict) or sorted(int(k) for k in acts) != sorted(layers):
        got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
        raise ValueError(
            f"acts must map every stored layer {sorted(layers)} to an array; got {got}"
        )
    np_dtype = F.numpy_dtype(dtype)
    cast = {}
    for layer in layers:
        a = np.asarray(acts[layer])
        if a.shape != (total, d_model):
            raise ValueError(
                f"acts[{layer}] must have shape [sum of row lengths, D]="
                f"[{total}, {d_model}], got {a.shape}"
            )
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            raise ValueError(f"acts[{layer}] must be floating point, got dtype {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # reported just below
            a = a.astype(np_dtype, copy=False)  # [R_tokens, D]
        finite = np.isfinite(a).all(axis=1)
        if not finite.all():
            tok = int(np.argmin(finite))
            row = int(rows[np.searchsorted(np.cumsum(lengths), tok, side="right")])
            raise ValueError(
                f"acts[{layer}] has a non-finite value at row {row} after casting to "
                f"{dtype} (overflow? store as float32 or bfloat16)"
            )
        cast[layer] = a
    return cast
