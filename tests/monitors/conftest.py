"""Fixtures of the monitor tests.

Cascade and figure tests: synthetic score files with known scores, labels and FLOPs on
several data sets, written through `write_scores` so they are real, validated score files
(their rows and an independent AUROC come from `_support.scores`).

Finetune tests: a tiny random llama saved as a real HF checkpoint directory (config.json,
safetensors, a word-level chat tokenizer), and a separable toy stakes task for it.

The checkpoint is written from numpy with `hf_tensors_from_params` (no torch), so
`load_model(path)` reads it like any checkpoint, and a finetune checkpoint can name it as its
base model. Toy records: "h" words in high-stakes records, "l" words in low-stakes ones, and
a few "w" words in both; the last token's hidden state sees the class through attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _support.scores import rows_for

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


SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
WORDS = [f"h{i}" for i in range(8)] + [f"l{i}" for i in range(8)] + [f"w{i}" for i in range(16)]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
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


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The checkpoint directory of a random 2-block llama (D 32, 4 heads, 2 kv heads)."""
    import jax
    from safetensors.numpy import save_file

    from mup.models import config_from_hf, init_params
    from mup.models._params import hf_tensors_from_params

    config = config_from_hf(HF_CONFIG)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)

    # std 0.1: at the default 0.02 every position looks alike, at 0.3 attention locks onto
    # single tokens and the toy task barely generalises from 64 records. Norms at 1.
    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    path = tmp_path_factory.mktemp("tiny-llama")
    tensors = {k: np.ascontiguousarray(v) for k, v in hf_tensors_from_params(config, params)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from mup.models import load_model

    return load_model(tiny_dir)


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


@pytest.fixture(scope="session")
def toy():
    """`toy_records` for test modules (importlib import mode cannot import conftest)."""
    return toy_records
