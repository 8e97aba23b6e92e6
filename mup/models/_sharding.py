"""Device meshes and parameter partition specs (tensor parallel over "model", batch over "data").

Axis letters: L layers, D model, N heads, K kv heads, H head dim, F MLP hidden, V vocab.

Layout (Megatron-style tensor parallelism expressed as GSPMD shardings):

    q [L, D, N, H] / o [L, N, H, D]   heads N over "model"
    k, v [L, D, K, H]                 kv heads K over "model" (replicated if K % model != 0)
    gate, up [L, D, F] / down [L, F, D]   MLP hidden F over "model"
    embed [V, D] / lm_head [D, V]     vocab V over "model"
    norms, biases of replicated axes  replicated
    activations                       batch B over "data"

Each block then needs one all-reduce after `o` and one after `down` (XLA inserts them), and
the attention itself is local to a device because whole heads live on it.

How a 70B model is laid out (Llama-3.1-70B: D=8192, N=64, K=8, H=128, F=28672, L=80,
~141 GB of bfloat16 weights):

* 8 GPUs of 80 GB, mesh ("data"=1, "model"=8): every device holds 8 query heads, 1 kv head,
  F/8 = 3584 MLP columns of every layer and V/8 of the embedding and LM head: ~17.6 GB of
  weights per GPU, leaving ~60 GB for activations and the KV cache (one kv head per device, so
  the cache is also split 8 ways). Weights stream from the checkpoint tensor by tensor straight
  into these shards (`params_from_hf(..., mesh=mesh)`), never a full host copy.
* A TPU v5e-16 slice (16 GB HBM per chip): one replica per 8 chips does not fit (17.6 GB >
  16 GB), so use ("data"=1, "model"=16): 4 query heads and F/16 MLP columns per chip; the 8 kv
  heads do not divide 16, so k/v are replicated (2.7 GB in all) and each chip holds ~11.3 GB,
  leaving ~4.7 GB for activations and the cache. On a v5p slice (95 GB per chip) use
  ("data"=4, "model"=4), ~35.3 GB per chip, and four replicas for batch-parallel extraction.
  `bytes_per_device(config, mesh)` computes these numbers for any mesh.
* Activations [B, T, D] are sharded over "data"; with "model" > 1 the residual stream is
  replicated across the model axis between blocks, which is what the capture output returns.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mup.models._config import ModelConfig
from mup.models._shapes import is_shape, param_shapes
from mup.models._transformer import KVCache

P = PartitionSpec


def make_mesh(
    model_parallel: int | None = None,
    *,
    devices=None,
    axis_names: tuple[str, str] = ("data", "model"),
) -> Mesh:
    """A 2-D ("data", "model") mesh over `devices` (default: all devices).

    `model_parallel` devices share one model replica; the rest replicate it over "data".
    Default: all devices on "model" (the layout that fits the biggest models).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    mp = n if model_parallel is None else int(model_parallel)
    if mp < 1 or n % mp:
        raise ValueError(f"model_parallel={mp} does not divide the {n} available devices")
    grid = np.asarray(devices, dtype=object).reshape(n // mp, mp)
    return Mesh(grid, axis_names)


def param_partition_specs(
    config: ModelConfig,
    mesh_axes: tuple[str, str] = ("data", "model"),
    *,
    mesh: Mesh | None = None,
):
    """Pytree of PartitionSpec matching the parameter pytree (see module docstring).

    With `mesh`, an axis whose size the "model" axis does not divide is replicated instead
    (e.g. a single MQA kv head); without it every listed axis is sharded.
    """
    _, model = mesh_axes
    size = None if mesh is None else mesh.shape[model]

    def split(n: int):
        return model if size is None or n % size == 0 else None

    N, K, F, V = config.n_heads, config.n_kv_heads, config.d_ff, config.vocab_size
    layer_specs = {
        "attn_norm": P(None, None),
        "q": P(None, None, split(N), None),
        "k": P(None, None, split(K), None),
        "v": P(None, None, split(K), None),
        "o": P(None, split(N), None, None),
        "mlp_norm": P(None, None),
        "gate": P(None, None, split(F)),
        "up": P(None, None, split(F)),
        "down": P(None, split(F), None),
        "q_bias": P(None, split(N), None),
        "k_bias": P(None, split(K), None),
        "v_bias": P(None, split(K), None),
        "q_norm": P(None, None),
        "k_norm": P(None, None),
        "post_attn_norm": P(None, None),
        "post_mlp_norm": P(None, None),
    }
    shapes = param_shapes(config)
    specs = {
        "embed": P(split(V), None),
        "layers": {name: layer_specs[name] for name in shapes["layers"]},
        "final_norm": P(None),
    }
    if "lm_head" in shapes:
        specs["lm_head"] = P(None, split(V))
    return specs


def shard_params(params, config: ModelConfig, mesh: Mesh):
    """Place an existing parameter pytree onto `mesh` with `param_partition_specs`."""
    specs = param_partition_specs(config, mesh=mesh)
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)


def batch_sharding(mesh: Mesh, ndim: int = 2, data_axis: str = "data") -> NamedSharding:
    """Sharding for a batch-major array: axis 0 over "data", the rest replicated."""
    return NamedSharding(mesh, P(data_axis, *([None] * (ndim - 1))))


def bytes_per_device(config: ModelConfig, mesh: Mesh, itemsize: int = 2) -> int:
    """Parameter bytes each device holds under `param_partition_specs` (for planning)."""
    shapes = param_shapes(config)
    specs = param_partition_specs(config, mesh=mesh)
    total = 0
    for shape, spec in zip(
        jax.tree.leaves(shapes, is_leaf=is_shape), jax.tree.leaves(specs), strict=True
    ):
        n = math.prod(shape)
        for axis in spec:
            if axis is not None:
                n //= mesh.shape[axis]
        total += n
    return total * itemsize


def cache_sharding(config: ModelConfig, mesh: Mesh, mesh_axes=("data", "model")):
    """Shardings for a `KVCache` on `mesh`: batch over "data", kv heads over "model"."""
    data, model = mesh_axes
    heads = model if config.n_kv_heads % mesh.shape[model] == 0 else None
    kv = NamedSharding(mesh, P(None, data, heads, None, None))  # [L, B, K, S, H]
    return KVCache(
        k=kv,
        v=kv,
        valid=NamedSharding(mesh, P(data, None)),  # [B, S]
        index=NamedSharding(mesh, P()),
    )
