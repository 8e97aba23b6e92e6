"""Synthetic score files for the cascade and figure tests: known scores, labels and FLOPs on
several data sets, written through `write_scores` so they are real, validated score files."""

from __future__ import annotations

import types

import numpy as np
import pytest

from mup.monitors import score_row, write_scores


def rows_for(monitor, dataset, scores, labels, flops, *, prefix="r", n_tokens=10):
    """Score rows of one monitor on one data set; record ids are prefix + index."""
    return [
        score_row(
            id=f"{prefix}{i}",
            dataset=dataset,
            label=int(y),
            score=float(s),
            monitor=monitor,
            flops=float(f),
            n_tokens=n_tokens,
        )
        for i, (s, y, f) in enumerate(
            zip(scores, labels, np.broadcast_to(flops, len(scores)), strict=True)
        )
    ]


def pairwise_auroc(scores, labels) -> float:
    """AUROC by counting (positive, negative) pairs, ties half: independent of mup.metrics."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.fixture
def synthetic(tmp_path):
    """Three monitors (probe, prompted, finetuned) on data sets "dev/a" (8 records) and
    "dev/b" (40 records, 3 unlabelled); the probe is cheap and noisy, the LLMs costly and
    better. Returns the file paths and the arrays per (monitor, dataset)."""
    rng = np.random.default_rng(0)
    arrays = {}
    y_b = np.r_[np.zeros(20, int), np.ones(20, int)]
    y_b[[3, 17, 30]] = -1
    monitors = {
        "probe:attention@20": (0.9, 100.0),
        "prompted:big/single_word": (2.5, 1e6),
        "finetuned:big": (4.0, 2e6),
    }
    paths = {}
    for j, (monitor, (signal, cost)) in enumerate(monitors.items()):
        y_a = np.array([1, 0, 0, 1, 0, 1, 0, 1])
        s_a = 1 / (1 + np.exp(-(signal * (y_a - 0.5) + rng.normal(size=8))))
        s_b = 1 / (1 + np.exp(-(signal * (y_b.clip(0) - 0.5) + rng.normal(size=40))))
        f_a = cost * (1 + np.arange(8) / 8)
        f_b = cost * (1 + np.arange(40) / 40)
        arrays[monitor, "dev/a"] = (s_a, y_a, f_a)
        arrays[monitor, "dev/b"] = (s_b, y_b, f_b)
        rows = rows_for(monitor, "dev/a", s_a, y_a, f_a) + rows_for(monitor, "dev/b", s_b, y_b, f_b)
        paths[monitor] = write_scores(tmp_path / f"scores{j}.jsonl", rows)
    return paths, arrays


@pytest.fixture
def helpers():
    """Functions for test modules (importlib import mode cannot import conftest)."""
    return types.SimpleNamespace(rows_for=rows_for, pairwise_auroc=pairwise_auroc)
