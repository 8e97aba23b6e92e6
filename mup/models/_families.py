"""Translators from transformers ``config.json`` dicts to `ModelConfig`, one family per value.

Every supported HF ``model_type`` is a `Family`: the HF attributes it reads beyond those every
family reads (`COMMON`), whether it follows the Gemma conventions, and how it derives which layers
attend in a sliding window. `config_from_hf` reads every family the same way and refuses, by
name, each attribute that is neither read nor listed in `HARMLESS`, and each value that would
change the math in a way this port does not implement (all problems at once). Both HF rope
formats are read by `mup.models._rope.read_hf_rope`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mup.models._config import ModelConfig, UnsupportedConfigError, interleaved_layer_types
from mup.models._rope import ROPE_ATTRIBUTES, read_hf_rope

# Attributes that never change the forward pass (bookkeeping, generation defaults, training
# knobs that are inactive at inference).
HARMLESS = frozenset(
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
        "final_logit_softcapping",  # read for gemma; must be absent/None elsewhere
        "attn_logit_softcapping",
        "max_window_layers",  # qwen2: only used to derive layer_types
        "unsloth_fixed",
    }
)

# Attributes `config_from_hf` reads for every family; a value a family does not implement is refused
# there (soft-capping outside Gemma, biases, sliding windows on Llama, ...).
COMMON = ROPE_ATTRIBUTES | {
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "hidden_act",
    "hidden_activation",
    "mlp_bias",
    "attention_bias",
    "use_bidirectional_attention",
    "quantization_config",
    "sliding_window",
    "sliding_window_size",
    "layer_types",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "vocab_size",
    "intermediate_size",
    "rms_norm_eps",
    "tie_word_embeddings",
}

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}

# (hf, n_layers, sliding_window, layer_types, problems) -> (sliding_window, layer_types): the
# family's attention kinds, from what the config says (layer_types may be None: derive them).
LayerKinds = Callable[[dict[str, Any], int, Any, Any, list[str]], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """How one HF ``model_type`` maps to `ModelConfig`."""

    model_type: str
    layer_kinds: LayerKinds
    handles: frozenset[str] = frozenset()  # HF attributes read beyond COMMON
    # Gemma conventions: (1 + w) RMSNorm, sqrt(D) embedding scale, post-norms, soft-capping and
    # query_pre_attn_scalar allowed, ``hidden_activation`` (default gelu tanh), tied embeddings
    # by default.
    gemma: bool = False
    qk_norm: bool = False  # q and k RMS-normalised per head (Gemma 3)
    qkv_bias: bool = False  # always q/k/v biases, whatever attention_bias says (Qwen2)
    local_rope: bool = False  # sliding-window layers have a rope of their own (Gemma 3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wrapper:
    """A multimodal config whose ``text_config`` is a config of family `text_type`."""

    model_type: str
    text_type: str
    handles: frozenset[str]  # attributes outside text_config; the text model ignores them


def _llama_kinds(hf, n_layers, window, layer_types, problems):
    if window is not None or hf.get("use_sliding_window"):
        problems.append(f"sliding_window={window!r} on a llama config (not llama math)")
    return None, layer_types


def _mistral_kinds(hf, n_layers, window, layer_types, problems):
    if window is not None and layer_types is None:
        layer_types = ["sliding_attention"] * n_layers
    return window, layer_types


def _qwen2_kinds(hf, n_layers, window, layer_types, problems):
    if not hf.get("use_sliding_window", False):
        return None, None
    if layer_types is None:
        start = hf.get("max_window_layers", n_layers)
        layer_types = [
            "sliding_attention" if i >= start else "full_attention" for i in range(n_layers)
        ]
    return window, layer_types


def _interleaved_kinds(default_every: int, pattern_keys: tuple[str, ...] = ()) -> LayerKinds:
    """Every n-th layer full attention: n from the first of `pattern_keys` present, else
    `default_every`."""

    def kinds(hf, n_layers, window, layer_types, problems):
        if layer_types is None:
            every = next((hf[k] for k in pattern_keys if k in hf), None) or default_every
            layer_types = interleaved_layer_types(n_layers, every)
        return window, layer_types

    return kinds


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            model_type="llama", layer_kinds=_llama_kinds, handles=frozenset({"use_sliding_window"})
        ),
        Family(model_type="mistral", layer_kinds=_mistral_kinds),
        Family(
            model_type="qwen2",
            layer_kinds=_qwen2_kinds,
            handles=frozenset({"use_sliding_window", "max_window_layers"}),
            qkv_bias=True,
        ),
        Family(model_type="gemma2", layer_kinds=_interleaved_kinds(2), gemma=True),
        Family(
            model_type="gemma3_text",
            layer_kinds=_interleaved_kinds(
                6, ("sliding_window_pattern", "_sliding_window_pattern")
            ),
            gemma=True,
            qk_norm=True,
            local_rope=True,
        ),
    )
}

WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper(
        model_type="gemma3",
        text_type="gemma3_text",
        handles=frozenset(
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
        ),
    )
}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """`ModelConfig` of a transformers config dict; `UnsupportedConfigError` names every
    attribute (or value) that would change the math and is not implemented."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type in WRAPPERS:
        return config_from_hf(_unwrap(WRAPPERS[model_type], hf))
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; expected one of {[*FAMILIES, *WRAPPERS]}"
        )
    gemma = family.gemma
    problems: list[str] = []

    def need(key: str) -> Any:
        if key not in hf:
            problems.append(f"missing required attribute {key!r}")
            return 0
        return hf[key]

    d_model = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or (d_model // n_heads if n_heads else 0)
    n_layers = need("num_hidden_layers")

    act_key = "hidden_activation" if gemma else "hidden_act"
    act = hf.get(act_key) or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        problems.append(f"{act_key}={act!r} (supported: {sorted(_ACTIVATIONS)})")

    if hf.get("mlp_bias", False):
        problems.append("mlp_bias=True (biases in the MLP are not implemented)")
    attention_bias = bool(hf.get("attention_bias", False))
    if family.qkv_bias:
        attention_bias = True  # Qwen2 always has q/k/v biases, never an o bias
    elif attention_bias:
        problems.append(
            f"attention_bias=True on {model_type} (only Qwen2-style q/k/v biases are implemented)"
        )
    if hf.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=True (only causal attention is implemented)")
    if hf.get("quantization_config") is not None:
        problems.append("quantization_config (quantized HF checkpoints are not supported)")

    # ---- attention kinds and sliding windows ----
    window = hf.get("sliding_window")
    # Early Gemma 2 files also carry the window under its old name; it must agree.
    old_window = hf.get("sliding_window_size")
    if old_window is not None and old_window != window:
        problems.append(f"sliding_window_size={old_window!r} != sliding_window={window!r}")
    window, layer_types = family.layer_kinds(hf, n_layers, window, hf.get("layer_types"), problems)
    if layer_types is not None:
        layer_types = tuple(layer_types)
        if "sliding_attention" not in layer_types:
            window = None
        if all(t == "full_attention" for t in layer_types):
            layer_types = None

    rope_theta, rope_scaling, local_theta = read_hf_rope(
        hf, local_rope=family.local_rope, problems=problems
    )

    # ---- gemma extras ----
    attn_cap = hf.get("attn_logit_softcapping")
    final_cap = hf.get("final_logit_softcapping")
    qpas = hf.get("query_pre_attn_scalar")
    if not gemma:
        for key, val in (
            ("attn_logit_softcapping", attn_cap),
            ("final_logit_softcapping", final_cap),
            ("query_pre_attn_scalar", qpas),
        ):
            if val is not None:
                problems.append(f"{key}={val!r} on {model_type}")

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
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        activation=_ACTIVATIONS.get(act, "silu"),
        norm_plus_one=gemma,
        embed_scale=gemma,
        post_norms=gemma,
        qk_norm=family.qk_norm,
        attention_bias=attention_bias,
        attn_logit_softcap=attn_cap,
        final_logit_softcap=final_cap,
        query_pre_attn_scalar=qpas,
        sliding_window=window,
        layer_types=layer_types,
        max_position_embeddings=hf.get("max_position_embeddings") or 8192,
    )
    handled = COMMON | family.handles | HARMLESS
    unknown = sorted(k for k in hf if k not in handled)
    if unknown:
        problems.append(f"unhandled attributes {unknown}")
    if problems:
        raise UnsupportedConfigError(f"{model_type} config: " + "; ".join(problems))
    try:
        return ModelConfig(**config_kwargs)
    except ValueError as e:
        raise UnsupportedConfigError(f"{model_type} config: {e}") from e


def _unwrap(wrapper: Wrapper, hf: dict[str, Any]) -> dict[str, Any]:
    """The text config of a multimodal config, its tie_word_embeddings carried over."""
    extra = sorted(set(hf) - wrapper.handles)
    if "text_config" not in hf:
        raise UnsupportedConfigError(f"model_type={wrapper.model_type!r} config has no text_config")
    text = dict(hf["text_config"])
    text["model_type"] = wrapper.text_type
    if "tie_word_embeddings" in hf and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    if extra:
        raise UnsupportedConfigError(f"{wrapper.model_type} config: unhandled attributes {extra}")
    return text
