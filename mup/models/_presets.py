"""Named model sizes: published hyperparameters as `ModelConfig` values (`NAMED_CONFIGS`).

Each entry sets only config fields; checkpoints of these models need no code of their own.
"""

from __future__ import annotations

import dataclasses

from mup.models._config import ModelConfig, RopeScaling, interleaved_layer_types

_LLAMA3_SCALING_8B = RopeScaling(
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


# What every member of a family shares; each named size adds its own widths and depths.
_LLAMA3 = dict(
    vocab_size=128256,
    n_kv_heads=8,
    rope_theta=500_000.0,
    rope_scaling=_LLAMA3_SCALING_8B,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)
_GEMMA = dict(
    rms_norm_eps=1e-6,
    tie_embeddings=True,
    activation="gelu_tanh",
    norm_plus_one=True,
    embed_scale=True,
    post_norms=True,
)


def _member(family: dict, **fields) -> ModelConfig:
    return ModelConfig(**(family | fields))


NAMED_CONFIGS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": _member(
        _LLAMA3,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        head_dim=64,
        d_ff=8192,
        rope_scaling=dataclasses.replace(_LLAMA3_SCALING_8B, factor=32.0),
        tie_embeddings=True,
    ),
    "llama-3.1-8b": _member(
        _LLAMA3,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        head_dim=128,
        d_ff=14336,
        tie_embeddings=False,
    ),
    "llama-3.1-70b": _member(
        _LLAMA3,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        head_dim=128,
        d_ff=28672,
        tie_embeddings=False,
    ),
    "gemma-2-2b": _member(
        _GEMMA,
        vocab_size=256000,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        rope_theta=10_000.0,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        layer_types=interleaved_layer_types(26, every=2),
        max_position_embeddings=8192,
    ),
    "gemma-3-27b": _member(
        _GEMMA,
        vocab_size=262208,
        d_model=5376,
        n_layers=62,
        n_heads=32,
        n_kv_heads=16,
        head_dim=128,
        d_ff=21504,
        rope_theta=1_000_000.0,
        rope_scaling=RopeScaling(kind="linear", factor=8.0),
        local_rope_theta=10_000.0,
        qk_norm=True,
        query_pre_attn_scalar=168,
        sliding_window=1024,
        layer_types=interleaved_layer_types(62, every=6),
        max_position_embeddings=131072,
    ),
}
