"""Synthetic ragged activations with a planted high-stakes direction, for probe tests.

Shapes are fixed (D = 16, record lengths 3..16 so every sequence batch falls in the 16-token
bucket) so that every test reuses the same compiled programs.
"""

from __future__ import annotations

import numpy as np

from mup import probes

D = 16
# Few epochs keep compile + run time small; the planted signal is learned within them.
FAST = dict(epochs=25, patience=8)


def synth(n: int, seed: int, *, d: int = D, signal: float = 4.0) -> probes.Activations:
    """N records; positives carry `signal` along e_0 in every masked token, while the
    unmasked tokens carry a huge decoy along e_1 that is perfectly predictive - a probe that
    reads unmasked tokens would latch onto it (and fail the mask tests)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 17, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    t = int(offsets[-1])
    labels = np.resize(np.array([0, 1], np.int8), n)
    rng.shuffle(labels)
    acts = rng.normal(size=(t, d)).astype(np.float32)
    mask = rng.random(t) < 0.75
    mask[offsets[:-1]] = True  # at least one readable token per record
    tok_label = np.repeat(labels, lengths).astype(np.float32)  # [T]
    acts[:, 0] += signal * tok_label * mask
    acts[:, 1] += np.where(mask, 0.0, 50.0 * (2 * tok_label - 1))
    return probes.Activations(
        acts=acts, offsets=offsets, mask=mask, labels=labels, ids=[f"r{i}" for i in range(n)]
    )


def scramble_unread(data: probes.Activations, seed: int) -> probes.Activations:
    """Same records with every unmasked token replaced by large random values."""
    rng = np.random.default_rng(seed)
    acts = data.acts.copy()
    acts[~data.mask] = rng.normal(scale=100.0, size=(int((~data.mask).sum()), data.d_model))
    return probes.Activations(
        acts=acts, offsets=data.offsets, mask=data.mask, labels=data.labels, ids=data.ids
    )
