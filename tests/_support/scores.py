"""Score rows for the monitor tests, and an AUROC to check them against.

`rows_for`: validated score rows (`mup.monitors.score_row`) of one monitor on one data set.
`pairwise_auroc`: AUROC by counting pairs, independent of `mup.metrics`.
"""

from __future__ import annotations

import numpy as np

from mup.monitors import score_row


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
