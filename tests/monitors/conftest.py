"""Fixtures of the monitor tests.

Cascade and figure tests: synthetic score files with known scores, labels and FLOPs on
several data sets, written through `write_scores` so they are real, validated score files
(their rows and an independent AUROC come from `_support.scores`).

Finetune tests: a tiny random llama saved as a real HF checkpoint directory (config.json,
safetensors, a word-level chat tokenizer) for the separable toy stakes task of `_support.toy`,
whose `toy_records` the test modules import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _support.scores import rows_for
from _support.toy import save_toy_llama

from mup.monitors import write_scores


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The toy task's random 2-block llama checkpoint (`_support.toy.save_toy_llama`)."""
    return save_toy_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from mup.models import load_model

    return load_model(tiny_dir)
