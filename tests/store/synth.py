"""Synthetic ragged activation jobs shared by the store tests and tests/store/crash_writer.py."""

from __future__ import annotations

import numpy as np

BUCKET = "mup-store-test"

JOB = {
    "model": "tiny-test",
    "model_revision": "0" * 40,
    "dataset": "synthetic.jsonl",
    "dataset_sha256": "ab" * 32,
    "site": "residual",
    "mask_mode": "all",
    "tokenizer": "tiny-test",
    "max_tokens": 64,
}


def make_job(n: int = 37, d: int = 8, seed: int = 0, layers=(2, 5), max_len: int = 60):
    """Synthetic ragged records (some empty) and their activations for `layers`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n)
    lengths[[3, n // 2]] = 0  # records without tokens must work too
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [N+1]
    t = int(offsets[-1])
    meta = dict(
        layers=list(layers),
        d_model=d,
        offsets=offsets,
        ids=[f"rec-{i}-ü" for i in range(n)],
        input_ids=rng.integers(0, 50000, size=t),
        roles=rng.integers(0, 3, size=t).astype(np.uint8),
        mask=rng.random(t) < 0.7,
        labels=rng.integers(-1, 2, size=n),
        attrs=dict(JOB),
    )
    acts = {layer: (rng.standard_normal((t, d)) * 3).astype(np.float32) for layer in layers}
    return meta, acts


def batch_acts(acts: dict, offsets: np.ndarray, rows) -> dict:
    return {
        layer: np.concatenate([a[offsets[r] : offsets[r + 1]] for r in rows]).reshape(
            -1, a.shape[1]
        )
        for layer, a in acts.items()
    }


# The crash tests' job: enough shards (shard_tokens 128 over ~3.6k tokens) for many kill points.
CRASH_JOB = dict(n=120, d=16, layers=(1, 4), max_len=60)
CRASH_STORE = dict(chunk_tokens=32, shard_tokens=128)
