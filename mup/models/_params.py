"""The parameter pytree: shapes, random init, and the strict mapping from HF tensor names.

Axis letters: L layers, D model, N heads, K kv heads, H head dim, F MLP hidden, V vocab.

    params["embed"]                 [V, D]      model.embed_tokens.weight
    params["layers"]["attn_norm"]   [L, D]      model.layers.{i}.input_layernorm.weight
    params["layers"]["q"]           [L, D, N, H] ...self_attn.q_proj.weight [N*H, D], transposed
    params["layers"]["k"], ["v"]    [L, D, K, H] ...self_attn.{k,v}_proj.weight [K*H, D]
    params["layers"]["o"]           [L, N, H, D] ...self_attn.o_proj.weight [D, N*H], transposed
    params["layers"]["q_bias"] ...  [L, N, H] / [L, K, H]   (Qwen2) ...{q,k,v}_proj.bias
    params["layers"]["q_norm"], ["k_norm"]   [L, H]   (Gemma 3) ...self_attn.{q,k}_norm.weight
    params["layers"]["post_attn_norm"]  [L, D]  (Gemma) ...post_attention_layernorm.weight
    params["layers"]["mlp_norm"]    [L, D]      llama: ...post_attention_layernorm.weight,
                                                gemma: ...pre_feedforward_layernorm.weight
    params["layers"]["post_mlp_norm"]   [L, D]  (Gemma) ...post_feedforward_layernorm.weight
    params["layers"]["gate"], ["up"]    [L, D, F]   ...mlp.{gate,up}_proj.weight [F, D], transposed
    params["layers"]["down"]        [L, F, D]   ...mlp.down_proj.weight [D, F], transposed
    params["final_norm"]            [D]         model.norm.weight
    params["lm_head"]               [D, V]      lm_head.weight [V, D], transposed (untied only)

Norm weights are stored as in the checkpoint (Gemma's "1 + w" is applied in the forward pass).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mup.models._config import ModelConfig
from mup.models._shapes import is_shape, param_shapes
from mup.models._sharding import param_partition_specs

# (parameter name under params["layers"], HF suffix after "model.layers.{i}.")
Transform = Callable[[np.ndarray], np.ndarray]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32):
    """Random parameters (normal, std 0.02; norms at their identity value).

    Use under `jax.eval_shape` to get abstract shapes of big models without allocating.
    """
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]
    ]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys, strict=True):
        if "norm" in path:
            identity = 0.0 if config.norm_plus_one else 1.0
            out.append(jnp.full(shape, identity, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ---- HF name mapping -----------------------------------------------------------------------


def _layer_table(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Transform]]:
    """HF suffix (after "model.layers.{i}.") -> (our layer param, HF shape, numpy transform)."""
    D, N, K, H, F = (
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.d_ff,
    )

    def heads(n: int) -> Transform:
        return lambda w: w.T.reshape(D, n, H)  # [n*H, D] -> [D, n, H]

    table: dict[str, tuple[str, tuple[int, ...], Transform]] = {
        "input_layernorm.weight": ("attn_norm", (D,), _same),
        "self_attn.q_proj.weight": ("q", (N * H, D), heads(N)),
        "self_attn.k_proj.weight": ("k", (K * H, D), heads(K)),
        "self_attn.v_proj.weight": ("v", (K * H, D), heads(K)),
        "self_attn.o_proj.weight": ("o", (D, N * H), lambda w: w.T.reshape(N, H, D)),
        "mlp.gate_proj.weight": ("gate", (F, D), _transpose),
        "mlp.up_proj.weight": ("up", (F, D), _transpose),
        "mlp.down_proj.weight": ("down", (D, F), _transpose),
    }
    if config.post_norms:
        # Gemma's sandwich norms: "post_attention_layernorm" really is post-attention here,
        # whereas in Llama it is the pre-MLP norm.
        table["post_attention_layernorm.weight"] = ("post_attn_norm", (D,), _same)
        table["pre_feedforward_layernorm.weight"] = ("mlp_norm", (D,), _same)
        table["post_feedforward_layernorm.weight"] = ("post_mlp_norm", (D,), _same)
    else:
        table["post_attention_layernorm.weight"] = ("mlp_norm", (D,), _same)
    if config.attention_bias:
        table["self_attn.q_proj.bias"] = ("q_bias", (N * H,), lambda b: b.reshape(N, H))
        table["self_attn.k_proj.bias"] = ("k_bias", (K * H,), lambda b: b.reshape(K, H))
        table["self_attn.v_proj.bias"] = ("v_bias", (K * H,), lambda b: b.reshape(K, H))
    if config.qk_norm:
        table["self_attn.q_norm.weight"] = ("q_norm", (H,), _same)
        table["self_attn.k_norm.weight"] = ("k_norm", (H,), _same)
    return table


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


# Prefixes under which multimodal wrappers (Gemma 3) keep the text model.
_PREFIX_ALIASES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
# Tensors that are not part of the text decoder: vision towers of multimodal checkpoints and
# rotary tables that old checkpoints saved as buffers (recomputed from the config here).
_IGNORED = re.compile(
    r"^(model\.)?(vision_tower|vision_model|multi_modal_projector)\.|\.rotary_emb\.inv_freq$"
)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def canonical_hf_name(name: str) -> str:
    for old, new in _PREFIX_ALIASES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def params_from_hf(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
):
    """Build the parameter pytree from HF-named tensors, consumed one at a time.

    Each tensor is cast to `dtype` and placed on device (sharded over `mesh` with
    `param_partition_specs` when given) as soon as it arrives, so the host never holds more
    than one checkpoint tensor in float32. Stacked [L, ...] arrays are assembled on device at
    the end, one parameter name at a time. Raises ValueError naming any missing, duplicated,
    unexpected or mis-shaped tensor.
    """
    shapes = param_shapes(config)
    specs = param_partition_specs(config, mesh=mesh) if mesh is not None else None
    table = _layer_table(config)
    dtype = jnp.dtype(dtype)

    def place(arr: np.ndarray, spec) -> jax.Array:
        host = np.asarray(arr).astype(dtype, copy=False)
        if mesh is None:
            return jax.device_put(host)
        return jax.device_put(host, jax.sharding.NamedSharding(mesh, spec))

    def layer_spec(name: str):
        if specs is None:
            return None
        full = specs["layers"][name]
        return jax.sharding.PartitionSpec(*tuple(full)[1:])

    top: dict[str, jax.Array] = {}
    per_layer: dict[str, list[jax.Array | None]] = {
        name: [None] * config.n_layers for name in shapes["layers"]
    }
    seen: set[str] = set()
    problems: list[str] = []
    for raw_name, arr in tensors:
        name = canonical_hf_name(raw_name)
        if _IGNORED.search(name):
            continue
        if name in seen:
            problems.append(f"{raw_name}: appears twice")
            continue
        seen.add(name)
        shape = tuple(np.shape(arr))
        if name == "model.embed_tokens.weight":
            target, key, fn = shapes["embed"], "embed", _same
        elif name == "model.norm.weight":
            target, key, fn = shapes["final_norm"], "final_norm", _same
        elif name == "lm_head.weight":
            if config.tie_embeddings:
                continue  # a tied checkpoint may still store the duplicate; the embedding wins
            target, key, fn = shapes["lm_head"][::-1], "lm_head", _transpose
        else:
            m = _LAYER_KEY.match(name)
            if not m or m.group(2) not in table:
                problems.append(f"{raw_name}: unexpected tensor for this config")
                continue
            i = int(m.group(1))
            if i >= config.n_layers:
                problems.append(f"{raw_name}: layer {i} >= n_layers={config.n_layers}")
                continue
            pname, want, fn = table[m.group(2)]
            if shape != want:
                problems.append(f"{raw_name}: shape {shape}, expected {want}")
                continue
            per_layer[pname][i] = place(fn(np.asarray(arr)), layer_spec(pname))
            continue
        want = target
        if shape != tuple(want):
            problems.append(f"{raw_name}: shape {shape}, expected {tuple(want)}")
            continue
        top[key] = place(fn(np.asarray(arr)), None if specs is None else specs[key])

    top_names = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm"}
    if not config.tie_embeddings:
        top_names["lm_head.weight"] = "lm_head"
    for hf_name in top_names:
        if hf_name not in seen:  # (seen but mis-shaped was reported above)
            problems.append(f"missing {hf_name}")
    hf_of = {pname: suffix for suffix, (pname, _, _) in table.items()}
    for pname, slots in per_layer.items():
        missing = [i for i, a in enumerate(slots) if a is None]
        if missing and len(missing) <= 4:
            problems.extend(f"missing model.layers.{i}.{hf_of[pname]}" for i in missing)
        elif missing:
            problems.append(f"missing model.layers.*.{hf_of[pname]} for {len(missing)} layers")
    if problems:
        raise ValueError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

    layers = {}
    for pname, slots in per_layer.items():
        if specs is None:
            layers[pname] = jnp.stack(slots)
        else:
            sharding = jax.sharding.NamedSharding(mesh, specs["layers"][pname])
            layers[pname] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*slots)
        per_layer[pname] = []  # drop the per-layer pieces before stacking the next name
    params = {"embed": top["embed"], "layers": layers, "final_norm": top["final_norm"]}
    if not config.tie_embeddings:
        params["lm_head"] = top["lm_head"]
    return params


def hf_tensors_from_params(config: ModelConfig, params) -> Iterable[tuple[str, np.ndarray]]:
    """The inverse of `params_from_hf`: HF-named numpy tensors, one at a time.

    Used to write checkpoints that transformers can read and to round-trip test the mapping.
    """
    D = config.d_model
    yield "model.embed_tokens.weight", np.asarray(params["embed"])
    for suffix, (pname, hf_shape, _) in _layer_table(config).items():
        stacked = params["layers"][pname]
        for i in range(config.n_layers):
            w = np.asarray(stacked[i])
            if pname in ("q", "k", "v"):
                w = w.reshape(D, -1).T  # [D, n, H] -> [n*H, D]
            elif pname == "o":
                w = w.reshape(-1, D).T  # [N, H, D] -> [D, N*H]
            elif pname in ("gate", "up", "down"):
                w = w.T
            yield f"model.layers.{i}.{suffix}", w.reshape(hf_shape)
    yield "model.norm.weight", np.asarray(params["final_norm"])
    if not config.tie_embeddings:
        yield "lm_head.weight", np.asarray(params["lm_head"]).T
