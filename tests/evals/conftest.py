"""Evals fixtures: one tiny random llama with the SmolLM2 tokenizer, a random steering vector,
and a small benchmarks config over the three offline tasks (tiny token budgets, so that every
task shares one new-token buffer and the run compiles few programs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _support.checkpoints import save_tiny_llama

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
D_MODEL = 32
STEER_LAYER = 1

SMALL_CONFIG = """\
benchmarks:
  gsm8k_offline:
    task: mup/gsm8k_offline
    category: math
    args: {fewshot: 1, max_tokens: 6}
  xstest_offline:
    task: mup/xstest_offline
    category: safety
    args: {max_tokens: 6}
  mc_general:
    task: mup/mc_general
    category: knowledge
    args: {max_tokens: 6}
suites:
  offline: [gsm8k_offline, xstest_offline, mc_general]
"""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "data" / "benchmarks").is_dir():
        pytest.skip("../shared is absent")
    return SHARED / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-block llama (vocab of SmolLM2) saved with the SmolLM2 tokenizer; weights larger
    than the 0.02 init, so that steering visibly changes greedy tokens."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"),
        d_model=D_MODEL,
        n_heads=2,
        n_kv_heads=1,
        max_positions=2048,
        std=0.3,
    )


@pytest.fixture(scope="session")
def vector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vector") / "vector.npy"
    v = np.random.default_rng(0).normal(size=D_MODEL).astype(np.float32)
    np.save(path, v / np.linalg.norm(v) * 8.0)
    return path


@pytest.fixture(scope="session")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "benchmarks.yaml"
    path.write_text(SMALL_CONFIG)
    return path
