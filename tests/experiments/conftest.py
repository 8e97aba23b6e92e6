"""Experiment fixtures: the synthetic stores of `_support.stores` (planted signal at layer 2),
a tiny random checkpoint, a data root laid out like shared/data, and a store of real SmolLM2
tokens with synthetic activations for the score and view commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _support.checkpoints import save_tiny_llama
from _support.stores import FAST, D, Stores, make_stores

from mup import probes, store


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> Stores:
    return make_stores(tmp_path_factory.mktemp("exp_stores"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-block llama (vocab of SmolLM2) saved with the SmolLM2 tokenizer."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"),
        d_model=16,
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


# Records whose text and id a page must show as text, never run or parse as markup.
HOSTILE = [
    {
        "inputs": "<script>document.title='pwned'</script> & <b>bold</b> \"quoted\" 'single'",
        "ids": 'x"><img src=x onerror="document.title=1">',
        "labels": "high-stakes",
    },
    {"inputs": "</span></div><!-- unclosed", "ids": "x-comment", "labels": "low-stakes"},
]


def make_token_store(root: Path, *, max_tokens: int = 96, signal: float = 2.0):
    """A complete store of the bundled mini set plus `HOSTILE`, with their REAL SmolLM2 tokens
    and roles (so the view can decode and mark them) and synthetic activations: D = 8 noise,
    plus `signal` along e_0 on the user tokens of high-stakes records. The mask is
    `no_system` (the template's default system prompt is stored but not read)."""
    from mup.data import bundled_path, load_records
    from mup.text import ROLE_USER, encode_chats, load_tokenizer, token_mask

    path = root / "mini_tokens.jsonl"
    path.write_text(bundled_path().read_text() + "".join(json.dumps(r) + "\n" for r in HOSTILE))
    dataset = load_records(path)
    enc = encode_chats(load_tokenizer("smollm2-135m"), dataset, max_tokens=max_tokens)
    mask = token_mask(enc.roles, enc.offsets, "no_system")
    t = int(enc.offsets[-1])
    rng = np.random.default_rng(7)
    acts = rng.normal(size=(t, D)).astype(np.float32)
    high = np.repeat(dataset.labels == 1, np.diff(enc.offsets))  # [T]
    acts[:, 0] += signal * (high & (enc.roles == ROLE_USER))
    url = root / "mini-tokens-store"
    w = store.create(
        url,
        layers=[2],
        d_model=D,
        dtype="float32",
        offsets=enc.offsets,
        ids=[r.id for r in dataset],
        input_ids=enc.input_ids,
        roles=enc.roles,
        mask=mask,
        labels=dataset.labels,
        attrs={
            "model": "smollm2-135m",
            "model_revision": "synthetic",
            "dataset": str(path),
            "dataset_sha256": dataset.sha256,
            "site": "residual",
            "mask_mode": "no_system",
            "tokenizer": "smollm2-135m",
            "max_tokens": max_tokens,
        },
    )
    w.write(np.arange(len(dataset)), {2: acts})
    w.finalize()
    w.close()
    return store.open(url)


@pytest.fixture(scope="session")
def token_store(tmp_path_factory):
    return make_token_store(tmp_path_factory.mktemp("token_store"))


@pytest.fixture(scope="session")
def token_probes(token_store, tmp_path_factory):
    """kind -> (probe, file) for probes trained on `token_store` (lazily, once a session)."""
    root = tmp_path_factory.mktemp("token_probes")
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            extra = FAST if kind not in ("dom", "lda", "logreg") else {}
            probe = probes.fit(kind, token_store, layer=2, seed=0, **extra)
            cache[kind] = (probe, probe.save(root / f"{kind}.safetensors"))
        return cache[kind]

    return get
