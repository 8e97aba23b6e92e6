"""Token masks chosen by role: which tokens a probe pools over.

Axis letters: N conversations, T tokens of all conversations together (ragged by `offsets`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mup.text._chat import ROLE_SYSTEM, ROLE_USER

MaskMode = Literal["all", "no_system", "user", "last_user"]
MASK_MODES: tuple[str, ...] = ("all", "no_system", "user", "last_user")


def token_mask(roles: np.ndarray, offsets: np.ndarray, mode: MaskMode) -> np.ndarray:
    """bool [T]: the tokens that `mode` selects.

    * ``all``: every token, template tokens included;
    * ``no_system``: every token except system-role content;
    * ``user``: user content tokens;
    * ``last_user``: the last contiguous run of user tokens of each conversation.

    A conversation can end up with no selected token (no user turn, or truncated away);
    `empty_mask_rows` lists those, and pooling refuses them.
    """
    roles, offsets = _check(roles, offsets)
    if mode == "all":
        return np.ones(len(roles), dtype=bool)
    if mode == "no_system":
        return roles != ROLE_SYSTEM
    if mode == "user":
        return roles == ROLE_USER
    if mode == "last_user":
        return _last_user(roles, offsets)
    raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")


def empty_mask_rows(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 [E]: indices of the conversations with no selected token."""
    mask, offsets = _check(mask, offsets, name="mask", dtype=bool)
    counts = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # [T+1]
    return np.flatnonzero(counts[offsets[1:]] == counts[offsets[:-1]]).astype(np.int64)


def _last_user(roles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    n_tokens, n_rows = len(roles), len(offsets) - 1
    is_user = roles == ROLE_USER  # [T]
    row_of_token = np.repeat(np.arange(n_rows), np.diff(offsets))  # [T]
    # A run starts at a user token whose predecessor is not a user token of the same row.
    run_start = is_user.copy()
    run_start[1:] &= ~is_user[:-1] | (row_of_token[1:] != row_of_token[:-1])
    starts = np.flatnonzero(run_start)  # [R]
    last_start = np.full(n_rows, -1, dtype=np.int64)  # [N]
    # maximum.at, not fancy assignment: numpy does not promise which repeated write wins.
    np.maximum.at(last_start, row_of_token[starts], starts)
    last_start[last_start < 0] = n_tokens  # rows without a user run select nothing
    # After its row's last run start, every user token of the row belongs to that run.
    return is_user & (np.arange(n_tokens) >= last_start[row_of_token])


def _check(
    values: np.ndarray, offsets: np.ndarray, *, name: str = "roles", dtype=np.uint8
) -> tuple[np.ndarray, np.ndarray]:
    values, offsets = np.asarray(values), np.asarray(offsets)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D [T], got shape {values.shape}")
    if values.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {values.dtype}")
    if offsets.ndim != 1 or len(offsets) < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be 1-D integers [N+1], got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(values) or np.any(np.diff(offsets) < 0):
        n_down = int(np.sum(np.diff(offsets) < 0))
        raise ValueError(
            f"offsets must rise from 0 to len({name}) = {len(values)}, got "
            f"{offsets[0]} ... {offsets[-1]} with {n_down} decreasing steps"
        )
    return values, offsets.astype(np.int64, copy=False)
