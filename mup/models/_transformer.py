"""The llama-like decoder: embeddings -> `lax.scan` over stacked blocks -> norm -> LM head.

Axis letters: B batch, T tokens (query), S cache slots, D model, N heads, K kv heads,
H head dim, F MLP hidden, V vocab, L layers, J steering entries.

Parameters are a nested dict pytree (see `mup.models._params`); every array under
``params["layers"]`` is stacked over L so one compiled block body serves all layers. Layer
numbering follows transformers' ``hidden_states``: layer L is the residual stream entering
block L (0 = embeddings, n_layers = the final normed output).

Capture never copies forward code: the stack is cut at the captured layers and each segment is
one `lax.scan`, so ``capture=(12,)`` with ``logits=False`` runs blocks 0..11 and nothing else.
Steering (`ForwardSteering`) adds ``multiplier[b] * vector`` to the output of block L, i.e. to
layer L + 1, inside the scan body through a dense per-block delta (zero where nothing is
steered).
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mup.models import _layers
from mup.models._config import ModelConfig

Site = Literal["residual", "normed"]


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots, written left to right.

    k, v:   [L, B, K, S, H] rotated keys and values (activation dtype), heads major: both
            attention products read a kv head's slots as one contiguous [S, H] matrix.
    valid:  [B, S] bool, True where the slot holds a real token. Prompts are LEFT-padded for
            generation; padding slots stay False and are never attended to.
    index:  int32 scalar, the next slot to write (shared by all rows), or int32 [B], each
            row's own next slot (`mup.engine`: every row of the batch is a different request
            at its own length, so new tokens land in different columns).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


@flax.struct.dataclass
class ForwardSteering:
    """What `forward` adds: ``multipliers[j, b] * vectors[j]`` to the output of block
    ``blocks[j]`` (the residual stream that becomes layer ``blocks[j] + 1``).

    blocks:      static tuple of J block indices (0 <= L < n_layers); repeats add up.
    vectors:     [J, D]
    multipliers: [J, B] per-row strength, so one batch serves many strengths.
    gate:        [B, T] float 0/1, which positions are steered; None = every position.
    """

    blocks: tuple[int, ...] = flax.struct.field(pytree_node=False)
    vectors: jax.Array
    multipliers: jax.Array
    gate: jax.Array | None = None


@flax.struct.dataclass
class ForwardOutput:
    logits: jax.Array | None  # [B, T, V] float32, None when logits=False
    hidden: dict[int, jax.Array]  # layer -> [B, T, D] at the requested site
    cache: KVCache | None


def forward(
    params,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    config: ModelConfig,
    valid: jax.Array | None = None,
    cache: KVCache | None = None,
    capture: tuple[int, ...] = (),
    site: Site = "residual",
    steering: ForwardSteering | None = None,
    logits: bool = True,
    attend_len: int | None = None,
    rows: jax.Array | None = None,
) -> ForwardOutput:
    """Run the decoder on tokens [B, T] at rope positions [B, T] (int32, per row).

    valid [B, T] bool marks real tokens (False = padding, never attended to); None = all real.
    capture: layers to return (see module docstring); site "normed" returns the input of block L
    after its input norm (0 <= L < n_layers). With logits=False and no cache only the blocks
    below the deepest captured layer run and the LM head is skipped.
    cache: the T new tokens are written at ``cache.index`` and attend to every valid slot
    (causally among themselves); the updated cache is returned.
    attend_len: with a per-row cache index, read only the first attend_len slots (static;
    every row's index + T must be <= attend_len): a decode step then costs what the rows'
    lengths need, not the whole slot length.
    rows: with a per-row cache, the cache rows [B] (distinct) that the batch's rows read and
    write; None = rows 0..B-1 of a cache of batch B. A decode step of the engine's live slots
    then costs those rows, not every slot.
    `config`, `capture`, `site` and `logits` are static under jit (see `jit_forward`).
    """
    B, T = tokens.shape
    L = config.n_layers
    capture = tuple(sorted(set(int(c) for c in capture)))
    _check_args(config, tokens, positions, valid, capture, site, steering, logits)
    if valid is None:
        valid = jnp.ones((B, T), bool)
    valid = valid.astype(bool)

    # Blocks to run: all of them for logits or a cache, else up to the deepest capture.
    n_run = L if logits or cache is not None else max(capture)
    boundaries = sorted({c for c in capture if c < n_run} | {n_run})

    embed = params["embed"]  # [V, D]
    x = jnp.take(embed, tokens, axis=0)  # [B, T, D]
    if config.embed_scale:
        x = x * _layers.embed_scale(config, x.dtype)

    if rows is not None and (cache is None or cache.index.ndim != 1):
        raise ValueError("rows= needs a cache with per-row write positions (index [B])")
    gather = None
    # Keys: the T new tokens alone, or all S cache slots after writing the new ones.
    if cache is None:
        q_slots = jnp.arange(T, dtype=jnp.int32)
        k_slots = q_slots
        k_valid = valid
        new_cache = None
    elif cache.index.ndim == 1:  # per-row write positions [B]
        gather = rows  # None: every row in order, read by a plain slice in `block`
        if rows is None:
            rows = jnp.arange(B, dtype=jnp.int32)
        index = cache.index[rows]  # [B]
        q_slots = index[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
        read = cache.max_len if attend_len is None else min(attend_len, cache.max_len)
        k_slots = jnp.arange(read, dtype=jnp.int32)
        # The old slots are masked as they were before this call; the new tokens are attended
        # to separately (block: `attention_cache_and_new`).
        k_valid = cache.valid[rows, :read]
        new_cache = cache.replace(
            valid=_write_rows(cache.valid, valid, index, rows), index=cache.index.at[rows].add(T)
        )
    else:
        q_slots = cache.index + jnp.arange(T, dtype=jnp.int32)
        k_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        k_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
        new_cache = cache.replace(valid=k_valid, index=cache.index + T)

    ctx = _Context(
        config=config,
        rope_global=_layers.rope_tables(config, positions),
        rope_local=(
            _layers.rope_tables(config, positions, local=True)
            if config.local_rope_theta is not None
            else None
        ),
        mask_global=_layers.attention_mask(q_slots, k_slots, k_valid, window=None),
        mask_local=(
            _layers.attention_mask(q_slots, k_slots, k_valid, window=config.sliding_window)
            if config.has_local_layers
            else None
        ),
        cache_index=None if cache is None else cache.index,
        rows=gather,
        mask_new=None,
        mask_new_local=None,
        read=k_slots.shape[0],
    )
    if cache is not None and cache.index.ndim == 1:
        t = jnp.arange(T, dtype=jnp.int32)
        causal = (t[None, :] <= t[:, None])[None] & valid[:, None, :]  # [B, T, T]
        local = None
        if config.has_local_layers:
            local = causal & (t[None, :] > t[:, None] - config.sliding_window)[None]
        ctx = ctx.replace(mask_new=causal, mask_new_local=local)

    # Dense per-block steering delta [L, B, D]; zero rows for unsteered blocks.
    delta = None
    gate = None
    if steering is not None:
        contrib = steering.multipliers[:, :, None] * steering.vectors[:, None, :]  # [J, B, D]
        delta = jnp.zeros((L, B, config.d_model), jnp.float32)
        delta = delta.at[jnp.asarray(steering.blocks)].add(contrib.astype(jnp.float32))
        delta = delta.astype(x.dtype)
        if steering.gate is not None:
            gate = steering.gate.astype(x.dtype)  # [B, T]

    layers = params["layers"]
    local_flags = jnp.asarray(np.asarray(config.local_layers, dtype=bool))  # [L]
    # With a cache, each layer's slots ride in the scan inputs and only the T new keys/values
    # come out (scan outputs [n, B, K, T, H]); they are written into the stacked cache once per
    # segment below. Carrying the whole [L, B, K, S, H] cache through the layer scan instead
    # cost more than the MLPs in a batched decode step on CPU.
    kv = None if cache is None else (cache.k, cache.v)
    new_kv: list[tuple[int, jax.Array, jax.Array]] = []  # (first layer, k, v) per segment
    hidden: dict[int, jax.Array] = {}
    if 0 in capture:
        hidden[0] = site_activation(config, params, x, 0, site)
    interior = [c for c in capture if 0 < c < n_run]
    if len(interior) > _MAX_SEGMENTS:
        # Many captures (layer sweeps): one scan that emits every block's output, instead of
        # one compiled scan per segment. Costs [n_run, B, T, D] of memory.
        body = functools.partial(_scan_body, ctx, gate, True)
        xs = _scan_xs(layers, local_flags, delta, kv, 0, n_run)
        x, (ys, written) = jax.lax.scan(body, x, xs)
        if written is not None:
            new_kv.append((0, *written))
        for c in interior:
            hidden[c] = site_activation(config, params, ys[c - 1], c, site)
    else:
        start = 0
        for stop in boundaries:
            if stop > start:
                body = functools.partial(_scan_body, ctx, gate, False)
                xs = _scan_xs(layers, local_flags, delta, kv, start, stop)
                x, (_, written) = jax.lax.scan(body, x, xs)
                if written is not None:
                    new_kv.append((start, *written))
            if stop in capture and 0 < stop < n_run:
                hidden[stop] = site_activation(config, params, x, stop, site)
            start = stop
    if n_run in capture and n_run > 0:
        hidden[n_run] = site_activation(config, params, x, n_run, site)

    if new_cache is not None:
        k_all, v_all = cache.k, cache.v
        for first, k_new, v_new in new_kv:  # [n, B, K, T, H] at layers first.., slot index
            if cache.index.ndim == 1:
                k_all = _write_layers_rows(k_all, k_new, first, cache.index[rows], rows)
                v_all = _write_layers_rows(v_all, v_new, first, cache.index[rows], rows)
                continue
            at = (first, 0, 0, cache.index, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k_new, at)
            v_all = jax.lax.dynamic_update_slice(v_all, v_new, at)
        new_cache = new_cache.replace(k=k_all, v=v_all)
    out_logits = None
    if logits:
        out_logits = lm_head(config, params, _final_norm(config, params, x))  # [B, T, V]
    return ForwardOutput(logits=out_logits, hidden=hidden, cache=new_cache)


@functools.partial(jax.jit, static_argnames=("config", "capture", "site", "logits"))
def jit_forward(
    params,
    tokens,
    positions,
    *,
    config,
    valid=None,
    cache=None,
    capture=(),
    site="residual",
    steering=None,
    logits=True,
) -> ForwardOutput:
    """`forward` under `jax.jit` with the static arguments declared."""
    return forward(
        params,
        tokens,
        positions,
        config=config,
        valid=valid,
        cache=cache,
        capture=capture,
        site=site,
        steering=steering,
        logits=logits,
    )


@flax.struct.dataclass
class _Context:
    """Per-call values shared by every block (closed over by the scan body)."""

    config: ModelConfig = flax.struct.field(pytree_node=False)
    rope_global: tuple[jax.Array, jax.Array]  # (cos, sin) [B, T, H/2]
    rope_local: tuple[jax.Array, jax.Array] | None
    mask_global: jax.Array  # [B, T, S]
    mask_local: jax.Array | None
    cache_index: jax.Array | None
    mask_new: jax.Array | None  # [B, T, T] per-row cache mode: new tokens among themselves
    mask_new_local: jax.Array | None
    rows: jax.Array | None = None  # [B] the per-row cache's rows this batch uses
    # Cache slots each layer reads (static): a per-row cache reads its first `attend_len`.
    read: int = flax.struct.field(pytree_node=False, default=0)


# Above this many captured layers strictly inside the run, one scan emits every layer.
_MAX_SEGMENTS = 2


def _scan_xs(layers, local_flags, delta, kv, start: int, stop: int) -> dict:
    """Per-layer scan inputs for blocks start..stop-1 (static slices of the stacks)."""
    xs = {
        "p": jax.tree.map(lambda a: a[start:stop], layers),
        "local": local_flags[start:stop],
    }
    if delta is not None:
        xs["delta"] = delta[start:stop]
    if kv is not None:
        xs["kv"] = (kv[0][start:stop], kv[1][start:stop])  # each [n, B, K, S, H]
    return xs


def _scan_body(ctx: _Context, gate, emit: bool, x, xs):
    x, written = block(ctx, xs["p"], x, xs["local"], xs.get("kv"))
    if "delta" in xs:
        d = xs["delta"][:, None, :]  # [B, 1, D]
        x = x + (d if gate is None else d * gate[:, :, None])
    return x, ((x if emit else None), written)


def block(ctx: _Context, p, x: jax.Array, is_local: jax.Array, kv):
    """One decoder block. x [B, T, D]; kv = None or this layer's (k, v) cache [B, K, S, H].

    Returns the block output and, with a cache, the new (k, v) [B, K, T, H] to write at
    ``ctx.cache_index``.
    """
    c = ctx.config
    norm = functools.partial(_layers.rms_norm, eps=c.rms_norm_eps, plus_one=c.norm_plus_one)

    h = norm(x, p["attn_norm"])
    q = _layers.project("btd,dnh->btnh", h, p["q"])  # [B, T, N, H]
    k = _layers.project("btd,dkh->btkh", h, p["k"])  # [B, T, K, H]
    v = _layers.project("btd,dkh->btkh", h, p["v"])  # [B, T, K, H]
    if c.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if c.qk_norm:
        q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])

    cos, sin = ctx.rope_global
    if ctx.rope_local is not None:
        cos = jnp.where(is_local, ctx.rope_local[0], cos)
        sin = jnp.where(is_local, ctx.rope_local[1], sin)
    q, k = _layers.apply_rope(q, cos, sin), _layers.apply_rope(k, cos, sin)

    if kv is not None:
        # Attend to this layer's slots with the new tokens written in (cache dtype, as they
        # will be read back in later steps).
        k_layer, v_layer = kv
        if ctx.cache_index.ndim == 1:
            # The read window is cut here, per layer, not from the whole stack before the
            # scan: cutting the stack first copied every layer's window twice per step.
            if ctx.rows is None:
                k_layer, v_layer = k_layer[:, :, : ctx.read], v_layer[:, :, : ctx.read]
            else:  # only the batch's rows: the gather rides in the same per-layer copy
                k_layer = k_layer[ctx.rows, :, : ctx.read]
                v_layer = v_layer[ctx.rows, :, : ctx.read]
        k_new = _layers.heads_major(k.astype(k_layer.dtype))  # [B, K, T, H]
        v_new = _layers.heads_major(v.astype(v_layer.dtype))
        if ctx.cache_index.ndim == 1:
            # Per-row slots (the engine): attend to the old slots and the new tokens without
            # writing them into this layer's slots first (see `attention_cache_and_new`).
            mask, mask_new = ctx.mask_global, ctx.mask_new
            if ctx.mask_local is not None:
                mask = jnp.where(is_local, ctx.mask_local, mask)
                mask_new = jnp.where(is_local, ctx.mask_new_local, mask_new)
            a = _layers.attention_cache_and_new(
                q, k_layer, v_layer, mask, k_new, v_new, mask_new,
                scale=c.attn_scale, logit_softcap=c.attn_logit_softcap,
            )  # fmt: skip
            return _block_out(c, norm, p, x, a), (k_new, v_new)
        else:
            at = (0, 0, ctx.cache_index, 0)
            k = jax.lax.dynamic_update_slice(k_layer, k_new, at)  # [B, K, S, H]
            v = jax.lax.dynamic_update_slice(v_layer, v_new, at)
        kv = (k_new, v_new)

    mask = ctx.mask_global
    if ctx.mask_local is not None:
        mask = jnp.where(is_local, ctx.mask_local, mask)
    kw = dict(scale=c.attn_scale, logit_softcap=c.attn_logit_softcap)
    if kv is not None:
        a = _layers.attention_heads_major(q, k, v, mask, **kw)  # [B, T, N, H]
    else:
        # Without a cache, queries and keys are the same tokens in slot order: causal blocks.
        a = _layers.causal_attention(q, k, v, mask, **kw)
    return _block_out(c, norm, p, x, a), kv


def _block_out(c: ModelConfig, norm, p, x: jax.Array, a: jax.Array) -> jax.Array:
    """The rest of a block after attention a [B, T, N, H]: output projection, residual, MLP."""
    # Contract over the flattened heads: a plain [B*T, N*H] x [N*H, D] matmul. The 3-D einsum
    # made XLA (CPU) re-layout the o weight on every call, i.e. every decode step and layer.
    B, T, N, H = a.shape
    a = _layers.project("btf,fd->btd", a.reshape(B, T, N * H), p["o"].reshape(N * H, -1))
    if c.post_norms:
        a = norm(a, p["post_attn_norm"])
    x = x + a

    h = norm(x, p["mlp_norm"])
    m = _layers.gated_mlp(h, p["gate"], p["up"], p["down"], activation=c.activation)
    if c.post_norms:
        m = norm(m, p["post_mlp_norm"])
    return x + m


def _write_rows(valid: jax.Array, new: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
    """valid [R, S] with new [B, T] written at columns index[b].. of row rows[b] (one
    scatter; columns past S are dropped: free engine slots keep advancing)."""
    B, T = new.shape
    rows = jnp.broadcast_to(rows[:, None], (B, T))
    cols = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    return valid.at[rows, cols].set(new, mode="drop")


def _write_layers_rows(buf, new, first: int, index: jax.Array, rows: jax.Array) -> jax.Array:
    """Cache stack buf [L, R, K, S, H] with new [n, B, K, T, H] written at layers first..,
    slots index[b].. of row rows[b]: one scatter, in place under donation. (A vmap of
    dynamic_update_slice lowered to a copy of the whole stack per step, which then dominated
    the decode step; benchmarks/bench_serve.py.)"""
    n, B, _, T, _ = new.shape
    rows = jnp.broadcast_to(rows[:, None], (B, T))
    cols = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    update = jnp.transpose(new, (1, 3, 0, 2, 4))  # [B, T, n, K, H]: advanced axes first
    return buf.at[first : first + n, rows, :, cols, :].set(update, mode="drop")


def _final_norm(config: ModelConfig, params, x: jax.Array) -> jax.Array:
    return _layers.rms_norm(
        x, params["final_norm"], eps=config.rms_norm_eps, plus_one=config.norm_plus_one
    )


def lm_head(config: ModelConfig, params, normed: jax.Array) -> jax.Array:
    """The LM head: final-normed states [..., D] -> logits [..., V] float32 (soft-capped).

    Callers that need only some positions (the last prompt token) project those alone.
    """
    w = params["embed"] if config.tie_embeddings else params["lm_head"]
    spec = "...d,vd->...v" if config.tie_embeddings else "...d,dv->...v"
    out = jnp.einsum(spec, normed, w, preferred_element_type=jnp.float32)
    return _layers.softcap(out, config.final_logit_softcap)


def site_activation(config: ModelConfig, params, x: jax.Array, layer: int, site: Site) -> jax.Array:
    """The activation at (layer, site) from the residual x [B, T, D] entering block `layer`."""
    if site == "normed":
        w = params["layers"]["attn_norm"][layer]
        return _layers.rms_norm(x, w, eps=config.rms_norm_eps, plus_one=config.norm_plus_one)
    if layer == config.n_layers:
        return _final_norm(config, params, x)  # transformers reports the normed output last
    return x


def _check_args(config, tokens, positions, valid, capture, site, steering, logits) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if positions.shape != tokens.shape:
        raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
    if valid is not None and valid.shape != tokens.shape:
        raise ValueError(f"valid shape {valid.shape} != tokens shape {tokens.shape}")
    if site not in ("residual", "normed"):
        raise ValueError(f"site must be 'residual' or 'normed', got {site!r}")
    top = config.n_layers if site == "residual" else config.n_layers - 1
    bad = [c for c in capture if not 0 <= c <= top]
    if bad:
        raise ValueError(f"capture layers {bad} out of range 0..{top} for site {site!r}")
    if not logits and not capture:
        raise ValueError("logits=False with nothing to capture computes nothing")
    if steering is not None:
        J = len(steering.blocks)
        bad = [s for s in steering.blocks if not 0 <= s < config.n_layers]
        if bad:
            raise ValueError(f"steering blocks {bad} out of range 0..{config.n_layers - 1}")
        if steering.vectors.shape != (J, config.d_model):
            raise ValueError(
                f"steering.vectors shape {steering.vectors.shape}, expected {(J, config.d_model)}"
            )
        if steering.multipliers.shape != (J, tokens.shape[0]):
            raise ValueError(
                f"steering.multipliers shape {steering.multipliers.shape}, expected "
                f"{(J, tokens.shape[0])} (entries, batch)"
            )
        if steering.gate is not None and steering.gate.shape != tokens.shape:
            raise ValueError(f"steering.gate shape {steering.gate.shape} != {tokens.shape}")
