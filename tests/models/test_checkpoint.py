"""Checkpoint readers against the files transformers writes and the GGUF files gguf writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mup._resolve import resolve_spec
from mup.models._checkpoint import CheckpointError, iter_hf_tensors, read_hf_config

torch = pytest.importorskip("torch", reason="torch is the parity reference")
transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoints")

TINY = dict(
    vocab_size=64,
    # Multiples of 32 so that GGUF block quantisations (Q8_0) apply to every matrix.
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _save_tiny(path, *, tie: bool, dtype, max_shard_size=None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    return path, _save_tiny(path, tie=False, dtype=torch.float32)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    # bfloat16 checks the ml_dtypes path; a few KB per shard forces several shards.
    return path, _save_tiny(path, tie=True, dtype=torch.bfloat16, max_shard_size="8KB")


def _as_numpy(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _raw(array):
    return array.view(np.int16) if array.dtype.name == "bfloat16" else array


def test_single_file_equals_state_dict(single_dir):
    path, state = single_dir
    resolved = resolve_spec(path)
    ours = dict(iter_hf_tensors(resolved))
    assert set(ours) == set(state)  # untied: lm_head.weight is saved too
    for name, tensor in state.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
    config = read_hf_config(resolved)
    assert config == json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == TINY["hidden_size"]


def test_sharded_bfloat16_equals_state_dict(sharded_dir):
    path, state = sharded_dir
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = dict(iter_hf_tensors(resolve_spec(path)))
    # Tied embeddings: transformers does not save lm_head.weight.
    assert set(ours) == set(state) - {"lm_head.weight"}
    for name in ours:
        assert ours[name].dtype.name == "bfloat16"
        np.testing.assert_array_equal(_raw(ours[name]), _as_numpy(state[name]), err_msg=name)


def test_names_subset_and_missing_name(sharded_dir):
    path, state = sharded_dir
    want = ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    got = dict(iter_hf_tensors(resolve_spec(path), names=want))
    assert sorted(got) == sorted(want)
    with pytest.raises(CheckpointError, match="model.layers.7.mlp.up_proj.weight"):
        list(
            iter_hf_tensors(resolve_spec(path), names=[*want, "model.layers.7.mlp.up_proj.weight"])
        )


def _copy_dir(src, dst):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_missing_shard_fails_before_reading(sharded_dir, tmp_path):
    path, _ = sharded_dir
    broken = _copy_dir(path, tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    stream = iter_hf_tensors(resolve_spec(broken))
    with pytest.raises(CheckpointError, match=f"shard .*{victim} is missing"):
        next(stream)


def test_truncated_shard(sharded_dir, tmp_path):
    path, _ = sharded_dir
    broken = _copy_dir(path, tmp_path / "truncated")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = broken / sorted(set(index["weight_map"].values()))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        list(iter_hf_tensors(resolve_spec(broken)))


def test_corrupt_header_and_index(single_dir, tmp_path):
    path, _ = single_dir
    broken = _copy_dir(path, tmp_path / "garbage")
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        list(iter_hf_tensors(resolve_spec(broken)))
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        list(iter_hf_tensors(resolve_spec(broken)))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        list(iter_hf_tensors(resolve_spec(tmp_path)))
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_hf_config(resolve_spec(tmp_path))


# --- GGUF ------------------------------------------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows (independent re-statement)."""
    out, rest = weight.shape[0], weight.shape[1:]
    return (
        weight.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)
    )


def _write_tiny_gguf(path, state, *, arch="llama", extra_kv=None, qtype=None):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(TINY["num_attention_heads"])
    writer.add_head_count_kv(TINY["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(TINY["hidden_size"] // TINY["num_attention_heads"])
    writer.add_vocab_size(TINY["vocab_size"])
    for key, value in (extra_kv or {}).items():
        writer.add_uint32(key, value)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for hf_name, tensor in state.items():
        array = tensor.float().numpy()
        if hf_name.startswith("model.layers."):
            _, _, layer, rest = hf_name.split(".", 3)
            module = rest.removesuffix(".weight")
            gguf_name = f"blk.{layer}.{block[module]}.weight"
            if module == "self_attn.q_proj":
                array = _llama_cpp_permute(array, TINY["num_attention_heads"])
            if module == "self_attn.k_proj":
                array = _llama_cpp_permute(array, TINY["num_key_value_heads"])
        else:
            gguf_name = names[hf_name]
        if qtype is not None and array.ndim == 2 and qtype in gguf.quants._type_traits:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif qtype is not None and array.ndim == 2:
            # A type the gguf package cannot (de)quantize: raw zero bytes of the right size.
            raw = np.zeros(gguf.quants.quant_shape_to_byte_shape(array.shape, qtype), np.uint8)
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(
                gguf_name, array.astype(np.float16 if array.ndim == 2 else np.float32)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_roundtrip_undoes_rope_permutation(single_dir, tmp_path):
    _, state = single_dir
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", state)
    resolved = resolve_spec(path)
    ours = dict(iter_hf_tensors(resolved))
    assert set(ours) == set(state)
    for name, tensor in state.items():
        # The writer stored matrices as float16: the reader must return exactly those values.
        expected = tensor.numpy().astype(np.float16 if tensor.ndim == 2 else np.float32)
        np.testing.assert_array_equal(ours[name], expected.astype(np.float32), err_msg=name)
    config = read_hf_config(resolved)
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4,
        2,
        16,
    )


def test_gguf_errors(single_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    _, state = single_dir
    qwen = _write_tiny_gguf(tmp_path / "qwen.gguf", state, arch="qwen2")
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported"):
        read_hf_config(resolve_spec(qwen))
    moe = _write_tiny_gguf(tmp_path / "moe.gguf", state, extra_kv={"llama.expert_count": 8})
    with pytest.raises(CheckpointError, match="llama.expert_count=8"):
        list(iter_hf_tensors(resolve_spec(moe)))
    # Q8_0 dequantizes; tensors are then close to, not equal to, the originals.
    q8 = _write_tiny_gguf(tmp_path / "q8.gguf", state, qtype=gguf.GGMLQuantizationType.Q8_0)
    got = dict(iter_hf_tensors(resolve_spec(q8)))
    np.testing.assert_allclose(
        got["model.layers.0.self_attn.q_proj.weight"],
        state["model.layers.0.self_attn.q_proj.weight"].numpy(),
        atol=2e-3,
    )
    q81 = _write_tiny_gguf(tmp_path / "q81.gguf", state, qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(CheckpointError, match="quantisation Q8_1"):
        list(iter_hf_tensors(resolve_spec(q81)))
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_hf_config(resolve_spec(not_gguf))
