"""Tiny synthetic stores for the experiment tests: a planted high-stakes direction along e_0 at
layer 2 (pure noise at layer 1), records in pairs that share a `pair_id`, and a 1-10
`scale_labels` that the planted signal follows. Shapes are fixed (D = 8, lengths 3..16, one
16-token bucket) so every test reuses the same compiled programs.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from mup import probes, store

D = 8
LAYERS = (1, 2)
# Few epochs keep compile + run time small; the planted signal is learned within them.
FAST = dict(epochs=20, patience=8)


def write_dataset(path: Path, n: int, seed: int) -> list[dict]:
    """A stakes JSONL of N records in N/2 pairs (one high-, one low-stakes record each)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        high = i % 2 == 0
        scale = int(rng.integers(7, 11) if high else rng.integers(1, 5))
        rows.append(
            {
                "inputs": f"record {i}",
                "ids": f"s{seed}-r{i}",
                "labels": "high-stakes" if high else "low-stakes",
                "scale_labels": scale,
                "pair_id": f"s{seed}-p{i // 2}",
                "split": "train" if i % 4 < 2 else "test",
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


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp_stores")
    return types.SimpleNamespace(
        train=make_store(root, "train", 96, 0),
        val=make_store(root, "val", 48, 1),
        evals={"a": make_store(root, "a", 48, 2), "b": make_store(root, "b", 48, 3, signal=1.5)},
    )


@pytest.fixture(scope="session")
def helpers():
    """Constants for test modules (importlib import mode cannot import conftest)."""
    return types.SimpleNamespace(D=D, LAYERS=LAYERS, FAST=FAST, probes=probes)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-block llama (vocab of SmolLM2) saved with the SmolLM2 tokenizer."""
    torch = pytest.importorskip("torch", reason="torch builds the tiny random checkpoint")
    import transformers

    from mup.text import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
