"""The monitoring cascade: a cheap first monitor scores every record and a fraction of them is
escalated to a second, costlier one ("Models Under Pressure", Figure 1: a probe in front of an
LLM monitor buys most of the LLM's AUROC for a fraction of its FLOPs).

Axis letters: N records of one data set.

Within each data set and for each fraction f, the records are ranked by the first monitor's
score and k = floor(f * N) of them are escalated (`CascadeStrategy`):

  selection  top      the k highest first-scores (the likeliest high-stakes)
             bottom   the k lowest
             mid      the k around the median rank: those the first monitor is least sure of
  merge      second   an escalated record takes the second's score
             mean     (first + second) / 2
             max      max(first, second)
  remaining  first    the others keep the first's score
             fixed_x  the others get score x

Every record costs the first monitor's FLOPs, and an escalated one the second's on top (the
first must run on everything to decide what to escalate, also under ``fixed_x``). Unlabelled
records (label -1) are ranked, escalated and paid for like any other, since a deployed
monitor cannot tell them apart, and are left out of AUROC and TPR only.

The "first" may be any monitor, so a two-step LLM cascade (small LLM -> large LLM) is the same
call. Results per data set and their mean over data sets (Figure 1 averages AUROC over the
evaluation sets) are rows of a ``cascade.jsonl`` (`write_cascade`, `read_cascade`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from mup import metrics
from mup.monitors._scores import (
    ScoreFileError,
    Scores,
    score_row,
    validated_lines,
    write_scores,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "CascadeFileError",
    "CascadeStrategy",
    "cascade_curve",
    "cascade_name",
    "cascade_scores",
    "check_two_classes",
    "read_cascade",
    "write_cascade",
]

# Log-ish, since the interesting part of the trade-off is a few percent escalated (the LLM
# costs orders of magnitude more than the probe), plus 0 (the first monitor alone).
DEFAULT_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)

# Figure 1's operating point; the key name in cascade.jsonl says it, so it is not a parameter.
_FPR = 0.01

Selection = Literal["top", "bottom", "mid"]
Merge = Literal["second", "mean", "max"]
SELECTIONS: tuple[str, ...] = ("top", "bottom", "mid")
MERGES: tuple[str, ...] = ("second", "mean", "max")


class CascadeFileError(ValueError):
    """A cascade.jsonl is malformed; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CascadeStrategy:
    """Which records to escalate, how to merge the two scores, what the others get.

    The defaults are the paper's final choice (its cascade code evaluates mid / mean / first).
    """

    selection: Selection = "mid"
    merge: Merge = "mean"
    # "first", or "fixed_<x>" with x a probability in [0, 1] (e.g. fixed_0).
    remaining: str = "first"

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        _ = self.fixed  # validates `remaining` now rather than mid-computation

    @property
    def fixed(self) -> float | None:
        """The score of non-escalated records under ``fixed_<x>``; None under ``first``."""
        if self.remaining == "first":
            return None
        prefix, _, value = self.remaining.partition("_")
        try:
            x = float(value) if prefix == "fixed" else math.nan
        except ValueError:
            x = math.nan
        if not 0.0 <= x <= 1.0:  # also refuses nan
            raise ValueError(
                f"remaining must be 'first' or 'fixed_<x>' with x in [0, 1] (e.g. fixed_0), got "
                f"{self.remaining!r}"
            )
        return x

    def describe(self) -> str:
        return f"{self.selection}/{self.merge}/{self.remaining}"


def cascade_name(first: str, second: str, strategy: CascadeStrategy) -> str:
    """How a cascade is named in cascade.jsonl and in plots."""
    return f"{first} -> {second} [{strategy.describe()}]"


def _n_escalated(n: int, fraction: float) -> int:
    """k = floor(fraction * n) (the paper's rounding), robust to binary fractions:
    0.29 * 100 is 28.999999999999996 in floating point and must escalate 29."""
    return min(n, int(math.floor(fraction * n + 1e-9)))


def _escalated(first: np.ndarray, k: int, selection: str) -> np.ndarray:
    """Boolean mask [N] of the k records to escalate, chosen by the first monitor's scores.

    A stable sort, so tied scores are broken by record order and results are reproducible.
    ``mid`` takes ranks [N//2 - k//2, N//2 - k//2 + k), the paper's definition: the middle
    of the ranking, not the scores nearest 0.5. The two differ for a miscalibrated first
    monitor (e.g. a probe whose scores sit mostly below 0.5 on an imbalanced set), and the
    rank version escalates exactly k records and does not depend on the first's calibration.
    """
    n = first.shape[0]
    order = np.argsort(first, kind="stable")  # [N] ascending
    if selection == "top":
        picked = order[n - k :]
    elif selection == "bottom":
        picked = order[:k]
    else:  # mid: 0 <= start and start + k <= N for every 0 <= k <= N
        start = n // 2 - k // 2
        picked = order[start : start + k]
    mask = np.zeros(n, bool)
    mask[picked] = True
    return mask


def _merged(s1: np.ndarray, s2: np.ndarray, esc: np.ndarray, strategy: CascadeStrategy):
    """Cascade scores [N]. Both inputs are probabilities in [0, 1], so mean and max are on one
    scale; they are not rank-invariant though: unlike either monitor's own AUROC, the cascade's
    changes under a monotone rescaling of either monitor (a second monitor whose scores crowd
    near 0.5 is mostly outvoted by the first under ``mean`` and mostly ignored under ``max``).
    The same holds between the escalated and the remaining records, which are ranked against
    each other: with ``top`` / ``second``, an escalated record the second scores 0.3 falls below
    a non-escalated one the first scored 0.6."""
    if strategy.merge == "second":
        merged = s2
    elif strategy.merge == "mean":
        merged = (s1 + s2) / 2.0
    else:
        merged = np.maximum(s1, s2)
    fixed = strategy.fixed
    rest = s1 if fixed is None else np.full_like(s1, fixed)
    return np.where(esc, merged, rest)


def check_two_classes(scores: Scores, what: str) -> None:
    """Refuse (naming the data set and the files) a data set whose labelled records are all of
    one class, on which AUROC is undefined; called before any work is done."""
    for dataset in scores.datasets:
        labels = scores.select(dataset=dataset).labels
        n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
        if n_pos == 0 or n_neg == 0:
            raise ScoreFileError(
                f"{what}: data set {dataset!r} has {n_pos} high-stakes and {n_neg} low-stakes "
                f"labelled records in {scores.source}; AUROC needs both"
            )


@dataclasses.dataclass(frozen=True)
class _Part:
    """One data set of an aligned pair, as arrays [N]."""

    dataset: str
    rows: tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...]
    labels: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    f1: np.ndarray
    f2: np.ndarray


def _aligned_parts(first: Scores, second: Scores) -> tuple[str, str, list[_Part]]:
    """Validate a (first, second) pair and split it per data set, before any work."""
    m1, m2 = first.monitor, second.monitor  # each an error when a file mixes monitors
    a, b = first.aligned_with(second)  # an error on no shared record or a label mismatch
    check_two_classes(a, f"cascade {m1!r} -> {m2!r}")
    parts = []
    for dataset in a.datasets:
        pa, pb = a.select(dataset=dataset), b.select(dataset=dataset)
        parts.append(
            _Part(
                dataset,
                tuple(zip(pa.rows, pb.rows, strict=True)),
                pa.labels,
                pa.scores,
                pb.scores,
                pa.flops,
                pb.flops,
            )
        )
    return m1, m2, parts


def cascade_scores(
    first: Scores, second: Scores, fraction: float, strategy: CascadeStrategy | None = None
) -> Scores:
    """The cascade at one `fraction` as a score file of its own (monitor
    ``cascade:<first> -> <second> [...]@<fraction>``), one row per shared record, with
    ``escalated`` (bool), ``first_score`` and ``second_score`` kept as extra fields.

    A cascade's score file can be the `first` of another cascade (a three-step cascade)."""
    strategy = strategy or CascadeStrategy()
    _check_fractions([fraction])
    m1, m2, parts = _aligned_parts(first, second)
    monitor = f"cascade:{cascade_name(m1, m2, strategy)}@{fraction:g}"
    rows = []
    for part in parts:
        esc = _escalated(part.s1, _n_escalated(len(part.labels), fraction), strategy.selection)
        score = _merged(part.s1, part.s2, esc, strategy)
        flops = part.f1 + np.where(esc, part.f2, 0.0)
        for (r1, r2), s, f, e in zip(part.rows, score, flops, esc, strict=True):
            rows.append(
                score_row(
                    id=r1["id"],
                    dataset=r1["dataset"],
                    label=r1["label"],
                    score=float(s),
                    monitor=monitor,
                    flops=float(f),
                    n_tokens=int(r1["n_tokens"]) + (int(r2["n_tokens"]) if e else 0),
                    escalated=bool(e),
                    first_score=float(r1["score"]),
                    second_score=float(r2["score"]),
                )
            )
    return Scores(tuple(rows), f"cascade of {first.source} and {second.source}")


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) == 0:
        raise ValueError("need at least one fraction")
    bad = []
    for f in fractions:
        try:
            ok = 0.0 <= float(f) <= 1.0  # nan fails too
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f)
    if bad:
        raise ValueError(f"fractions must be numbers in [0, 1], got {bad}")


def cascade_curve(
    first: Scores,
    second: Scores,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strategy: CascadeStrategy | None = None,
) -> list[dict[str, Any]]:
    """AUROC, TPR at 1% FPR and mean FLOPs per record of the cascade at each fraction: one row
    per (data set, fraction), then one per fraction with ``dataset="mean"``, the unweighted
    mean over data sets of each metric (as Figure 1 averages AUROC over evaluation sets; the
    FLOPs are averaged the same way so a point's x and y describe the same average).

    `first` and `second` are score files of one monitor each, aligned by (dataset, id); an
    error when they share no record, disagree on a label, or a data set has one class only."""
    strategy = strategy or CascadeStrategy()
    _check_fractions(fractions)
    m1, m2, parts = _aligned_parts(first, second)
    name = cascade_name(m1, m2, strategy)
    common = dict(
        cascade=name,
        first=m1,
        second=m2,
        selection=strategy.selection,
        merge=strategy.merge,
        remaining=strategy.remaining,
    )
    out: list[dict[str, Any]] = []
    means: list[dict[str, Any]] = []
    for fraction in fractions:
        per_set = []
        for part in parts:
            k = _n_escalated(len(part.labels), fraction)
            esc = _escalated(part.s1, k, strategy.selection)
            score = _merged(part.s1, part.s2, esc, strategy)
            flops = part.f1 + np.where(esc, part.f2, 0.0)  # [N]
            result = metrics.evaluate(score, part.labels, fpr=_FPR)
            per_set.append(
                dict(
                    common,
                    dataset=part.dataset,
                    fraction=float(fraction),
                    auroc=result["auroc"],
                    tpr_at_1pct_fpr=result["tpr_at_fpr"],
                    mean_flops=float(flops.mean()),
                    n=result["n"],
                    n_escalated=k,
                )
            )
        out += per_set
        means.append(
            dict(
                common,
                dataset="mean",
                fraction=float(fraction),
                auroc=float(np.mean([r["auroc"] for r in per_set])),
                tpr_at_1pct_fpr=float(np.mean([r["tpr_at_1pct_fpr"] for r in per_set])),
                mean_flops=float(np.mean([r["mean_flops"] for r in per_set])),
                n=sum(r["n"] for r in per_set),
                n_escalated=sum(r["n_escalated"] for r in per_set),
            )
        )
    return out + means


class _CascadeRow(pydantic.BaseModel):
    """The schema of one cascade.jsonl line (extra fields are allowed and kept)."""

    model_config = pydantic.ConfigDict(extra="allow")

    cascade: str = pydantic.Field(min_length=1)
    first: str = pydantic.Field(min_length=1)
    second: str = pydantic.Field(min_length=1)
    selection: Selection
    merge: Merge
    remaining: str
    dataset: str = pydantic.Field(min_length=1)
    fraction: float = pydantic.Field(ge=0.0, le=1.0)
    auroc: float = pydantic.Field(ge=0.0, le=1.0)
    tpr_at_1pct_fpr: float = pydantic.Field(ge=0.0, le=1.0)
    mean_flops: float = pydantic.Field(ge=0.0, allow_inf_nan=False)
    n: int = pydantic.Field(ge=0)
    n_escalated: int = pydantic.Field(ge=0)


def write_cascade(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `cascade_curve` rows to a jsonl file, atomically (the score files' writer)."""
    return write_scores(path, rows)


def read_cascade(*paths: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate cascade.jsonl files; `CascadeFileError` names file, line and field."""
    if not paths:
        raise CascadeFileError("no cascade file given")
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        before = len(rows)
        if not path.is_file():
            raise CascadeFileError(f"{path}: no such cascade file")
        rows += [obj for _, obj in validated_lines(path, _CascadeRow, CascadeFileError)]
        if len(rows) == before:
            raise CascadeFileError(f"{path}: no cascade rows")
    return rows
