"""Partition specs, and the forward pass under an 8-device ("data"=2, "model"=4) CPU mesh.

The mesh test runs in a subprocess: XLA_FLAGS must be set before jax is imported, and this
process has imported jax already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _support.configs import tiny_config
from jax.sharding import PartitionSpec as P

from mup.models import NAMED_CONFIGS
from mup.models._params import hf_tensors_from_params, init_params, params_from_hf
from mup.models._sharding import param_partition_specs

TINY = tiny_config(vocab_size=128, d_model=64, head_dim=16, d_ff=128)


def test_specs_split_heads_mlp_and_vocab_over_model():
    specs = param_partition_specs(NAMED_CONFIGS["llama-3.1-70b"])
    assert specs["layers"]["q"] == P(None, None, "model", None)  # [L, D, N, H]
    assert specs["layers"]["k"] == P(None, None, "model", None)  # [L, D, K, H]
    assert specs["layers"]["o"] == P(None, "model", None, None)  # [L, N, H, D]
    assert specs["layers"]["gate"] == P(None, None, "model")  # [L, D, F]
    assert specs["layers"]["down"] == P(None, "model", None)  # [L, F, D]
    assert specs["embed"] == P("model", None) and specs["lm_head"] == P(None, "model")
    assert specs["layers"]["attn_norm"] == P(None, None)
    params_tree = jax.eval_shape(
        lambda k: init_params(NAMED_CONFIGS["llama-3.1-70b"], k), jax.random.key(0)
    )
    assert jax.tree.structure(params_tree) == jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, P)
    )


@pytest.fixture(scope="module")
def tiny_params():
    # One jitted init: op-by-op random draws would compile one kernel per parameter shape.
    return jax.jit(lambda k: init_params(TINY, k))(jax.random.key(1))


def test_hf_mapping_round_trips(tiny_params):
    params = tiny_params
    again = params_from_hf(TINY, hf_tensors_from_params(TINY, params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_from_hf_names_missing_and_extra_tensors(tiny_params):
    tensors = dict(hf_tensors_from_params(TINY, tiny_params))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    del tensors["lm_head.weight"]
    items = [*tensors.items(), ("model.norm.weight", tensors["model.norm.weight"])]
    try:
        params_from_hf(TINY, items)
    except ValueError as e:
        text = str(e)
    else:
        raise AssertionError("a broken checkpoint was accepted")
    assert "missing model.layers.1.mlp.up_proj.weight" in text
    assert "model.layers.0.self_attn.q_proj.bias: unexpected tensor" in text
    assert "model.layers.0.self_attn.k_proj.weight: shape (16, 64), expected (32, 64)" in text
    assert "missing lm_head.weight" in text
    assert "model.norm.weight: appears twice" in text


_SCRIPT = textwrap.dedent(
    """
    import json, time
    start = time.time()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P, NamedSharding
    from mup.models import ModelConfig, NAMED_CONFIGS
    from mup.models._params import init_params, params_from_hf, hf_tensors_from_params
    from mup.models._sharding import (
        make_mesh, shard_params, batch_sharding, cache_sharding, bytes_per_device)
    from mup.models._transformer import jit_forward, KVCache

    assert jax.device_count() == 8, jax.devices()
    results = {}
    for name, kv in (("gqa", 4), ("mqa", 1)):
        cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=kv,
                          head_dim=16, d_ff=128, rope_theta=1e4, rms_norm_eps=1e-5,
                          tie_embeddings=False)
        init = jax.jit(lambda k: jax.tree.map(lambda a: a * 5, init_params(cfg, k)))
        params = init(jax.random.key(0))
        rng = np.random.RandomState(0)
        tok = jnp.asarray(rng.randint(0, 128, (4, 16)), jnp.int32)
        pos = jnp.asarray(np.tile(np.arange(16, dtype=np.int32), (4, 1)))
        ref = jit_forward(params, tok, pos, config=cfg, capture=(1,))

        mesh = make_mesh(4)  # ("data"=2, "model"=4)
        sharded = params_from_hf(cfg, hf_tensors_from_params(cfg, params), mesh=mesh)
        q = sharded["layers"]["q"]
        k = sharded["layers"]["k"]
        results[name + "_q_spec"] = str(q.sharding.spec)
        results[name + "_q_shard"] = list(q.addressable_shards[0].data.shape)
        results[name + "_k_shard"] = list(k.addressable_shards[0].data.shape)
        results[name + "_k_spec"] = str(k.sharding.spec)
        tok_s = jax.device_put(tok, batch_sharding(mesh))
        pos_s = jax.device_put(pos, batch_sharding(mesh))
        out = jit_forward(sharded, tok_s, pos_s, config=cfg, capture=(1,))
        results[name + "_logits"] = float(jnp.abs(out.logits - ref.logits).max())
        results[name + "_hidden"] = float(jnp.abs(out.hidden[1] - ref.hidden[1]).max())
        results[name + "_logits_scale"] = float(jnp.abs(ref.logits).max())
        results[name + "_hidden_scale"] = float(jnp.abs(ref.hidden[1]).max())
        results[name + "_cached_scale"] = results[name + "_logits_scale"]

        results[name + "_seconds"] = time.time() - start
        if name == "mqa":
            continue
        # Cached decode on the mesh: prefill 12, then 4 single tokens.
        cache = jax.device_put(KVCache.create(cfg, 4, 16), cache_sharding(cfg, mesh))
        o = jit_forward(sharded, tok_s[:, :12], pos_s[:, :12], config=cfg, cache=cache)
        steps, cache = [o.logits], o.cache
        for t in range(12, 16):
            o = jit_forward(sharded, tok_s[:, t:t+1], pos_s[:, t:t+1], config=cfg, cache=cache)
            steps.append(o.logits)
            cache = o.cache
        cached = jnp.concatenate(steps, axis=1)
        results[name + "_cached"] = float(jnp.abs(cached - ref.logits).max())
        results[name + "_cached_seconds"] = time.time() - start

    mesh8 = make_mesh(8)
    results["gb_70b_per_device"] = bytes_per_device(NAMED_CONFIGS["llama-3.1-70b"], mesh8) / 1e9
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.mark.slow
def test_forward_on_8_device_mesh_equals_unsharded(tmp_path):
    script = tmp_path / "mesh_check.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS"))
    r = json.loads(line.removeprefix("RESULTS"))
    assert r["gqa_q_spec"] == str(P(None, None, "model", None))
    assert r["gqa_q_shard"] == [2, 64, 2, 16]  # [L, D, N, H]: 8 heads over model=4
    assert r["gqa_k_shard"] == [2, 64, 1, 16]  # 4 kv heads over model=4
    assert r["mqa_k_spec"] == str(P(None, None, None, None))  # one kv head: replicated
    assert r["mqa_k_shard"] == [2, 64, 1, 16]
    for name in ("gqa", "mqa"):
        assert r[f"{name}_logits_scale"] > 0.5
        for what in ("logits", "hidden", "cached")[: 3 if name == "gqa" else 2]:
            # All-reduces sum the sharded matmuls in another order: float32 rounding only
            # (measured ~1e-6 to 3e-6 relative to the largest value).
            assert r[f"{name}_{what}"] <= 1e-5 * r[f"{name}_{what}_scale"], (name, what, r)
    # 70B bfloat16 over 8 devices: ~141 GB / 8.
    assert 17.0 < r["gb_70b_per_device"] < 18.0
