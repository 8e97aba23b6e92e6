"""One llama-like model config; Llama, SmolLM2, Qwen2, Mistral, Gemma 2 and Gemma 3 are values.

Axis letters used across mup.models: B batch, T tokens (query), S cache slots, D model,
N heads, K kv heads, H head dim, F MLP hidden, V vocab, L layers.

`mup.models.config_from_hf` (in `mup.models._families`) reads a transformers ``config.json``
dict through the per-family translators and refuses, by name, every attribute whose value would
change the math in a way this port does not implement. Named sizes live in
`mup.models._presets`, rotary frequencies in `mup.models._rope`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

LayerType = Literal["full_attention", "sliding_attention"]


def interleaved_layer_types(n_layers: int, every: int) -> tuple[LayerType, ...]:
    """Every `every`-th layer full attention, the others sliding (Gemma 2: 2, Gemma 3: 6)."""
    return tuple(
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)
    )


class UnsupportedConfigError(ValueError):
    """A HF config attribute (or value) that this port does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Frequency rescaling of rotary embeddings (HF ``rope_scaling`` / ``rope_parameters``)."""

    kind: Literal["linear", "llama3"]
    factor: float
    # llama3 only: wavelengths above original_max_position_embeddings / low_freq_factor are
    # divided by `factor`, below ... / high_freq_factor kept, and smoothly mixed in between.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyperparameters of the llama-like decoder. Hashable: it is a static jit argument."""

    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N query heads
    n_kv_heads: int  # K key/value heads (K == N: MHA, 1 < K < N: GQA, K == 1: MQA)
    head_dim: int  # H
    d_ff: int  # F, hidden width of the gated MLP
    rope_theta: float  # rotary base of full-attention layers (of all layers unless local set)
    rms_norm_eps: float
    tie_embeddings: bool  # LM head is the transposed token embedding
    rope_scaling: RopeScaling | None = None  # applies to full-attention layers
    # Rotary base of sliding-window layers (Gemma 3: 10k local vs 1M global); None = the same
    # rope (base and scaling) as full-attention layers.
    local_rope_theta: float | None = None
    activation: Literal["silu", "gelu_tanh"] = "silu"
    norm_plus_one: bool = False  # Gemma RMSNorm scales by (1 + w) instead of w
    embed_scale: bool = False  # Gemma multiplies token embeddings by sqrt(D)
    post_norms: bool = False  # Gemma 2/3 also normalise the attention and MLP outputs
    qk_norm: bool = False  # Gemma 3 RMS-normalises q and k per head before rope
    attention_bias: bool = False  # Qwen2: biases on q, k, v (not o)
    attn_logit_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: same on the LM logits
    query_pre_attn_scalar: float | None = None  # scores scale is this ** -0.5; None = H
    sliding_window: int | None = None  # window of "sliding_attention" layers, in tokens
    # Per-layer attention kind; None = every layer "full_attention".
    layer_types: tuple[LayerType, ...] | None = None
    max_position_embeddings: int = 8192  # informational; positions are not clipped

    def __post_init__(self):
        problems = []
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                problems.append(
                    f"layer_types has {len(self.layer_types)} entries, expected n_layers="
                    f"{self.n_layers}"
                )
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                problems.append(f"layer_types has unknown kinds {sorted(bad)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                problems.append("layer_types has sliding_attention layers but no sliding_window")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ---- derived -------------------------------------------------------------------------

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: True where attention is sliding-window (local)."""
        if self.layer_types is None:
            return (False,) * self.n_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def param_count(self, up_to_layer: int | None = None, *, embeddings: bool = True) -> int:
        """Parameters used to compute layer `up_to_layer` (all, with the LM head, when None)."""
        D, N, K, H, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F
        per_layer += D * (4 if self.post_norms else 2)
        if self.attention_bias:
            per_layer += (N + 2 * K) * H
        if self.qk_norm:
            per_layer += 2 * H
        layers = self.n_layers if up_to_layer is None else up_to_layer
        total = per_layer * layers
        if embeddings:
            total += self.vocab_size * D
        if up_to_layer is None:
            total += D + (0 if self.tie_embeddings else self.vocab_size * D)
        return total

    def flops_per_token(self, up_to_layer: int | None = None, *, seq_len: int = 0) -> float:
        """Forward FLOPs per token: 2 per matmul weight, plus attention over `seq_len` keys.

        `up_to_layer=None` counts every block and the LM head; `up_to_layer=L` counts blocks
        below L only (what residual capture at layer L computes). Attention scores and the
        weighted sum add 4 * N * H FLOPs per attended key; with causal attention a token
        attends to (seq_len + 1) / 2 keys on average, windowed by sliding layers; seq_len=0
        leaves attention out.
        """
        D, N, K, H, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        layers = self.n_layers if up_to_layer is None else up_to_layer
        matmul = 2 * (D * N * H * 2 + D * K * H * 2 + 3 * D * F) * layers
        if up_to_layer is None:
            matmul += 2 * D * self.vocab_size
        attn = 0.0
        for local in self.local_layers[:layers]:
            keys = (seq_len + 1) / 2 if seq_len > 0 else 0.0
            if local and self.sliding_window is not None:
                keys = min(keys, self.sliding_window)
            attn += 4 * N * H * keys
        return float(matmul + attn)
