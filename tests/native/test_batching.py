"""Length buckets, the batch planner and padded gather / scatter on both backends.

Gather and scatter only copy (or widen 16-bit floats to float32, which is exact), so every
comparison here is exact.
"""

import ml_dtypes
import numpy as np
import pytest

import mup.native as mn


def test_length_buckets():
    assert mn.length_buckets(100) == (16, 32, 64, 128)
    assert mn.length_buckets(128) == (16, 32, 64, 128)
    assert mn.length_buckets(3) == (16,)
    assert mn.length_buckets(0, min_len=8) == (8,)
    assert mn.length_buckets(100, min_len=16, growth=1.5) == (16, 24, 40, 64, 96, 144)
    with pytest.raises(ValueError, match="growth must be > 1"):
        mn.length_buckets(100, growth=1.0)
    with pytest.raises(ValueError, match="min_len must be an int >= 1"):
        mn.length_buckets(100, min_len=0)


def check_plan(plan, lengths, buckets, budget, max_rows):
    """The planner's invariants, checked one batch at a time."""
    seen = np.concatenate([b.rows for b in plan]) if plan else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(seen), np.arange(lengths.shape[0]))  # each row once
    for b in plan:
        assert b.padded_len in buckets and len(b) >= 1
        lens = lengths[b.rows]
        assert lens.max() <= b.padded_len
        # Bucket membership: the smallest bucket that fits, for every row of the batch.
        smallest = [min(p for p in buckets if p >= n) for n in lens.tolist()]
        assert set(smallest) == {b.padded_len}
        assert len(b) * b.padded_len <= budget or len(b) == 1
        assert max_rows is None or len(b) <= max_rows


@pytest.mark.parametrize("budget", [1, 64, 500, 4096])
@pytest.mark.parametrize("max_rows", [None, 3])
def test_plan_invariants(backend, rng, budget, max_rows):
    lengths = rng.integers(0, 300, size=200)
    plan = mn.plan_batches(lengths, token_budget=budget, max_rows=max_rows)
    buckets = mn.length_buckets(int(lengths.max()))
    check_plan(plan, lengths, buckets, budget, max_rows)
    # Bucket by bucket, rows in index order, batches as full as the budget allows.
    assert [b.padded_len for b in plan] == sorted(b.padded_len for b in plan)
    for b in plan:
        assert np.all(np.diff(b.rows) > 0)
        full = max(1, min(max_rows or 10**9, budget // b.padded_len))
        assert len(b) <= full


def test_backends_plan_identically(rng):
    if not mn.native_available():
        pytest.skip("mup._native is not built")
    lengths = rng.integers(1, 1000, size=500)
    for seed in (None, 7):
        kw = dict(token_budget=2048, buckets=(64, 256, 512, 1000), max_rows=16, shuffle_seed=seed)
        with mn.use_backend("native"):
            a = mn.plan_batches(lengths, **kw)
        with mn.use_backend("numpy"):
            b = mn.plan_batches(lengths, **kw)
        assert [x.padded_len for x in a] == [x.padded_len for x in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.rows, y.rows)


def test_shuffle_is_reproducible(backend, rng):
    lengths = rng.integers(1, 200, size=300)
    a = mn.plan_batches(lengths, token_budget=512, shuffle_seed=3)
    b = mn.plan_batches(lengths, token_budget=512, shuffle_seed=3)
    c = mn.plan_batches(lengths, token_budget=512, shuffle_seed=4)
    rows = lambda plan: np.concatenate([x.rows for x in plan])  # noqa: E731
    np.testing.assert_array_equal(rows(a), rows(b))
    assert not np.array_equal(rows(a), rows(c))
    check_plan(a, lengths, mn.length_buckets(int(lengths.max())), 512, None)


def test_plan_edge_cases(backend):
    assert mn.plan_batches(np.zeros(0, np.int64), token_budget=10) == []
    plan = mn.plan_batches([100], token_budget=10, buckets=[128])  # longer than the budget
    assert len(plan) == 1 and plan[0].padded_len == 128 and plan[0].rows.tolist() == [0]
    assert not plan[0].rows.flags.writeable
    with pytest.raises(ValueError, match="row 1 has length 300 > largest bucket 256"):
        mn.plan_batches([5, 300], token_budget=1000, buckets=[16, 256])
    with pytest.raises(ValueError, match=r"lengths\[0\] == -1 is negative"):
        mn.plan_batches([-1], token_budget=10)
    with pytest.raises(ValueError, match="strictly increasing"):
        mn.plan_batches([5], token_budget=10, buckets=[32, 16])
    with pytest.raises(ValueError, match="token_budget must be an int >= 1"):
        mn.plan_batches([5], token_budget=0)


def rowwise_gather(acts, offsets, rows, padded_len, mask, out_dtype):
    block = np.zeros((len(rows), padded_len, acts.shape[1]), out_dtype)
    bmask = np.zeros((len(rows), padded_len), bool)
    for i, r in enumerate(rows):
        s, e = offsets[r], offsets[r + 1]
        block[i, : e - s] = acts[s:e].astype(out_dtype)
        bmask[i, : e - s] = True if mask is None else mask[s:e]
    return block, bmask


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, np.float32, np.float16])
def test_gather_matches_rowwise(backend, make_ragged, rng, dtype, out_dtype):
    acts, offsets = make_ragged([3, 0, 17, 32, 9], 10, dtype)
    mask = rng.random(acts.shape[0]) < 0.5
    rows = np.array([3, 1, 0, 3, 2])
    for m in (None, mask):
        block, bmask = mn.gather_padded(acts, offsets, rows, 32, mask=m, out_dtype=out_dtype)
        ref_block, ref_mask = rowwise_gather(acts, offsets, rows, 32, m, out_dtype or dtype)
        assert block.dtype == ref_block.dtype and block.shape == (5, 32, 10)
        assert bmask.dtype == np.bool_
        np.testing.assert_array_equal(block.view(np.uint8), ref_block.view(np.uint8))
        np.testing.assert_array_equal(bmask, ref_mask)


def test_gather_non_contiguous_and_empty(backend, make_ragged):
    acts, offsets = make_ragged([4, 6], 12, np.float16)
    view = acts[:, 2:9]
    block, _ = mn.gather_padded(view, offsets, [1, 0], 8)
    ref, _ = rowwise_gather(np.ascontiguousarray(view), offsets, [1, 0], 8, None, np.float16)
    np.testing.assert_array_equal(block, ref)
    block, bmask = mn.gather_padded(acts, offsets, np.zeros(0, np.int64), 8)
    assert block.shape == (0, 8, 12) and bmask.shape == (0, 8)


def test_gather_errors(backend, make_ragged):
    acts, offsets = make_ragged([4, 60], 12)
    with pytest.raises(ValueError, match="row 1 has 60 tokens > padded_len 32; truncate"):
        mn.gather_padded(acts, offsets, [0, 1], 32)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, N\) = \[0, 2\), got row 2"):
        mn.gather_padded(acts, offsets, [2], 64)
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        mn.gather_padded(acts, offsets, [0], 64, out_dtype=np.int8)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (np.float32, np.float32),
        (np.float16, np.float16),
        (ml_dtypes.bfloat16, np.float32),
        (np.float32, np.float16),
    ],
)
def test_scatter_round_trip(backend, make_ragged, rng, src, dst):
    acts, offsets = make_ragged([5, 11, 0, 30, 2], 9, src)
    out = np.full(acts.shape, 7, dst)
    covered = np.zeros(acts.shape[0], bool)
    for batch in mn.plan_batches(np.diff(offsets)[:4], token_budget=64):
        block, _ = mn.gather_padded(acts, offsets, batch.rows, batch.padded_len)
        mn.scatter_padded(block, offsets, batch.rows, out)
        for r in batch.rows:
            covered[offsets[r] : offsets[r + 1]] = True
    np.testing.assert_array_equal(out[covered], acts[covered].astype(dst))
    assert np.all(out[~covered] == 7)  # row 4 was not in any batch: untouched


def test_scatter_errors(backend, make_ragged):
    acts, offsets = make_ragged([4, 6], 16)
    block, _ = mn.gather_padded(acts, offsets, [0, 1], 8)
    out = np.zeros_like(acts)
    with pytest.raises(ValueError, match=r"block must be \[B, P, D\] = \[2, P, 16\]"):
        mn.scatter_padded(block[:, :, :8], offsets, [0, 1], out)
    with pytest.raises(ValueError, match="row 1 has 6 tokens > padded_len 4"):
        mn.scatter_padded(block[:, :4], offsets, [0, 1], out)
    with pytest.raises(ValueError, match=r"offsets\[-1\] == out.shape\[0\] == 10"):
        mn.scatter_padded(block, offsets[:-1], [0, 1], out)
    with pytest.raises(TypeError, match="out must be float32, float16 or bfloat16"):
        mn.scatter_padded(block, offsets, [0, 1], out.astype(np.float64))
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        mn.scatter_padded(block, offsets, [0, 1], out)
