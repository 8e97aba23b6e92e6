"""How well two labellings of the same records agree: Cohen's kappa on the labels, Spearman's
rank correlation on the scale labels, and the confusion matrix (numpy only).

Records are joined on their ids. Labels are mup.data's classes (high-stakes, low-stakes,
ambiguous); kappa is reported over all three and over the records both call high or low (the
binary task the probes learn).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mup.data import AMBIGUOUS, HIGH_STAKES, LOW_STAKES, Dataset

# Rows and columns of the confusion matrix, in this order.
CLASSES = (HIGH_STAKES, LOW_STAKES, AMBIGUOUS)
CLASS_NAMES = ("high-stakes", "low-stakes", "ambiguous")


def confusion_matrix(a: np.ndarray, b: np.ndarray, classes=CLASSES) -> np.ndarray:
    """int64 [C, C]: entry (i, j) counts records that `a` puts in classes[i] and `b` in
    classes[j] (values outside `classes` are not counted)."""
    a, b = np.asarray(a), np.asarray(b)
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(classes), len(classes)), np.int64)
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        if x in index and y in index:
            out[index[x], index[y]] += 1
    return out


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two labellings [N]: (p_observed - p_chance) / (1 - p_chance). NaN when
    chance agreement is already perfect (both labellings use one and the same class), where
    kappa is undefined."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two label arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return float("nan")
    classes = np.union1d(a, b)
    cm = confusion_matrix(a, b, classes.tolist()).astype(np.float64)
    n = cm.sum()
    observed = np.trace(cm) / n
    chance = float(cm.sum(1) @ cm.sum(0)) / n**2
    if chance == 1.0:
        return float("nan")
    return float((observed - chance) / (1.0 - chance))


def rankdata(x: np.ndarray) -> np.ndarray:
    """float64 [N]: 1-based ranks, ties given their average rank (as scipy's default)."""
    x = np.asarray(x, np.float64)
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    del values
    ends = np.cumsum(counts)  # rank of each distinct value's last copy
    average = ends - (counts - 1) / 2.0
    return average[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation [N] x [N]: Pearson's r of the average ranks. NaN when either
    side is constant (no ranking to correlate)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two arrays of one shape, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2.0, rankdata(y) - (len(y) + 1) / 2.0
    denominator = np.sqrt((rx @ rx) * (ry @ ry))
    if denominator == 0:
        return float("nan")
    return float(np.clip((rx @ ry) / denominator, -1.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The agreement of labelling a with labelling b on the records both have."""

    n_a: int
    n_b: int
    n_joined: int  # ids in both
    n_labels: int  # joined records labelled in both
    kappa: float  # over high / low / ambiguous
    n_binary: int  # joined records both call high or low
    kappa_binary: float
    n_scale: int  # joined records with scale labels in both
    spearman: float
    confusion: np.ndarray  # [3, 3], rows a, columns b, in CLASSES order

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["confusion"] = {
            "classes": list(CLASS_NAMES),
            "rows_a_columns_b": self.confusion.tolist(),
        }
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}

    def lines(self) -> list[str]:
        def number(v: float) -> str:
            return "undefined" if np.isnan(v) else f"{v:.3f}"

        out = [
            f"joined on id: {self.n_joined} records (a has {self.n_a}, b has {self.n_b})",
            f"Cohen's kappa, labels (3 classes):     {number(self.kappa)}  "
            f"({self.n_labels} records)",
            f"Cohen's kappa, high vs low only:       {number(self.kappa_binary)}  "
            f"({self.n_binary} records)",
            f"Spearman, scale labels:                {number(self.spearman)}  "
            f"({self.n_scale} records)",
            "confusion (rows a, columns b):",
            f"  {'':<12}" + "".join(f"{name:>12}" for name in CLASS_NAMES),
        ]
        for name, row in zip(CLASS_NAMES, self.confusion, strict=True):
            out.append(f"  {name:<12}" + "".join(f"{int(v):>12}" for v in row))
        return out


def agreement(a: Dataset, b: Dataset) -> Agreement:
    """Join `a` and `b` on ids and compare their labels and scale labels."""
    return pooled_agreement([(a, b)])


def pooled_agreement(pairs: list[tuple[Dataset, Dataset]]) -> Agreement:
    """The agreement over several (a, b) pairs at once, each joined on ids within the pair (ids
    need only be unique within a file, as the dev sets' are)."""
    labels: list[tuple[int, int]] = []
    scales: list[tuple[float, float]] = []
    n_a = n_b = n_joined = 0
    for a, b in pairs:
        by_id = {r.id: r for r in b}
        joined = [(x, by_id[x.id]) for x in a if x.id in by_id]
        n_a, n_b, n_joined = n_a + len(a), n_b + len(b), n_joined + len(joined)
        labels += [(x.label, y.label) for x, y in joined if None not in (x.label, y.label)]
        scales += [
            (x.scale_label, y.scale_label)
            for x, y in joined
            if None not in (x.scale_label, y.scale_label)
        ]
    la = np.array([x for x, _ in labels], np.int64)
    lb = np.array([y for _, y in labels], np.int64)
    binary = (la != AMBIGUOUS) & (lb != AMBIGUOUS)
    sa = np.array([x for x, _ in scales], np.float64)
    sb = np.array([y for _, y in scales], np.float64)
    return Agreement(
        n_a=n_a,
        n_b=n_b,
        n_joined=n_joined,
        n_labels=len(labels),
        kappa=cohen_kappa(la, lb),
        n_binary=int(binary.sum()),
        kappa_binary=cohen_kappa(la[binary], lb[binary]),
        n_scale=len(scales),
        spearman=spearman(sa, sb),
        confusion=confusion_matrix(la, lb),
    )
