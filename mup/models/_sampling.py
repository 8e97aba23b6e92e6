"""Sampling strategies: small frozen (hashable) dataclasses, static under jit.

Axis letters: B batch, V vocab.

A sampler maps next-token logits [B, V] (float32) and one PRNG key per row [B] to token ids
[B] int32. Every row draws with its own key, so a row's sample never depends on which other
rows share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy:
    """Always the most likely token (ties -> the lowest id, as `argmax` and HF do)."""

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        del keys
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Temperature:
    """Sample from softmax(logits / t)."""

    t: float = 1.0

    def __post_init__(self):
        if not self.t > 0:
            raise ValueError(f"Temperature.t must be > 0 (use Greedy() for t = 0), got {self.t}")

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.t  # [B, V]
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP:
    """Nucleus sampling: the smallest set of tokens whose probability reaches p, at temperature t.

    A token is kept when the probability mass of the tokens ranked strictly above it is < p,
    so the most likely token is always kept.
    """

    p: float = 0.9
    t: float = 1.0

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP.p must be in (0, 1], got {self.p}")
        if not self.t > 0:
            raise ValueError(f"TopP.t must be > 0, got {self.t}")

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        scaled = logits.astype(jnp.float32) / self.t  # [B, V]
        order = jnp.argsort(-scaled, axis=-1)  # [B, V] most likely first
        ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        ranked = jnp.where(mass_above < self.p, ranked, -jnp.inf)
        pick = jax.vmap(jax.random.categorical)(keys, ranked)  # [B] rank index
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


Sampler = Greedy | Temperature | TopP
