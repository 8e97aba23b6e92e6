"""ModelConfig: reading HF configs (both rope formats), refusing what is not implemented,
named sizes, parameter counts and abstract initialisation of the big configs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mup.models import NAMED_CONFIGS, UnsupportedConfigError, config_from_hf
from mup.models._config import RopeScaling
from mup.models._params import init_params, param_shapes
from mup.models._rope import rope_inv_freq

# Published config.json files (the fields that matter), in the flat pre-transformers-5 format
# that checkpoints on the hub still carry.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
GEMMA_3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 49152,
}


GEMMA_2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}


def _gemma3_text_defaults(cfg: dict) -> dict:
    # The fields Gemma3TextConfig defaults that the published file leaves out.
    return {"vocab_size": 262208, "rms_norm_eps": 1e-6, **cfg}


@pytest.mark.parametrize(
    ("name", "hf"),
    [
        ("llama-3.1-8b", LLAMA_31_8B),
        ("smollm2-135m", SMOLLM2_135M),
        ("gemma-2-2b", GEMMA_2_2B),
        (
            "gemma-3-27b",
            {**GEMMA_3_27B, "text_config": _gemma3_text_defaults(GEMMA_3_27B["text_config"])},
        ),
    ],
)
def test_published_config_json_gives_named_config(name, hf):
    cfg = config_from_hf(hf)
    named = NAMED_CONFIGS[name]
    # max_position_embeddings is informational; the gemma3 file leaves it to the default.
    assert dataclasses.replace(cfg, max_position_embeddings=0) == dataclasses.replace(
        named, max_position_embeddings=0
    )


def test_transformers5_config_dicts_read():
    tf = pytest.importorskip("transformers")
    for hf, check in [
        (tf.LlamaConfig(), lambda c: c.rope_theta == 10000.0 and not c.tie_embeddings),
        (
            tf.Gemma2Config(),
            lambda c: (
                c.attn_logit_softcap == 50.0
                and c.final_logit_softcap == 30.0
                and c.local_layers[:2] == (True, False)
                and c.norm_plus_one
                and c.activation == "gelu_tanh"
            ),
        ),
        (
            tf.Gemma3TextConfig(),
            lambda c: (
                c.local_rope_theta == 10000.0
                and c.rope_theta == 1e6
                and c.qk_norm
                and c.local_layers[5] is False
                and c.local_layers[4] is True
            ),
        ),
        (tf.Qwen2Config(), lambda c: c.attention_bias and c.sliding_window is None),
        (tf.MistralConfig(), lambda c: c.sliding_window == 4096 and all(c.local_layers)),
    ]:
        cfg = config_from_hf(hf.to_dict())
        assert check(cfg), (type(hf).__name__, cfg)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"sliding_window": 4096, "use_sliding_window": True}, "sliding_window=4096"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"some_new_knob": 3}, "some_new_knob"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        (
            {"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ],
)
def test_unhandled_attributes_are_refused_by_name(patch, message):
    with pytest.raises(UnsupportedConfigError, match=message.replace("(", r"\(")):
        config_from_hf({**SMOLLM2_135M, **patch})


def test_every_problem_is_named_at_once():
    bad = {**SMOLLM2_135M, "mlp_bias": True, "foo": 1, "rope_scaling": {"rope_type": "yarn"}}
    with pytest.raises(UnsupportedConfigError) as err:
        config_from_hf(bad)
    text = str(err.value)
    assert "mlp_bias" in text and "foo" in text and "yarn" in text


def test_llama3_inverse_frequencies_match_transformers():
    torch = pytest.importorskip("torch", reason="torch is the rope reference")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k != "rope_scaling"})
    hf.rope_parameters = {**LLAMA_31_8B["rope_scaling"], "rope_theta": 500000.0}
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(NAMED_CONFIGS["llama-3.1-8b"])
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    # The scaling really changes the low frequencies and keeps the high ones.
    plain = rope_inv_freq(dataclasses.replace(NAMED_CONFIGS["llama-3.1-8b"], rope_scaling=None))
    assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1] / 8.0)


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-3.1-70b", 70.55),
        ("gemma-3-27b", 27.01),
        ("llama-3.1-8b", 8.03),
        ("llama-3.2-1b", 1.24),
        ("gemma-2-2b", 2.61),
        ("smollm2-135m", 0.1349),
    ],
)
def test_named_configs_build_abstractly_with_published_sizes(name, billions):
    cfg = NAMED_CONFIGS[name]
    abstract = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(a, jax.ShapeDtypeStruct) and a.dtype == jnp.bfloat16 for a in leaves)
    count = sum(math.prod(a.shape) for a in leaves)
    assert count == cfg.param_count()
    assert count / 1e9 == pytest.approx(billions, rel=0.01)
    assert abstract["layers"]["q"].shape == (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
    )


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = NAMED_CONFIGS["llama-3.1-8b"]
    # Llama-3.1-8B per block: q 4096x4096, k/v 4096x1024, o 4096x4096, MLP 3 x 4096x14336.
    block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert cfg.flops_per_token() == 2 * (32 * block + 128256 * 4096)
    # Capture at layer 8 costs a quarter of the blocks and no LM head.
    assert cfg.flops_per_token(8) == 2 * 8 * block
    longer = cfg.flops_per_token(seq_len=1023) - cfg.flops_per_token(seq_len=0)
    assert longer == pytest.approx(4 * cfg.n_heads * cfg.head_dim * 512 * cfg.n_layers)
    # Sliding layers attend to at most the window.
    g = NAMED_CONFIGS["gemma-2-2b"]
    extra = g.flops_per_token(seq_len=16383) - g.flops_per_token(seq_len=0)
    per_key = 4 * g.n_heads * g.head_dim
    assert extra == pytest.approx(per_key * (13 * 8192 + 13 * 4096))


def test_invalid_config_values_are_rejected():
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        dataclasses.replace(NAMED_CONFIGS["smollm2-135m"], n_kv_heads=4)
    with pytest.raises(ValueError, match="no sliding_window"):
        dataclasses.replace(NAMED_CONFIGS["smollm2-135m"], layer_types=("sliding_attention",) * 30)
    cfg = NAMED_CONFIGS["gemma-3-27b"]
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=8.0)
    assert param_shapes(cfg)["layers"]["q_norm"] == (62, 128)
