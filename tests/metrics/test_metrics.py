"""mup.metrics against scikit-learn and hand-computed values."""

import numpy as np
import pytest

from mup import metrics

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the metrics reference")


def _cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    yield "continuous", rng.normal(size=300) + y, y
    # Heavy ties: scores on a coarse grid, including ties across classes.
    yield "ties", np.round(rng.normal(size=300) + 0.7 * y, 1), y
    yield "all_tied", np.full(50, 0.3), rng.integers(0, 2, 50)
    yield "perfect", np.r_[np.zeros(10), np.ones(5)], np.r_[np.zeros(10), np.ones(5)].astype(int)


@pytest.mark.parametrize("name,s,y", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_auroc_and_roc_curve_match_sklearn(name, s, y):
    assert metrics.auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    for drop in (True, False):
        f, t, th = metrics.roc_curve(s, y, drop_intermediate=drop)
        f2, t2, th2 = sk.roc_curve(y, s, drop_intermediate=drop)
        np.testing.assert_allclose(f, f2, atol=1e-12)
        np.testing.assert_allclose(t, t2, atol=1e-12)
        np.testing.assert_array_equal(th[1:], th2[1:])
        assert np.isinf(th[0])


def test_tpr_at_fpr_interpolates():
    # 4 negatives, 4 positives; descending order: p n p p n n p n.
    s = np.array([8, 7, 6, 5, 4, 3, 2, 1], float)
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    # Vertices (fpr, tpr): (0,0) (0,.25) (.25,.25) (.25,.5) (.25,.75) (.5,.75) (.75,.75)
    # (.75,1) (1,1).
    assert metrics.tpr_at_fpr(s, y, 0.0) == pytest.approx(0.25)
    assert metrics.tpr_at_fpr(s, y, 0.25) == pytest.approx(0.75)  # top of the vertical segment
    assert metrics.tpr_at_fpr(s, y, 0.125) == pytest.approx(0.25)  # flat segment
    assert metrics.tpr_at_fpr(s, y, 0.875) == pytest.approx(1.0)
    # A sloped segment from a tie across classes: (0, 0) -> (1, 1) when every score ties.
    assert metrics.tpr_at_fpr(np.zeros(4), np.array([0, 1, 0, 1]), 0.3) == pytest.approx(0.3)


def test_tpr_at_fpr_matches_numpy_interp_without_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + 1.5 * y
    f, t, _ = sk.roc_curve(y, s, drop_intermediate=False)
    for target in (0.01, 0.05, 0.2):
        # Without ties every vertical segment is a single step; the upper point is the answer
        # exactly at a vertex, and interp elsewhere.
        expected = np.interp(target, f[::-1][::-1], t) if target not in f else t[f == target].max()
        assert metrics.tpr_at_fpr(s, y, target) == pytest.approx(expected, abs=1e-12)


def test_probability_metrics():
    p = np.array([0.05, 0.15, 0.55, 0.95, 1.0, 0.45])
    y = np.array([0, 0, 1, 1, 1, 1])
    assert metrics.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p >= 0.5))
    assert metrics.brier(p, y) == pytest.approx(sk.brier_score_loss(y, p))
    # Hand ECE with 10 bins: bins 0,1,5,9(0.95 and 1.0),4 each; per-bin |mean y - mean p|.
    expected = abs(0 - 0.05) + abs(0 - 0.15) + abs(1 - 0.55) + 2 * abs(1 - 0.975) + abs(1 - 0.45)
    assert metrics.ece(p, y, n_bins=10) == pytest.approx(expected / 6)
    assert metrics.ece(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_evaluate_excludes_unlabelled():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = 1 / (1 + np.exp(-(rng.normal(size=200) + y)))
    y_amb = y.copy()
    y_amb[:17] = -1
    out = metrics.evaluate(p, y_amb)
    assert out["n_excluded"] == 17 and out["n"] == 183
    assert out["n_pos"] + out["n_neg"] == 183
    assert out["auroc"] == pytest.approx(sk.roc_auc_score(y[17:], p[17:]))
    assert out["brier"] == pytest.approx(sk.brier_score_loss(y[17:], p[17:]))
    assert set(out) >= {"auroc", "tpr_at_fpr", "accuracy", "ece", "brier"}


def test_errors_are_clear():
    with pytest.raises(ValueError, match="single-class"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="single-class"):
        metrics.evaluate([0.1, 0.2, 0.3], [0, 0, -1])
    with pytest.raises(ValueError, match="shape mismatch.*3.*2"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match=r"labels\[1\] = 2"):
        metrics.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="-1"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1, -1])
    with pytest.raises(ValueError, match="probabilities"):
        metrics.brier([0.1, 2.0], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        metrics.auroc(np.zeros((2, 2)), [0, 1])
