"""Pooling on both backends against an independent per-row float64 computation.

Tolerances: max / min / last are exact (the float32 conversion of a 16-bit float is exact);
mean / sum / softmax accumulate in float32, so they get rtol 1e-5 plus an absolute term of
1e-6 * sum(|x|) over the row (cancellation makes sums near zero relatively inexact);
rolling_mean_max keeps its window sums in float64 on both backends: rtol 1e-6.
"""

import os
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

import mup.native as mn

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# Lengths with a 1-token row, rows shorter and longer than the window, and a long row.
LENGTHS = [1, 5, 9, 40, 3, 130, 17]
D = 19  # odd: exercises the scalar tail after the vectorised part of every D loop


def rowwise(acts, offsets, method, mask=None, scores=None, temperature=1.0, window=40):
    """Straightforward per-row float64 pooling, one row at a time."""
    x64 = np.asarray(acts, dtype=np.float64)
    out = []
    for i in range(offsets.shape[0] - 1):
        s, e = offsets[i], offsets[i + 1]
        keep = np.ones(e - s, bool) if mask is None else mask[s:e]
        x = x64[s:e][keep]
        if method == "mean":
            out.append(x.mean(0))
        elif method == "sum":
            out.append(x.sum(0))
        elif method == "max":
            out.append(x.max(0))
        elif method == "min":
            out.append(x.min(0))
        elif method == "last":
            out.append(x[-1])
        elif method == "softmax":
            z = scores[s:e][keep].astype(np.float64) / temperature
            w = np.exp(z - z.max())
            out.append((w[:, None] * x).sum(0) / w.sum())
        elif method == "rolling_mean_max":
            if len(x) <= window:
                out.append(x.mean(0))
            else:
                means = [x[j : j + window].mean(0) for j in range(len(x) - window + 1)]
                out.append(np.max(means, axis=0))
    return np.array(out)


def assert_pooled(got, acts, offsets, method, mask=None, **kw):
    ref = rowwise(acts, offsets, method, mask=mask, **kw)
    assert got.dtype == np.float32 and got.shape == ref.shape
    if method in ("max", "min", "last"):
        np.testing.assert_array_equal(got, ref.astype(np.float32))
    elif method == "rolling_mean_max":
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    else:
        keep = np.ones(acts.shape[0], bool) if mask is None else mask
        absx = np.abs(np.asarray(acts, np.float64)) * keep[:, None]
        row_abs = np.add.reduceat(absx, offsets[:-1], axis=0)  # [N, D] sum |x| per row
        if method != "sum":
            row_abs = row_abs / np.maximum(1, np.diff(offsets))[:, None]
        assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(ref) + 1e-6 * row_abs + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_every_method_matches_rowwise_reference(backend, make_ragged, rng, dtype, masked):
    acts, offsets = make_ragged(LENGTHS, D, dtype)
    t = acts.shape[0]
    mask = None
    if masked:
        mask = rng.random(t) < 0.6
        mask[offsets[:-1]] = True  # no all-masked row here
    scores = rng.standard_normal(t).astype(np.float32) * 2
    for method in mn.POOL_METHODS:
        kw = {"window": 4}
        if method == "softmax":
            kw.update(scores=scores, temperature=0.7)
        got = mn.pool(acts, offsets, method=method, mask=mask, **kw)
        assert_pooled(got, acts, offsets, method, mask=mask, **kw)


def test_pool_many_equals_pool(backend, make_ragged, rng):
    acts, offsets = make_ragged(LENGTHS, D, np.float16)
    scores = rng.standard_normal(acts.shape[0]).astype(np.float32)
    many = mn.pool_many(acts, offsets, methods=mn.POOL_METHODS, scores=scores, window=3)
    assert set(many) == set(mn.POOL_METHODS)
    for m in mn.POOL_METHODS:
        one = mn.pool(acts, offsets, method=m, scores=scores if m == "softmax" else None, window=3)
        np.testing.assert_array_equal(many[m], one)


def test_backends_agree_on_larger_input_with_threads(make_ragged, rng):
    # Big enough (T * D > 2^17 elements) for the native path to split rows across threads.
    if not mn.native_available():
        pytest.skip("mup._native is not built")
    acts, offsets = make_ragged(rng.integers(1, 300, size=60), 64, np.float16)
    mask = rng.random(acts.shape[0]) < 0.8
    mask[offsets[:-1]] = True
    scores = rng.standard_normal(acts.shape[0]).astype(np.float32)
    kw = dict(methods=mn.POOL_METHODS, mask=mask, scores=scores, window=16)
    with mn.use_backend("native"):
        one = mn.pool_many(acts, offsets, num_threads=1, **kw)
        two = mn.pool_many(acts, offsets, num_threads=2, **kw)
        many = mn.pool_many(acts, offsets, num_threads=7, **kw)
    with mn.use_backend("numpy"):
        ref = mn.pool_many(acts, offsets, **kw)
    for m in mn.POOL_METHODS:
        # Each row is reduced by one thread in a fixed order: thread count changes nothing.
        np.testing.assert_array_equal(one[m], two[m])
        np.testing.assert_array_equal(one[m], many[m])
        np.testing.assert_allclose(one[m], ref[m], rtol=1e-5, atol=1e-4)


def test_python_threads_share_the_kernels(backend, make_ragged):
    # The native kernels release the GIL; concurrent callers must each get their own result.
    acts, offsets = make_ragged([50] * 20, 32, np.float32)
    expected = mn.pool(acts, offsets, method="mean")
    results = [None] * 4

    def work(k):
        results[k] = mn.pool(acts * (k + 1), offsets, method="mean")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in range(4):
        np.testing.assert_allclose(results[k], expected * (k + 1), rtol=1e-6, atol=1e-6)


def test_empty_row_is_named(backend, make_ragged):
    acts, offsets = make_ragged([3, 0, 2], 4)
    for method in mn.POOL_METHODS:
        scores = np.zeros(acts.shape[0], np.float32) if method == "softmax" else None
        with pytest.raises(ValueError, match=r"row 1 is empty \(offsets\[1\] == offsets\[2\]"):
            mn.pool(acts, offsets, method=method, scores=scores)


def test_all_masked_row_is_named(backend, make_ragged):
    acts, offsets = make_ragged([3, 4, 2], 4)
    mask = np.ones(9, bool)
    mask[7:9] = False
    with pytest.raises(ValueError, match=r"row 2 has no masked tokens \(2 tokens"):
        mn.pool(acts, offsets, method="mean", mask=mask)


def test_window_larger_than_sequence_is_the_full_mean(backend, make_ragged):
    acts, offsets = make_ragged([5, 12], 6)
    got = mn.pool(acts, offsets, method="rolling_mean_max", window=100)
    ref = mn.pool(acts, offsets, method="mean")
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_window_one_is_the_max(backend, make_ragged, rng):
    acts, offsets = make_ragged([5, 12, 1], 6, np.float16)
    mask = rng.random(18) < 0.7
    mask[offsets[:-1]] = True
    got = mn.pool(acts, offsets, method="rolling_mean_max", window=1, mask=mask)
    np.testing.assert_array_equal(got, mn.pool(acts, offsets, method="max", mask=mask))


def test_rolling_window_skips_masked_tokens(backend):
    # Windows are over consecutive *masked* tokens: the masked-out spike never enters.
    acts = np.array([[1.0], [100.0], [3.0], [5.0]], np.float32)
    got = mn.pool(
        acts,
        np.array([0, 4]),
        method="rolling_mean_max",
        window=2,
        mask=np.array([True, False, True, True]),
    )
    np.testing.assert_array_equal(got, [[4.0]])  # windows (1, 3) -> 2, (3, 5) -> 4


def test_non_contiguous_inputs(backend, make_ragged, rng):
    base, offsets = make_ragged([7, 30, 2], 40, np.float16)
    mask_full = rng.random(2 * base.shape[0]) < 0.7
    mask_full[::2][offsets[:-1]] = True
    mask = mask_full[::2]  # strided bool mask
    scores = rng.standard_normal(2 * base.shape[0]).astype(np.float32)[::2]
    for view in (base[:, 3:23], base[:, ::2], np.asfortranarray(base)):
        assert not view.flags.c_contiguous
        for method in mn.POOL_METHODS:
            kw = dict(method=method, mask=mask, window=5)
            if method == "softmax":
                kw["scores"] = scores
            got = mn.pool(view, offsets, **kw)
            np.testing.assert_array_equal(got, mn.pool(np.ascontiguousarray(view), offsets, **kw))


def test_uint16_bits_with_acts_dtype(backend, make_ragged):
    acts, offsets = make_ragged([4, 9], 8, ml_dtypes.bfloat16)
    bits = acts.view(np.uint16)
    got = mn.pool(bits, offsets, method="mean", acts_dtype="bfloat16")
    np.testing.assert_array_equal(got, mn.pool(acts, offsets, method="mean"))
    half = acts.astype(np.float16)
    got = mn.pool(half.view(np.uint16), offsets, method="max", acts_dtype="float16")
    np.testing.assert_array_equal(got, mn.pool(half, offsets, method="max"))


def test_float16_specials_convert_exactly(backend):
    # Subnormals, signed zeros, the largest half and infinities all survive the conversion.
    vals = np.array(
        [0.0, -0.0, 6e-8, -3e-5, 6.1e-5, 65504.0, -65504.0, np.inf, -np.inf, 1.5], np.float16
    )
    acts = vals.reshape(-1, 1)
    got = mn.pool(acts, np.arange(vals.shape[0] + 1), method="last")
    np.testing.assert_array_equal(got[:, 0], vals.astype(np.float32))
    assert np.signbit(got[1, 0])


def test_nan_in_acts_propagates(backend):
    acts = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 1.0]], np.float32)
    offsets = np.array([0, 3])
    for method in ("mean", "sum", "max", "min", "rolling_mean_max"):
        got = mn.pool(acts, offsets, method=method, window=2)
        assert np.isnan(got[0, 0]) and not np.isnan(got[0, 1]), method


def test_no_records(backend):
    acts = np.zeros((0, 8), np.float16)
    for method in ("mean", "last", "rolling_mean_max"):
        got = mn.pool(acts, np.zeros(1, np.int64), method=method)
        assert got.shape == (0, 8) and got.dtype == np.float32


def test_wrong_dtypes_raise_type_error(backend, make_ragged):
    acts, offsets = make_ragged([3, 2], 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mn.pool(acts.astype(np.float64), offsets, method="mean")
    with pytest.raises(TypeError, match="acts_dtype='bfloat16'"):
        mn.pool(acts.view(np.uint16), offsets, method="mean")
    with pytest.raises(TypeError, match=r"offsets must be int64 \[N\+1\]"):
        mn.pool(acts, offsets.astype(np.float32), method="mean")
    with pytest.raises(TypeError, match=r"mask must be bool \[T\] = \[5\]"):
        mn.pool(acts, offsets, method="mean", mask=np.ones(5, np.int32))
    with pytest.raises(TypeError, match=r"scores must be float32 \[T\] = \[5\]"):
        mn.pool(acts, offsets, method="softmax", scores=np.ones(5, np.int32))


def test_wrong_shapes_name_the_expected_shape(backend, make_ragged):
    acts, offsets = make_ragged([600, 400], 4)
    with pytest.raises(ValueError, match=r"offsets\[-1\] == acts.shape\[0\] == 1000, got"):
        mn.pool(acts, offsets[:-1], method="mean")
    with pytest.raises(ValueError, match=r"offsets must be int64 \[N\+1\].*got shape \(\)"):
        mn.pool(acts, np.int64(0), method="mean")
    with pytest.raises(ValueError, match=r"non-decreasing; got offsets\[1\] == 700"):
        mn.pool(acts, np.array([0, 700, 500, 1000]), method="mean")
    with pytest.raises(ValueError, match=r"acts must be 2-D \[T, D\].*got shape \(1000,\)"):
        mn.pool(acts[:, 0], offsets, method="mean")
    with pytest.raises(ValueError, match=r"mask must be bool \[T\] = \[1000\].*got shape \(999,\)"):
        mn.pool(acts, offsets, method="mean", mask=np.ones(999, bool))
    with pytest.raises(ValueError, match=r"scores must be float32 \[T\] = \[1000\]"):
        mn.pool(acts, offsets, method="softmax", scores=np.ones(10, np.float32))


def test_bad_options_are_rejected(backend, make_ragged):
    acts, offsets = make_ragged([3, 2], 4)
    scores = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="unknown method 'median'"):
        mn.pool(acts, offsets, method="median")
    with pytest.raises(ValueError, match="needs scores"):
        mn.pool(acts, offsets, method="softmax")
    with pytest.raises(ValueError, match="only used by method 'softmax'"):
        mn.pool(acts, offsets, method="mean", scores=scores)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        mn.pool(acts, offsets, method="softmax", scores=scores, temperature=0.0)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        mn.pool(acts, offsets, method="rolling_mean_max", window=0)
    with pytest.raises(ValueError, match=r"scores\[3\] == nan is not finite"):
        mn.pool(acts, offsets, method="softmax", scores=np.array([0, 0, 0, np.nan, 0], np.float32))
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        mn.pool(acts, offsets, method="mean", num_threads=0)


def test_masked_out_scores_may_be_infinite(backend, make_ragged):
    # A caller may mark ignored tokens with -inf scores; only selected tokens must be finite.
    acts, offsets = make_ragged([3, 2], 4)
    mask = np.array([True, False, True, True, True])
    scores = np.array([0.5, -np.inf, 1.0, 0.0, 2.0], np.float32)
    got = mn.pool(acts, offsets, method="softmax", scores=scores, mask=mask)
    assert np.isfinite(got).all()
    assert_pooled(got, acts, offsets, "softmax", mask=mask, scores=scores)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_every_16_bit_pattern_converts_like_numpy(backend, dtype):
    # All 65536 bit patterns (subnormals, infinities, NaN payloads), 8 per token so that the
    # vectorised conversion path is the one exercised.
    acts = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype).reshape(-1, 8)
    got = mn.pool(acts, np.arange(acts.shape[0] + 1), method="last")
    np.testing.assert_array_equal(got.view(np.uint32), acts.astype(np.float32).view(np.uint32))


def test_baseline_sse2_path_matches_numpy(tmp_path):
    # The AVX2 loop is chosen once per process; check the baseline loop in a fresh one.
    if not mn.native_available():
        pytest.skip("mup._native is not built")
    code = """
import ml_dtypes, numpy as np, mup.native as mn
rng = np.random.default_rng(0)
off = np.array([0, 3, 40, 41, 97])
for dt in (np.float32, np.float16, ml_dtypes.bfloat16):
    a = (rng.standard_normal((97, 37)) * 3).astype(dt)
    mask = rng.random(97) < 0.7
    mask[off[:-1]] = True
    kw = dict(methods=mn.POOL_METHODS, mask=mask, scores=rng.standard_normal(97).astype("f4"),
              window=5)
    with mn.use_backend("native"):
        got = mn.pool_many(a, off, **kw)
    with mn.use_backend("numpy"):
        ref = mn.pool_many(a, off, **kw)
    for m in mn.POOL_METHODS:
        np.testing.assert_allclose(got[m], ref[m], rtol=1e-5, atol=1e-5, err_msg=m)
bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(-1, 8)
last = mn.pool(bits, np.arange(bits.shape[0] + 1), method="last", acts_dtype="float16")
want = bits.view(np.float16).astype(np.float32)
np.testing.assert_array_equal(last.view(np.uint32), want.view(np.uint32))
print("ok")
"""
    env = dict(os.environ, MUP_NATIVE_NO_AVX2="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
