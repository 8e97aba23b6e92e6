"""Synthetic activation jobs and stores.

`make_job`: ragged records (some empty) and their activations, for the store tests and
tests/store/crash_writer.py. `make_store` / `make_stores`: complete stores with their stakes data
sets, a planted high-stakes direction along e_0 at layer 2 (pure noise at layer 1), records in
pairs that share a `pair_id`, and a 1-10 `scale_labels` that the signal follows; shapes fixed
(D = 8, lengths 3..16, one 16-token bucket) so every test reuses the same compiled programs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mup import store

# The job attributes every synthetic store carries (what an extraction job would record).
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
BUCKET = "mup-store-test"  # the bucket tests/conftest.py creates on its moto server


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


# The crash tests' job: enough shards (shard_tokens 128 over ~3.6k tokens) for many kill points.
CRASH_JOB = dict(n=120, d=16, layers=(1, 4), max_len=60)
CRASH_STORE = dict(chunk_tokens=32, shard_tokens=128)

D = 8
LAYERS = (1, 2)
# Few epochs keep compile + run time small; the planted signal is learned within them.
FAST = dict(epochs=20, patience=8)


# The variation fields of the synthetic training set (mup probes heatmap). Set per pair, so
# every value holds both classes, and never by pair % 2 (pairs alternate between the train
# and test splits: such a value would exist in one split only). Except language: "French" is
# every 16th record, all of them high-stakes, so a heatmap has a value to skip.
TONES = ("casual", "angry", "vulnerable")
PROMPT_STYLES = ("Question", "Third Person")
LENGTHS = ("short", "long")


def write_dataset(path: Path, n: int, seed: int) -> list[dict]:
    """A stakes JSONL of N records in N/2 pairs (one high-, one low-stakes record each), with
    the variation fields tone, prompt_style, length and language."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        high = i % 2 == 0
        scale = int(rng.integers(7, 11) if high else rng.integers(1, 5))
        pair = i // 2
        rows.append(
            {
                "inputs": f"record {i}",
                "ids": f"s{seed}-r{i}",
                "labels": "high-stakes" if high else "low-stakes",
                "scale_labels": scale,
                "pair_id": f"s{seed}-p{pair}",
                "split": "train" if i % 4 < 2 else "test",
                "tone": TONES[pair % len(TONES)],
                "prompt_style": PROMPT_STYLES[(pair // 2) % len(PROMPT_STYLES)],
                "length": LENGTHS[(pair // 4) % len(LENGTHS)],
                "language": "French" if i % 16 == 0 else "English",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_store(root: Path, name: str, n: int, seed: int, signal: float = 3.0):
    """A complete store of N records at LAYERS, with its data set file beside it."""
    data_path = root / f"{name}.jsonl"
    rows = write_dataset(data_path, n, seed)
    rng = np.random.default_rng(seed + 100)
    lengths = rng.integers(3, 17, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    t = int(offsets[-1])
    labels = np.array([1 if r["labels"] == "high-stakes" else 0 for r in rows], np.int8)
    scale = np.array([r["scale_labels"] for r in rows], np.float32)
    mask = rng.random(t) < 0.8
    mask[offsets[:-1]] = True
    acts = {x: rng.normal(size=(t, D)).astype(np.float32) for x in LAYERS}
    # The signal grows with the stakes score, so a good probe's probability follows it.
    acts[2][:, 0] += signal * np.repeat((scale - 5.5) / 4.5, lengths) * mask
    url = root / f"{name}-store"
    w = store.create(
        url,
        layers=list(LAYERS),
        d_model=D,
        dtype="float32",
        offsets=offsets,
        ids=[r["ids"] for r in rows],
        input_ids=np.zeros(t, np.int64),
        roles=np.zeros(t, np.uint8),
        mask=mask,
        labels=labels,
        attrs={
            "model": "synthetic",
            "model_revision": "0",
            "dataset": str(data_path),
            "dataset_sha256": "0" * 64,
            "site": "residual",
            "mask_mode": "all",
            "tokenizer": "none",
            "max_tokens": 16,
        },
    )
    w.write(np.arange(n), acts)
    w.finalize()
    w.close()
    return store.open(url)


@dataclasses.dataclass(frozen=True)
class Stores:
    """A training, a validation and two evaluation stores (make_store's)."""

    train: store.ActivationStore
    val: store.ActivationStore
    evals: dict[str, store.ActivationStore]


def make_stores(root: Path) -> Stores:
    return Stores(
        train=make_store(root, "train", 96, 0),
        val=make_store(root, "val", 48, 1),
        evals={"a": make_store(root, "a", 48, 2), "b": make_store(root, "b", 48, 3, signal=1.5)},
    )


def batch_acts(acts: dict, offsets: np.ndarray, rows) -> dict:
    """The rows' activations of every layer, concatenated in row order (a writer's batch)."""
    return {
        layer: np.concatenate([a[offsets[r] : offsets[r + 1]] for r in rows]).reshape(
            -1, a.shape[1]
        )
        for layer, a in acts.items()
    }
