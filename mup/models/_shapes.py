"""Shapes of the parameter pytree (its layout is documented in `mup.models._params`).

Below both the parameter builders and the partition specs, which each need the tree's names.
"""

from __future__ import annotations

from typing import Any

from mup.models._config import ModelConfig


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Pytree of shape tuples matching the parameter pytree."""
    L, D, N, K = config.n_layers, config.d_model, config.n_heads, config.n_kv_heads
    H, F, V = config.head_dim, config.d_ff, config.vocab_size
    layers: dict[str, tuple[int, ...]] = {
        "attn_norm": (L, D),
        "q": (L, D, N, H),
        "k": (L, D, K, H),
        "v": (L, D, K, H),
        "o": (L, N, H, D),
        "mlp_norm": (L, D),
        "gate": (L, D, F),
        "up": (L, D, F),
        "down": (L, F, D),
    }
    if config.attention_bias:
        layers.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H))
    if config.qk_norm:
        layers.update(q_norm=(L, H), k_norm=(L, H))
    if config.post_norms:
        layers.update(post_attn_norm=(L, D), post_mlp_norm=(L, D))
    shapes: dict[str, Any] = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)
