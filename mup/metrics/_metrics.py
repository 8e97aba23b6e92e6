"""Binary-classification metrics for probe scores: AUROC, ROC curve, TPR at a fixed FPR,
accuracy, expected calibration error and Brier score.

Axis letters: N records. Scores are float arrays [N]; labels are int arrays [N] with 1 = high
stakes (positive), 0 = low stakes, and -1 = ambiguous / unlabelled (only `evaluate` accepts -1
and excludes those records, reporting how many).

Everything is plain numpy in float64 so the numbers match scikit-learn's to rounding; the jitted
training loop has its own in-graph AUROC (`mup.probes`) for early stopping.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "auroc",
    "brier",
    "ece",
    "evaluate",
    "roc_curve",
    "tpr_at_fpr",
]


def _check(scores, labels, *, allow_unlabelled: bool = False, name: str = "scores"):
    """Validate and convert to (float64 [N], int64 [N]); clear errors for bad input."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"shape mismatch: {name} has {s.shape[0]} entries but labels has {y.shape[0]}"
        )
    if s.shape[0] == 0:
        raise ValueError(f"{name} and labels are empty; need at least one record of each class")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite values (first at index "
            f"{int(np.argmax(bad))})"
        )
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isin(y, (-1.0, 0.0, 1.0))):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"labels must be integers in {{0, 1}} (or -1), got dtype {y.dtype}")
    y = y.astype(np.int64)
    allowed = (-1, 0, 1) if allow_unlabelled else (0, 1)
    bad = ~np.isin(y, allowed)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"labels must be in {set(allowed)}; labels[{i}] = {int(y[i])}"
            + ("" if allow_unlabelled else " (use evaluate() to exclude -1 = unlabelled)")
        )
    return s, y


def _check_two_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        only = "positive (1)" if n_neg == 0 else "negative (0)"
        raise ValueError(
            f"{what} is undefined for single-class labels: all {n_pos + n_neg} labelled records "
            f"are {only}; need both high-stakes (1) and low-stakes (0) records"
        )
    return n_pos, n_neg


def _check_probabilities(p: np.ndarray, what: str) -> None:
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{what} needs probabilities in [0, 1]; got scores in [{p.min():.4g}, {p.max():.4g}] "
            "(apply a sigmoid to logits first)"
        )


def auroc(scores, labels) -> float:
    """Area under the ROC curve, ties counted as half (the Mann-Whitney U statistic).

    Equal to `sklearn.metrics.roc_auc_score` including tied scores: with average ranks over
    tied groups, AUROC = (sum of positive ranks - P(P+1)/2) / (P * Q).
    """
    s, y = _check(scores, labels)
    n_pos, n_neg = _check_two_classes(y, "AUROC")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Each tie group [lo, hi) in sorted order gets rank (lo + 1 + hi) / 2.
    lo = np.searchsorted(sorted_s, sorted_s, side="left")
    hi = np.searchsorted(sorted_s, sorted_s, side="right")
    ranks = np.empty_like(s)
    ranks[order] = (lo + 1 + hi) / 2.0
    return ranks


def roc_curve(scores, labels, *, drop_intermediate: bool = True):
    """ROC curve as (fpr, tpr, thresholds), the same points as `sklearn.metrics.roc_curve`.

    One point per distinct score (descending), preceded by (0, 0) at threshold +inf. With
    `drop_intermediate`, collinear points that do not change the curve's shape are dropped.
    """
    s, y = _check(scores, labels)
    n_pos, n_neg = _check_two_classes(y, "the ROC curve")
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    y_desc = y[order]
    # Last index of each distinct score: cumulative counts there are the curve's vertices.
    ends = np.r_[np.nonzero(np.diff(s_desc))[0], s_desc.size - 1]
    tps = np.cumsum(y_desc)[ends].astype(np.float64)
    fps = (ends + 1) - tps
    thresholds = s_desc[ends]
    if drop_intermediate and tps.size > 2:
        # A vertex is kept if the slope changes there (second difference non-zero).
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / n_neg, tps / n_pos, thresholds


def tpr_at_fpr(scores, labels, fpr: float = 0.01) -> float:
    """True-positive rate at a false-positive rate, linearly interpolated on the ROC curve.

    Where the curve is vertical at exactly `fpr` (a tie group of positives), the highest TPR
    reached at that FPR is returned.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc_curve(scores, labels, drop_intermediate=False)
    i = int(np.searchsorted(f, fpr, side="right")) - 1  # last vertex with f <= fpr
    if f[i] == fpr or i == f.size - 1:
        return float(t[i])
    w = (fpr - f[i]) / (f[i + 1] - f[i])
    return float(t[i] + w * (t[i + 1] - t[i]))


def accuracy(probs, labels, *, threshold: float = 0.5) -> float:
    """Fraction of records where (prob >= threshold) equals the label."""
    p, y = _check(probs, labels, name="probs")
    _check_probabilities(p, "accuracy")
    return float(np.mean((p >= threshold).astype(np.int64) == y))


def ece(probs, labels, *, n_bins: int = 10) -> float:
    """Expected calibration error with `n_bins` equal-width bins on [0, 1].

    ECE = sum over bins of (bin size / N) * |mean label - mean prob|; 1.0 falls in the last bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _check(probs, labels, name="probs")
    _check_probabilities(p, "ECE")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)  # [N]
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y.astype(np.float64), minlength=n_bins)
    # |sum_y - sum_p| / N == (count / N) * |mean_y - mean_p|, and is 0 for empty bins.
    return float(np.abs(sum_y - sum_p).sum() / p.size)


def brier(probs, labels) -> float:
    """Mean squared error between probabilities and {0, 1} labels."""
    p, y = _check(probs, labels, name="probs")
    _check_probabilities(p, "the Brier score")
    return float(np.mean((p - y) ** 2))


def evaluate(probs, labels, *, fpr: float = 0.01, n_bins: int = 10) -> dict:
    """All metrics in one dict, excluding records labelled -1 (counted in `n_excluded`).

    `probs` are probabilities in [0, 1] (a probe's `predict`). Keys: auroc, tpr_at_fpr, fpr,
    accuracy, ece, brier, n, n_pos, n_neg, n_excluded.
    """
    p, y = _check(probs, labels, allow_unlabelled=True, name="probs")
    keep = y != -1
    n_excluded = int((~keep).sum())
    p, y = p[keep], y[keep]
    if p.size == 0:
        raise ValueError(f"every one of the {n_excluded} records is unlabelled (-1)")
    n_pos, n_neg = _check_two_classes(y, "evaluate")
    return {
        "auroc": auroc(p, y),
        "tpr_at_fpr": tpr_at_fpr(p, y, fpr),
        "fpr": float(fpr),
        "accuracy": accuracy(p, y),
        "ece": ece(p, y, n_bins=n_bins),
        "brier": brier(p, y),
        "n": int(p.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_excluded": n_excluded,
    }
