"""The packer: every record once and whole, rows that fill the batches, inputs that restart
positions per record, outputs mapped back to each record's own tokens; and end to end, a packed
extraction stores what an unpacked one stores."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mup import store
from mup.extract import ExtractConfig, run
from mup.extract._capture import BatchPlanner
from mup.extract._packing import (
    ROW_LENGTHS,
    ForwardCost,
    Packer,
    batch_inputs,
    choose_row_len,
    pack_rows,
    token_index,
)
from mup.extract._run import _windows
from mup.models import NAMED_CONFIGS

BATCH_TOKENS = 8192
# SmolLM2's shard of 28,672 tokens, two per window (mup.extract._run.WINDOW_SHARDS).
WINDOW_TOKENS = 2 * 28_672


def stakes_like_lengths(seed: int, n: int = 1300) -> np.ndarray:
    """Chat-templated lengths shaped like the stakes sets: median ~170 tokens, a long tail to
    2300 (the training set: 1319 records, 43..1243 tokens; the dev sets reach 2310)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(170), 0.75, n), 35, 2300).astype(np.int64)


def plan(lengths, row_len, *, batch_tokens=BATCH_TOKENS, window_tokens=WINDOW_TOKENS):
    planner = BatchPlanner(batch_tokens, int(lengths.max()), 1)
    windows = _windows(np.arange(lengths.size), lengths, window_tokens)
    return planner, windows, list(Packer(planner, row_len).batches(lengths, windows))


def check_batches(planner, windows, batches, lengths, row_len):
    """Each record once, whole, inside its row, no two overlapping; rows of the planned
    lengths; a batch draws on at most two consecutive windows (the writer's memory bound)."""
    window_of = np.empty(lengths.size, np.int64)
    for w, rows in enumerate(windows):
        window_of[rows] = w
    seen = np.concatenate([b.records for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(lengths.size))
    for b in batches:
        assert 1 <= b.n_rows <= planner.rows_for(b.row_len)
        if row_len is None:
            assert not b.packed and b.n_rows == len(b)  # one record per row, from column 0
            assert b.row_len in planner.buckets and not b.start.any()
        else:
            assert b.packed and b.row_len // row_len in (1, 2, 4, 8, 16, 32)
            assert b.row_len % row_len == 0
        ends = b.start + lengths[b.records]
        assert ends.max() <= b.row_len and b.start.min() >= 0
        for r in range(b.n_rows):
            mine = np.flatnonzero(b.row == r)
            assert mine.size, "an empty row"
            # Left to right without gaps or overlaps.
            np.testing.assert_array_equal(b.start[mine][1:], ends[mine][:-1])
            assert b.start[mine][0] == 0
        span = window_of[b.records]
        assert span.max() - span.min() <= 1


def fills(planner, batches, lengths) -> np.ndarray:
    """Real tokens over computed tokens (rows rounded up to a row bucket), per batch."""
    return np.array(
        [
            lengths[b.records].sum() / (planner.padded_rows(b.n_rows, b.row_len) * b.row_len)
            for b in batches
        ]
    )


@pytest.mark.parametrize("row_len", [None, 128, 512, 1024])
def test_every_record_once_whole_and_in_place(row_len):
    lengths = stakes_like_lengths(0, n=600)
    planner, windows, batches = plan(lengths, row_len, window_tokens=20_000)
    assert len(windows) > 3
    check_batches(planner, windows, batches, lengths, row_len)
    # Deterministic: a resumed run, or another host, plans the same batches.
    _, _, again = plan(lengths, row_len, window_tokens=20_000)
    assert [b.records.tolist() for b in again] == [b.records.tolist() for b in batches]
    assert [b.start.tolist() for b in again] == [b.start.tolist() for b in batches]


def test_long_records_get_longer_rows_that_short_ones_fill():
    # A record longer than the row opens one of 256 * 2**k tokens; shorter ones fill its tail
    # (fullest row first) before any new row opens.
    assert pack_rows(np.array([90, 300, 40]), 256) == [(512, [1, 0, 2])]
    lengths = np.array([20, 700, 600, 200, 90, 40, 30])
    rows = pack_rows(lengths, 256)
    assert rows == [(1024, [1, 3, 4, 6]), (1024, [2, 5, 0])]
    assert all(lengths[items].sum() <= length for length, items in rows)


@pytest.mark.parametrize("seed", range(4))
def test_packing_fills_the_batches_of_a_stakes_like_mix(seed):
    """>= 97% real tokens over the run and in every batch before the final window (whose last
    batches hold what is left); the unpacked length buckets reach about 80%."""
    lengths = stakes_like_lengths(seed)
    cost = ForwardCost.of(NAMED_CONFIGS["smollm2-135m"], 20)
    planner, windows, _ = plan(lengths, None)
    row_len = choose_row_len(planner, lengths, windows, cost, ROW_LENGTHS)
    assert row_len is not None
    _, _, batches = plan(lengths, row_len)
    check_batches(planner, windows, batches, lengths, row_len)
    got = fills(planner, batches, lengths)
    total = lengths.sum() / sum(
        planner.padded_rows(b.n_rows, b.row_len) * b.row_len for b in batches
    )
    assert total >= 0.97
    last = set(windows[-1].tolist())
    before_last = [i for i, b in enumerate(batches) if not last & set(b.records.tolist())]
    assert before_last and got[before_last].min() >= 0.97
    _, _, unpacked = plan(lengths, None)
    assert fills(planner, unpacked, lengths).mean() < 0.85


def test_auto_does_not_pack_what_buckets_already_fill():
    """Every record exactly a bucket long: no padding to save, only attention to add."""
    lengths = np.full(200, 256, np.int64)
    planner, windows, _ = plan(lengths, None)
    assert 256 in planner.buckets
    cost = ForwardCost.of(NAMED_CONFIGS["smollm2-135m"], 20)
    assert choose_row_len(planner, lengths, windows, cost, ROW_LENGTHS) is None


def test_inputs_restart_positions_and_outputs_map_back():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, size=80).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)]
    input_ids = rng.integers(1, 1000, size=int(offsets[-1])).astype(np.int32)
    planner, _, batches = plan(lengths, 256, batch_tokens=1024, window_tokens=4000)
    for b in batches:
        n_rows = planner.padded_rows(b.n_rows, b.row_len)
        tokens, valid, positions, segments = batch_inputs(b, n_rows, offsets, input_ids)
        assert tokens.shape == valid.shape == positions.shape == segments.shape
        assert tokens.shape == (n_rows, b.row_len)
        assert valid.sum() == lengths[b.records].sum()
        for r, row, start in zip(b.records, b.row, b.start, strict=True):
            span = slice(start, start + lengths[r])
            np.testing.assert_array_equal(tokens[row, span], input_ids[offsets[r] : offsets[r + 1]])
            np.testing.assert_array_equal(positions[row, span], np.arange(lengths[r]))
            assert (segments[row, span] == segments[row, start]).all()
        # One segment id per record of a row; padding is segment 0 and never valid.
        for row in range(n_rows):
            ids = segments[row][valid[row]]
            assert np.unique(ids).size == (b.row == row).sum()
        assert not segments[~valid].any()
        # A "hidden state" that is the token id itself maps back to each record's tokens.
        keep = np.arange(len(b))[::2]
        flat = tokens.reshape(-1)[token_index(b, lengths, keep)]
        want = np.concatenate([input_ids[offsets[r] : offsets[r + 1]] for r in b.records[keep]])
        np.testing.assert_array_equal(flat, want)


def _extract(model, data, out, packing, **kw) -> tuple[object, str]:
    text = io.StringIO()
    summary = run(
        ExtractConfig(
            model=str(model),
            layers=(1, 2),
            datasets=(str(data),),
            out=str(out),
            progress=False,
            batch_tokens=512,
            dtype="float32",
            packing=packing,
            **kw,
        ),
        out=text,
    )
    return summary, text.getvalue()


def test_packed_and_unpacked_extractions_store_the_same(tiny_model, mini_path, tmp_path):
    """Rows of 64 tokens (the mini set's records have 34..89): short records share rows, longer
    ones open 128-token rows that short ones fill; the stores hold the same records, tokens and
    activations (float32 rounding: the records' sums ran in other shapes)."""
    packed, text = _extract(tiny_model, mini_path, tmp_path / "packed", 64)
    unpacked, _ = _extract(tiny_model, mini_path, tmp_path / "unpacked", "off")
    assert "% of the computed tokens real" in text
    # Other batches: fewer, and the long rows' tails filled.
    assert len(packed.batch_fill) < len(unpacked.batch_fill)
    assert max(real / computed for real, computed in packed.batch_fill) > 0.99
    a, b = store.open(packed.stores[0]), store.open(unpacked.stores[0])
    assert a.url.split("/")[-1] == b.url.split("/")[-1]  # the same key: packing is not content
    for name in ("offsets", "input_ids", "roles", "mask", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.ids == b.ids
    for layer in (1, 2):
        got, offsets = a.read_layer(layer)
        want, _ = b.read_layer(layer)
        np.testing.assert_array_equal(offsets, a.offsets)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    varies = {"packing", "created", "completed"}
    assert {k: v for k, v in a.attrs.items() if k not in varies} == {
        k: v for k, v in b.attrs.items() if k not in varies
    }
    assert (a.attrs["packing"], b.attrs["packing"]) == (64, "off")


def test_packing_setting_is_checked(tiny_model, mini_path, tmp_path):
    from mup.extract import config_from_args

    for bad in (True, 0, 513, "on"):
        with pytest.raises(ValueError, match="packing must be 'auto', 'off' or a row length"):
            _extract(tiny_model, mini_path, tmp_path, bad)
    args = ["--dataset", str(mini_path), "--out", str(tmp_path)]
    assert config_from_args(args).packing == "auto"
    assert config_from_args([*args, "--packing", "off"]).packing == "off"
    assert config_from_args([*args, "--packing", "1024"]).packing == 1024
    with pytest.raises(SystemExit):
        config_from_args([*args, "--packing", "dense"])
