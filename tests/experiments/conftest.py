"""Experiment fixtures: the synthetic stores of `_support.stores` (planted signal at layer 2),
a tiny random checkpoint, and a data root laid out like shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support.checkpoints import save_tiny_llama
from _support.stores import Stores, make_stores


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> Stores:
    return make_stores(tmp_path_factory.mktemp("exp_stores"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-block llama (vocab of SmolLM2) saved with the SmolLM2 tokenizer."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"),
        d_model=16,
        d_ff=32,
        n_heads=2,
        n_kv_heads=1,
        max_positions=512,
    )


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root laid out like shared/data, every set a copy of the bundled mini set."""
    from mup.data import bundled_path

    root = tmp_path_factory.mktemp("data_root")
    text = bundled_path().read_text()
    for rel in (
        "mup/training/synthetic_2025-03-25.jsonl",
        "mup/evals/dev/anthropic_balanced.jsonl",
        "mup/evals/dev/mt_balanced.jsonl",
        "mup/evals/dev/mts_balanced.jsonl",
        "mup/evals/dev/toolace_balanced.jsonl",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root
