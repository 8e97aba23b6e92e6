"""Building blocks of the llama-like decoder, as pure functions over arrays.

Axis letters: B batch, T tokens (query), S key slots, D model, N heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP hidden.

Numerics follow transformers: norms, rotary tables, attention scores and softmax are computed
in float32 and cast back to the activation dtype where transformers casts back; matrix products
of half-precision operands accumulate in float32 and round once (`project`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mup.models._config import ModelConfig
from mup.models._rope import rope_inv_freq

# Additive score for masked keys. Finite, so a query with no visible key (a fully padded row)
# gets a uniform softmax instead of NaN; such rows are padding and never read.
_MASKED = -1e30


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` in its usual result dtype; half-precision operands accumulate
    in float32 and round once at the end (as torch and cuBLAS do).

    Why: XLA CPU (AVX512-BF16) runs a bfloat16 dot with a bfloat16 result at about half the rate
    of one with a float32 result, which is faster than a float32 dot; the bfloat16 forward gains
    as much (benchmarks/bench_capture.py). float32 operands take the plain einsum, unchanged.
    """
    dtype = jnp.result_type(x, w)
    if jnp.finfo(dtype).bits >= 32:
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, plus_one: bool) -> jax.Array:
    """x [..., D] -> [..., D] (or [..., H] -> [..., H] for per-head q/k norms)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        # Gemma scales in float32 and casts once: (x * (1 + w)).to(dtype).
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    # Llama casts the normalised x first, then scales in the weight dtype.
    return weight * y.astype(x.dtype)


def rope_tables(
    config: ModelConfig, positions: jax.Array, *, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> (cos, sin) [B, T, H/2] float32."""
    inv_freq = jnp.asarray(rope_inv_freq(config, local=local))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H] with (cos, sin) [B, T, H/2]; rotate-half convention (HF, not interleaved)."""
    cos = cos[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)  # [B, T, N, H/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(
    q_slots: jax.Array, k_slots: jax.Array, k_valid: jax.Array, *, window: int | None
) -> jax.Array:
    """Which keys each query sees: [B, T, S] bool.

    q_slots [T] (shared by all rows: rows are padded, never shifted) or [B, T] (per row: the
    engine's slots each write at their own cache index) and k_slots [S] are cache slot
    indices, k_valid [B, S] marks real tokens. Causal; with `window`, a query sees the
    `window` most recent slots including itself (transformers: kv > q - window).
    """
    q = q_slots[None, :] if q_slots.ndim == 1 else q_slots  # [1 or B, T]
    allowed = k_slots[None, None, :] <= q[:, :, None]  # [1 or B, T, S]
    if window is not None:
        allowed &= k_slots[None, None, :] > q[:, :, None] - window
    return allowed & k_valid[:, None, :]  # [B, T, S]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]."""
    return attention_heads_major(
        q, heads_major(k), heads_major(v), mask, scale=scale, logit_softcap=logit_softcap
    )


def heads_major(x: jax.Array) -> jax.Array:
    """[B, S, K, H] -> [B, K, S, H]: every kv head's keys contiguous, so that both attention
    products are plain batched matrix products over (B, K). The KV cache is kept in this
    layout (a per-step copy of the whole cache cut `mup serve`'s batched decode from 83 to 57
    tokens/s)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def attention_heads_major(
    q: jax.Array,
    kh: jax.Array,
    vh: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
) -> jax.Array:
    """q [B, T, N, H], kh/vh [B, K, S, H] (heads major), mask [B, T, S] -> [B, T, N, H].

    The G query heads sharing a kv head are stacked with the queries, M = G * T rows, so each
    (B, K) pair is one [M, H] x [H, S] and one [M, S] x [S, H] product. Why: XLA CPU ran the
    5-D einsums ("btkgh,bskh->bkgts", "bkgts,bskh->btkgh") at 32 and 132 GFLOP/s in bfloat16
    where these layouts run at 73 and 319 ([4, 128 queries, 2048 keys], SmolLM2 heads).
    """
    B, T, N, H = q.shape
    K, S = kh.shape[1], kh.shape[2]
    G = N // K
    qh = jnp.transpose(q.reshape(B, T, K, G, H), (0, 2, 3, 1, 4)).reshape(B, K, G * T, H)
    scores = jnp.einsum("bkmh,bksh->bkms", qh, kh, preferred_element_type=jnp.float32)
    scores = softcap(scores * scale, logit_softcap).reshape(B, K, G, T, S)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype).reshape(B, K, G * T, S)
    out = project("bkms,bksh->bkmh", probs, vh).reshape(B, K, G, T, H)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, H)


def attention_cache_and_new(
    q: jax.Array,
    kh: jax.Array,
    vh: jax.Array,
    mask: jax.Array,
    kh_new: jax.Array,
    vh_new: jax.Array,
    mask_new: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
) -> jax.Array:
    """Attention over cache slots kh/vh [B, K, S, H] (mask [B, T, S], the slots written
    before this call) and the T new tokens kh_new/vh_new [B, K, T, H] (mask_new [B, T, T]),
    with one softmax over both: the same result as writing the new tokens into the cache first.

    Why: the engine's slots write at per-row columns; writing first meant a fresh copy of every
    layer's [B, K, S, H] slots per decode step (S is the whole slot length, not the prompt), and
    here the cache is only read, the new keys are scattered into it once after the layer scan.
    """
    B, T, N, H = q.shape
    K, S = kh.shape[1], kh.shape[2]
    G = N // K
    qh = jnp.transpose(q.reshape(B, T, K, G, H), (0, 2, 3, 1, 4)).reshape(B, K, G * T, H)

    def scores(keys, m, width):
        s = jnp.einsum("bkmh,bksh->bkms", qh, keys, preferred_element_type=jnp.float32)
        s = softcap(s * scale, logit_softcap).reshape(B, K, G, T, width)
        return jnp.where(m[:, None, None, :, :], s, _MASKED)

    s_old, s_new = scores(kh, mask, S), scores(kh_new, mask_new, T)
    top = jnp.maximum(s_old.max(axis=-1, keepdims=True), s_new.max(axis=-1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
    denom = p_old.sum(axis=-1, keepdims=True) + p_new.sum(axis=-1, keepdims=True)
    p_old = (p_old / denom).astype(vh.dtype).reshape(B, K, G * T, S)
    p_new = (p_new / denom).astype(vh.dtype).reshape(B, K, G * T, T)
    out = project("bkms,bksh->bkmh", p_old, vh) + project("bkms,bksh->bkmh", p_new, vh_new)
    out = out.reshape(B, K, G, T, H)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, H)


CAUSAL_CHUNK = 128
"""Query block of `causal_attention`: longer inputs skip the key blocks a block's queries
cannot see (causal), about half of the score work at long lengths, a gain that grows with the
length (benchmarks/bench_capture.py)."""


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
) -> jax.Array:
    """`attention` for a cache-free forward, where query t and key t are the same token and
    `mask` [B, T, T] is causal: queries [i*C, (i+1)*C) attend to keys [0, (i+1)*C) only.

    Exact: the keys left out are masked for those queries anyway (their softmax weight is
    exactly 0). Also keeps each block's [B, K, G, C, S] scores small enough for the cache.
    """
    T = q.shape[1]
    C = CAUSAL_CHUNK
    kh, vh = heads_major(k), heads_major(v)  # once for all blocks
    outs = []
    for start in range(0, T, C):
        stop = min(start + C, T)
        outs.append(
            attention_heads_major(
                q[:, start:stop],
                kh[:, :, :stop],
                vh[:, :, :stop],
                mask[:, start:stop, :stop],
                scale=scale,
                logit_softcap=logit_softcap,
            )
        )
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # [B, T, N, H]


def gated_mlp(
    x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, *, activation: str
) -> jax.Array:
    """x [B, T, D], gate/up [D, F], down [F, D] -> [B, T, D]."""
    g = project("btd,df->btf", x, gate)
    u = project("btd,df->btf", x, up)
    if activation == "silu":
        h = jax.nn.silu(g)
    elif activation == "gelu_tanh":
        h = jax.nn.gelu(g, approximate=True)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return project("btf,fd->btd", h * u, down)


def embed_scale(config: ModelConfig, dtype) -> jax.Array:
    """Gemma's sqrt(D) embedding multiplier, rounded to the activation dtype as HF does."""
    return jnp.asarray(np.sqrt(config.d_model), dtype=dtype)
