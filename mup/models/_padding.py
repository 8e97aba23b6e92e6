"""Padded token batches and their rope positions, shared by `generate` and the engine.

Axis letters: B rows, P padded length.

Rows of different lengths share one [B, P] batch: left-padded (`generate`: every row's last
prompt token sits in the same column) or right-padded (the engine's chunked prefill). Either way
a token's rope position counts the real tokens before it, so a row computes what it would alone;
padding is marked invalid and never attended to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp
import numpy as np


def pad_tokens(
    rows: Sequence[Sequence[int]],
    length: int,
    *,
    pad_id: int,
    side: Literal["left", "right"] = "right",
    n_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] int32, valid [B, P] bool) of token-id `rows`, each padded with `pad_id`
    to `length` on `side`; B = `n_rows` (default len(rows)), extra rows all padding."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    B = len(rows) if n_rows is None else n_rows
    tokens = np.full((B, length), pad_id, np.int32)  # [B, P]
    valid = np.zeros((B, length), bool)  # [B, P]
    for b, row in enumerate(rows):
        n = len(row)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        tokens[b, cols] = row
        valid[b, cols] = True
    return tokens, valid


def token_positions(valid, start=0):
    """Rope positions [B, P] int32 of a padded batch: `start` plus the number of real tokens
    before each token (padding repeats its neighbour's position; it is never attended to).

    Left padding: a row's first real token is position `start`. Right padding in chunks: pass
    the chunk's first column as `start`."""
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    return positions if isinstance(start, int) and start == 0 else start + positions
