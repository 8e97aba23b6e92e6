"""Probe fixtures over the synthetic activations of `_support.activations` (a planted
high-stakes direction), and probes fitted on them once per session."""

from __future__ import annotations

import pytest
from _support.activations import FAST, synth

from mup import probes


@pytest.fixture(scope="session")
def train_data():
    return synth(96, 0)


@pytest.fixture(scope="session")
def val_data():
    return synth(64, 1)


@pytest.fixture(scope="session")
def fitted(train_data, val_data):
    """kind -> probe trained with FAST settings (trained lazily, once per session)."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = probes.fit(kind, train_data, val=val_data, seed=0, **_fast(kind))
        return cache[kind]

    return get


def _fast(kind: str) -> dict:
    return FAST if kind not in ("dom", "lda", "logreg") else {}
