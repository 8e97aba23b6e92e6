"""Tiny `ModelConfig`s for tests that build a model in memory (no checkpoint, no torch)."""

from __future__ import annotations

from mup.models import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A 2-block llama-like config (D=32, N=4 heads, K=2 kv heads, H=8, F=64, V=64, untied LM
    head); `overrides` replace any field."""
    fields = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=64,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
    )
    return ModelConfig(**(fields | overrides))
