"""The toy stakes task of the finetune tests: a word vocabulary, records written in it, and a
tiny random llama checkpoint whose tokenizer knows exactly those words.

Records: "h" words in high-stakes records, "l" words in low-stakes ones, and a few "w" words in
both; the last token's hidden state sees the class through attention. The checkpoint is written
from numpy with `hf_tensors_from_params` (no torch), so `load_model(path)` reads it like any
checkpoint, and a finetune checkpoint can name it as its base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _support.checkpoints import SPECIALS, word_tokenizer

WORDS = [f"h{i}" for i in range(8)] + [f"l{i}" for i in range(8)] + [f"w{i}" for i in range(16)]
HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": len(SPECIALS) + len(WORDS),
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def save_toy_llama(path: Path) -> Path:
    """The checkpoint directory of a random 2-block llama (D 32, 4 heads, 2 kv heads) over the
    toy vocabulary, written to `path`."""
    import jax
    from safetensors.numpy import save_file

    from mup.models import config_from_hf, init_params
    from mup.models._params import hf_tensors_from_params

    config = config_from_hf(HF_CONFIG)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)

    # std 0.1: at the default 0.02 every position looks alike, at 0.3 attention locks onto
    # single tokens and the toy task barely generalises from 64 records. Norms at 1.
    def draw(key_path, leaf):
        if "norm" in jax.tree_util.keystr(key_path):
            return np.ones(leaf.shape, np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    tensors = {k: np.ascontiguousarray(v) for k, v in hf_tensors_from_params(config, params)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    word_tokenizer(WORDS).save_pretrained(path)
    return path


def toy_records(n: int, seed: int, *, prefix: str = "r", label: int | None = None):
    """n records, alternating high (1) and low (0) unless `label` fixes it; 2..8 words each."""
    from mup.data import Message, Record

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = (i % 2) if label is None else label
        words = [f"{'hl'[1 - y]}{j}" for j in rng.integers(0, 8, size=int(rng.integers(2, 6)))]
        # Neutral words at random places among the class ones.
        for _ in range(int(rng.integers(0, 4))):
            words.insert(int(rng.integers(0, len(words) + 1)), f"w{rng.integers(16)}")
        out.append(
            Record(
                id=f"{prefix}{seed}-{i}",
                messages=(Message(role="user", content=" ".join(words)),),
                label=y,
                scale_label=None,
                fields={},
                source=f"toy:{i}",
            )
        )
    return out
