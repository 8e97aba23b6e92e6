"""Tiny random transformers models (torch CPU, float32, eager attention) and their mup params.

Each case is built once per session: a seeded HF model with all weights re-drawn large enough
that attention is far from uniform, saved with `save_pretrained` (safetensors, so tied models
drop the duplicate LM head exactly as real checkpoints do), read back tensor by tensor and
converted with `params_from_hf`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
from _support.checkpoints import TINY_HF

VOCAB, D_MODEL = TINY_HF["vocab_size"], TINY_HF["hidden_size"]
WINDOW = 8  # sliding window of the local-layer cases; tests use 24 tokens, three windows


@dataclasses.dataclass
class Case:
    name: str
    hf_model: object  # transformers model, eval mode, float32
    config: object  # mup ModelConfig
    params: dict


def _llama_kwargs(**overrides):
    return TINY_HF | overrides


def _hf_config(name: str):
    import transformers as tf

    if name == "llama_mha":
        return tf.LlamaConfig(**_llama_kwargs(num_key_value_heads=4, tie_word_embeddings=False))
    if name == "llama_gqa_tied":
        return tf.LlamaConfig(**_llama_kwargs(num_key_value_heads=2, tie_word_embeddings=True))
    if name == "llama_mqa":
        return tf.LlamaConfig(
            **_llama_kwargs(num_key_value_heads=1, num_hidden_layers=3, tie_word_embeddings=False)
        )
    if name == "llama3_rope":
        # original_max_position_embeddings=16 puts the smooth band inside the 16-dim head.
        rope = dict(
            rope_type="llama3",
            rope_theta=500_000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        )
        return tf.LlamaConfig(**_llama_kwargs(rope_parameters=rope, tie_word_embeddings=True))
    if name == "qwen2":
        return tf.Qwen2Config(**_llama_kwargs(tie_word_embeddings=False))
    if name == "mistral":
        return tf.MistralConfig(**_llama_kwargs(sliding_window=WINDOW, tie_word_embeddings=False))
    if name == "gemma2":
        return tf.Gemma2Config(
            **_llama_kwargs(
                num_hidden_layers=3,
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=WINDOW,
                attn_logit_softcapping=5.0,  # small caps so that tanh actually bends
                final_logit_softcapping=3.0,
                tie_word_embeddings=True,
            )
        )
    if name == "gemma3":
        return tf.Gemma3TextConfig(
            **_llama_kwargs(
                num_hidden_layers=4,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=WINDOW,
                layer_types=[
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "full_attention",
                ],
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
                tie_word_embeddings=True,
            )
        )
    raise KeyError(name)


def _randomize(model, gemma: bool, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def _read_safetensors(path: Path):
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


@functools.cache
def _build(name: str, tmp_root: str) -> Case:
    import torch
    import transformers as tf

    from mup.models import config_from_hf
    from mup.models._params import params_from_hf

    hf_config = _hf_config(name)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    model = model.float().eval()
    _randomize(model, gemma=name.startswith("gemma"), seed=sum(map(ord, name)))
    path = Path(tmp_root) / name
    model.save_pretrained(path)
    config = config_from_hf(hf_config.to_dict())
    params = params_from_hf(config, _read_safetensors(path))
    return Case(name=name, hf_model=model, config=config, params=params)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> Case, built lazily and shared by every test module of this area."""
    pytest.importorskip("torch", reason="torch is the parity reference")
    root = str(tmp_path_factory.mktemp("tiny_models"))
    return lambda name: _build(name, root)
