"""Role masks: hand-made ragged arrays, then a real multi-turn chat."""

from __future__ import annotations

import numpy as np
import pytest

from mup.text import MASK_MODES, ROLE_USER, empty_mask_rows, encode_chats, token_mask

# Three rows: [T S S U U T A U U T] [U U] [T A]; row 0 ends ... row 1 starts with user tokens,
# so a run must not continue across the row boundary.
ROLES = np.array([0, 1, 1, 2, 2, 0, 3, 2, 2, 0, 2, 2, 0, 3], dtype=np.uint8)
OFFSETS = np.array([0, 10, 12, 14], dtype=np.int64)


def test_modes_on_hand_made_rows():
    t, f = True, False
    expected = {
        "all": [t] * 14,
        "no_system": [t, f, f, t, t, t, t, t, t, t, t, t, t, t],
        "user": [f, f, f, t, t, f, f, t, t, f, t, t, f, f],
        "last_user": [f, f, f, f, f, f, f, t, t, f, t, t, f, f],
    }
    assert set(expected) == set(MASK_MODES)
    for mode, want in expected.items():
        mask = token_mask(ROLES, OFFSETS, mode)
        assert mask.dtype == bool and mask.tolist() == want, mode


def test_last_user_when_a_row_ends_in_user_and_the_next_starts_with_user():
    roles = np.array([2, 0, 2, 2, 2, 2, 0], dtype=np.uint8)
    offsets = np.array([0, 4, 7])
    assert token_mask(roles, offsets, "last_user").tolist() == [
        False,
        False,
        True,
        True,
        True,
        True,
        False,
    ]


def test_empty_mask_rows():
    assert empty_mask_rows(token_mask(ROLES, OFFSETS, "user"), OFFSETS).tolist() == [2]
    assert empty_mask_rows(token_mask(ROLES, OFFSETS, "all"), OFFSETS).tolist() == []
    # empty rows (no tokens at all) count as empty
    offsets = np.array([0, 0, 14, 14])
    assert empty_mask_rows(token_mask(ROLES, offsets, "last_user"), offsets).tolist() == [0, 2]
    assert token_mask(ROLES, offsets, "last_user").sum() == 2  # only the last run of the row


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask mode 'assistant'"):
        token_mask(ROLES, OFFSETS, "assistant")
    with pytest.raises(TypeError, match="roles must have dtype uint8, got int64"):
        token_mask(ROLES.astype(np.int64), OFFSETS, "user")
    with pytest.raises(ValueError, match="roles must be 1-D"):
        token_mask(ROLES.reshape(2, 7), OFFSETS, "user")
    with pytest.raises(ValueError, match=r"offsets must rise from 0 to len\(roles\) = 14"):
        token_mask(ROLES, np.array([0, 12, 10, 14]), "user")
    with pytest.raises(ValueError, match="offsets must rise"):
        token_mask(ROLES, np.array([0, 10]), "user")
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        empty_mask_rows(ROLES, OFFSETS)


def test_modes_on_a_multi_turn_chat(tokenizer):
    chats = [
        [
            {"role": "system", "content": "You judge stakes."},
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Second question"},
            {"role": "user", "content": "Follow-up"},
            {"role": "assistant", "content": "Second answer"},
        ],
        [{"role": "assistant", "content": "Only the assistant speaks"}],
    ]
    encoded = encode_chats(tokenizer, chats)

    def selected(mode, row):
        mask = token_mask(encoded.roles, encoded.offsets, mode)
        start, end = encoded.offsets[row], encoded.offsets[row + 1]
        return tokenizer.decode(encoded.input_ids[start:end][mask[start:end]])

    assert selected("all", 0) == tokenizer.decode(encoded.row(0)[0])
    assert "You judge stakes." not in selected("no_system", 0)
    assert selected("no_system", 0).count("<|im_start|>") == 6
    assert selected("user", 0) == "First questionSecond questionFollow-up"
    # separate user messages are separate runs: the last one is the follow-up only
    assert selected("last_user", 0) == "Follow-up"
    assert selected("user", 1) == "" and selected("last_user", 1) == ""
    assert "Only the assistant speaks" in selected("no_system", 1)
    mask = token_mask(encoded.roles, encoded.offsets, "last_user")
    assert empty_mask_rows(mask, encoded.offsets).tolist() == [1]
    assert np.all(encoded.roles[mask] == ROLE_USER)
