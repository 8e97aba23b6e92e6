"""What a monitor costs per record, in floating-point operations.

The convention is the one of "Models Under Pressure" (and of scaling-law work): a dense matmul
with P weights applied to T tokens costs 2 * P * T FLOPs. So

  * an LLM monitor that reads T tokens through B decoder blocks and computes logits at E
    positions costs ``2 * T * B * P_block + 2 * E * D * V``, with P_block the matmul weights of
    one block (q, k, v, o projections and the gated MLP; norms and biases are not matmuls and
    are left out, as is the embedding lookup); the attention-score term (~4 * T^2 * N * H per
    block) is left out too, as the paper does: it is under 5% below ~2k tokens for these models.
  * a probe reading T tokens of activations costs ``2 * T * P_probe`` with P_probe its parameter
    count. The activations themselves are free: the monitored model computes them anyway to
    answer. ``forward_to_layer`` instead charges the forward up to the probe's layer, for a
    probe that runs on a model it does not otherwise run.

The hand count in tests/monitors/test_flops.py checks these on a tiny config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing mup.models loads jax, which costs seconds
    from mup.models import ModelConfig

__all__ = ["block_matmul_params", "llm_flops", "probe_flops"]


def block_matmul_params(config: ModelConfig) -> int:
    """Matmul weights of one decoder block: q, k, v, o and the gated MLP's gate, up, down."""
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    attention = D * N * H + 2 * D * K * H + N * H * D
    mlp = 3 * D * F
    return attention + mlp


def llm_flops(
    config: ModelConfig, n_tokens: int, *, n_blocks: int | None = None, logit_positions: int = 1
) -> float:
    """FLOPs of running `n_tokens` through `n_blocks` blocks (all by default) and the LM head at
    `logit_positions` positions (a likelihood baseline needs the completion's positions, a
    classifier head needs one)."""
    blocks = config.n_layers if n_blocks is None else n_blocks
    if not 0 <= blocks <= config.n_layers:
        raise ValueError(f"n_blocks must be in [0, {config.n_layers}], got {blocks}")
    if n_tokens < 0 or logit_positions < 0:
        raise ValueError(f"token counts must be >= 0, got {n_tokens} and {logit_positions}")
    body = 2.0 * n_tokens * blocks * block_matmul_params(config)
    head = 2.0 * logit_positions * config.d_model * config.vocab_size
    return body + head


def probe_flops(
    n_params: int,
    n_tokens: int,
    *,
    forward_to_layer: int | None = None,
    config: ModelConfig | None = None,
) -> float:
    """FLOPs of a probe with `n_params` parameters reading `n_tokens` tokens; with
    `forward_to_layer` (and the model's `config`), plus the forward through that many blocks."""
    if n_params < 0 or n_tokens < 0:
        raise ValueError(f"n_params and n_tokens must be >= 0, got {n_params} and {n_tokens}")
    own = 2.0 * n_params * n_tokens
    if forward_to_layer is None:
        return own
    if config is None:
        raise ValueError("forward_to_layer needs the model's config")
    if not 0 <= forward_to_layer <= config.n_layers:
        # Layer L is the residual stream entering block L (mup.models): L blocks run.
        raise ValueError(
            f"forward_to_layer must be a layer in [0, {config.n_layers}], got {forward_to_layer}"
        )
    return own + llm_flops(config, n_tokens, n_blocks=forward_to_layer, logit_positions=0)
