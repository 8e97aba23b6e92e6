"""One llama-like model config; Llama, SmolLM2, Qwen2, Mistral, Gemma 2 and Gemma 3 are values.

Axis letters used across mup.models: B batch, T tokens (query), S cache slots, D model,
N heads, K kv heads, H head dim, F MLP hidden, V vocab, L layers.

`ModelConfig.from_hf_config` reads a transformers ``config.json`` dict (the old flat
``rope_theta``/``rope_scaling`` form and the transformers-5 ``rope_parameters`` form) and refuses,
by name, every attribute whose value would change the math in a way this port does not
implement. Attributes that cannot change the forward pass are listed in ``_HARMLESS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

LayerType = Literal["full_attention", "sliding_attention"]


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

    # ---- reading HF configs --------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from a transformers config dict; raise `UnsupportedConfigError` naming every
        attribute (or value) that would change the math and is not implemented."""
        return _from_hf(dict(hf))


# Attributes that never change the forward pass (bookkeeping, generation defaults, training
# knobs that are inactive at inference).
_HARMLESS = frozenset(
    {
        "_name_or_path",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "architectures",
        "attention_dropout",  # dropout is off at inference
        "attn_implementation",
        "bos_token_id",
        "cache_implementation",
        "chunk_size_feed_forward",
        "dtype",
        "eos_token_id",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "max_position_embeddings",
        "model_type",
        "output_attentions",
        "output_hidden_states",
        "pad_token_id",
        "pretraining_tp",  # >1 only splits the same matmuls into slices
        "problem_type",
        "return_dict",
        "tokenizer_class",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "final_logit_softcapping",  # read below for gemma; must be absent/None elsewhere
        "attn_logit_softcapping",
        "max_window_layers",  # qwen2: only used to derive layer_types
        "unsloth_fixed",
    }
)
# Multimodal gemma3 wrapper attributes outside text_config: the text model ignores them.
_GEMMA3_WRAPPER = frozenset(
    {
        "text_config",
        "vision_config",
        "mm_tokens_per_image",
        "boi_token_index",
        "eoi_token_index",
        "image_token_index",
        "image_token_id",
        "boi_token_id",
        "eoi_token_id",
        "initializer_range",
        "model_type",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    }
)
_FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text", "gemma3")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; expected one of {list(_FAMILIES)}"
        )
    if model_type == "gemma3":
        extra = sorted(set(hf) - _GEMMA3_WRAPPER)
        if "text_config" not in hf:
            raise UnsupportedConfigError("model_type='gemma3' config has no text_config")
        text = dict(hf["text_config"])
        text["model_type"] = "gemma3_text"
        if "tie_word_embeddings" in hf and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = hf["tie_word_embeddings"]
        if extra:
            raise UnsupportedConfigError(f"gemma3 config: unhandled attributes {extra}")
        return _from_hf(text)

    gemma = model_type in ("gemma2", "gemma3_text")
    used: set[str] = set()
    problems: list[str] = []

    def get(key: str, default: Any = None) -> Any:
        used.add(key)
        return hf.get(key, default)

    def need(key: str) -> Any:
        used.add(key)
        if key not in hf:
            problems.append(f"missing required attribute {key!r}")
            return 0
        return hf[key]

    d_model = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_kv = get("num_key_value_heads") or n_heads
    head_dim = get("head_dim") or (d_model // n_heads if n_heads else 0)
    n_layers = need("num_hidden_layers")

    act_key = "hidden_activation" if gemma else "hidden_act"
    used.update({"hidden_act", "hidden_activation"})
    act = hf.get(act_key) or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        problems.append(f"{act_key}={act!r} (supported: {sorted(_ACTIVATIONS)})")

    if get("mlp_bias", False):
        problems.append("mlp_bias=True (biases in the MLP are not implemented)")
    attention_bias = bool(get("attention_bias", False))
    if model_type == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases, never an o bias
    elif attention_bias:
        problems.append(
            f"attention_bias=True on {model_type} (only Qwen2-style q/k/v biases are implemented)"
        )
    if get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=True (only causal attention is implemented)")
    if get("quantization_config") is not None:
        problems.append("quantization_config (quantized HF checkpoints are not supported)")

    # ---- attention kinds and sliding windows ----
    window = get("sliding_window")
    # Early Gemma 2 files also carry the window under its old name; it must agree.
    old_window = get("sliding_window_size")
    if old_window is not None and old_window != window:
        problems.append(f"sliding_window_size={old_window!r} != sliding_window={window!r}")
    layer_types = get("layer_types")
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern"))
    used.update({"sliding_window_pattern", "_sliding_window_pattern"})
    if model_type == "llama":
        if window is not None or get("use_sliding_window"):
            problems.append(f"sliding_window={window!r} on a llama config (not llama math)")
        window = None
    elif model_type == "qwen2":
        if not get("use_sliding_window", False):
            window = None
            layer_types = None
        elif layer_types is None:
            start = get("max_window_layers", n_layers)
            layer_types = [
                "sliding_attention" if i >= start else "full_attention" for i in range(n_layers)
            ]
    elif model_type == "mistral":
        if window is not None and layer_types is None:
            layer_types = ["sliding_attention"] * n_layers
    elif model_type == "gemma2":
        if layer_types is None:
            layer_types = [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
            ]
    elif model_type == "gemma3_text" and layer_types is None:
        every = pattern or 6
        layer_types = [
            "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)
        ]
    if layer_types is not None:
        layer_types = tuple(layer_types)
        if "sliding_attention" not in layer_types:
            window = None
        if all(t == "full_attention" for t in layer_types):
            layer_types = None

    # ---- rotary embeddings ----
    rope_theta, rope_scaling, local_theta = _read_rope(hf, model_type, used, problems)

    # ---- gemma extras ----
    attn_cap = get("attn_logit_softcapping")
    final_cap = get("final_logit_softcapping")
    qpas = get("query_pre_attn_scalar")
    if not gemma:
        for key, val in (
            ("attn_logit_softcapping", attn_cap),
            ("final_logit_softcapping", final_cap),
            ("query_pre_attn_scalar", qpas),
        ):
            if val is not None:
                problems.append(f"{key}={val!r} on {model_type}")

    tie_default = gemma
    config_kwargs = dict(
        vocab_size=need("vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=need("intermediate_size"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        local_rope_theta=local_theta,
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(get("tie_word_embeddings", tie_default)),
        activation=_ACTIVATIONS.get(act, "silu"),
        norm_plus_one=gemma,
        embed_scale=gemma,
        post_norms=gemma,
        qk_norm=model_type == "gemma3_text",
        attention_bias=attention_bias,
        attn_logit_softcap=attn_cap,
        final_logit_softcap=final_cap,
        query_pre_attn_scalar=qpas,
        sliding_window=window,
        layer_types=layer_types,
        max_position_embeddings=hf.get("max_position_embeddings") or 8192,
    )
    unknown = sorted(k for k in hf if k not in used and k not in _HARMLESS)
    if unknown:
        problems.append(f"unhandled attributes {unknown}")
    if problems:
        raise UnsupportedConfigError(f"{model_type} config: " + "; ".join(problems))
    try:
        return ModelConfig(**config_kwargs)
    except ValueError as e:
        raise UnsupportedConfigError(f"{model_type} config: {e}") from e


def _read_rope(
    hf: dict[str, Any], model_type: str, used: set[str], problems: list[str]
) -> tuple[float, RopeScaling | None, float | None]:
    """(global theta, global scaling, local theta) from either HF rope format."""
    used.update({"rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq"})
    params = hf.get("rope_parameters")
    if model_type == "gemma3_text":
        if params and "full_attention" in params:
            full = dict(params["full_attention"] or {})
            local = dict(params.get("sliding_attention") or {})
        else:
            full = dict(params or hf.get("rope_scaling") or {})
            local = {}
            full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        if hf.get("rope_scaling") and params and "full_attention" in params:
            full.update(hf["rope_scaling"])
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        local_kind = local.get("rope_type", local.get("type", "default"))
        if local_kind != "default":
            problems.append(f"rope_parameters.sliding_attention.rope_type={local_kind!r}")
        theta, scaling = _rope_entry(full, "rope_parameters.full_attention", problems)
        return theta, scaling, float(local["rope_theta"])
    entry = dict(params) if params else dict(hf.get("rope_scaling") or {})
    if "rope_theta" not in entry:
        entry["rope_theta"] = hf.get("rope_theta", 10_000.0)
    where = "rope_parameters" if params else "rope_scaling"
    theta, scaling = _rope_entry(entry, where, problems)
    return theta, scaling, None


def _rope_entry(
    entry: dict[str, Any], where: str, problems: list[str]
) -> tuple[float, RopeScaling | None]:
    kind = entry.get("rope_type", entry.get("type", "default"))
    theta = float(entry["rope_theta"])
    if entry.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{where}.partial_rotary_factor={entry['partial_rotary_factor']!r}")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(entry["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(entry["factor"]),
            low_freq_factor=float(entry["low_freq_factor"]),
            high_freq_factor=float(entry["high_freq_factor"]),
            original_max_position_embeddings=int(entry["original_max_position_embeddings"]),
        )
    problems.append(
        f"{where}.rope_type={kind!r} is not implemented (supported: default, linear, llama3)"
    )
    return theta, None


# ---- named sizes (published hyperparameters) ------------------------------------------------

_LLAMA3_SCALING_8B = RopeScaling(
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def _gemma3_types(n_layers: int, every: int = 6) -> tuple[LayerType, ...]:
    return tuple(
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)
    )


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
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500_000.0,
        rope_scaling=dataclasses.replace(_LLAMA3_SCALING_8B, factor=32.0),
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING_8B,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=131072,
    ),
    "llama-3.1-70b": ModelConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        d_ff=28672,
        rope_theta=500_000.0,
        rope_scaling=_LLAMA3_SCALING_8B,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        max_position_embeddings=131072,
    ),
    "gemma-2-2b": ModelConfig(
        vocab_size=256000,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        activation="gelu_tanh",
        norm_plus_one=True,
        embed_scale=True,
        post_norms=True,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        layer_types=tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(26)
        ),
        max_position_embeddings=8192,
    ),
    "gemma-3-27b": ModelConfig(
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
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        activation="gelu_tanh",
        norm_plus_one=True,
        embed_scale=True,
        post_norms=True,
        qk_norm=True,
        query_pre_attn_scalar=168,
        sliding_window=1024,
        layer_types=_gemma3_types(62),
        max_position_embeddings=131072,
    ),
}


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse rotary frequencies [H/2] float32, computed as transformers does (in float32)."""
    H = config.head_dim
    if local and config.local_rope_theta is not None:
        theta, scaling = config.local_rope_theta, None
    else:
        theta, scaling = config.rope_theta, config.rope_scaling
    exponent = np.arange(0, H, 2, dtype=np.float32) / np.float32(H)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
