"""The engine's jitted programs: per-row sampling, a prefill chunk, slot insertion, decode.

Axis letters: B slots, R rows of one call (a prefill batch, or the slots a decode step
advances), C chunk tokens, P prefill cache length (a prompt bucket), S slot cache length,
D model, V vocab, W allowed-token mask words (ceil(V / 32)), J steering entries, X top-k
width, L layers.

Every program takes per-row arrays (temperature, top_p, PRNG keys, steering multipliers,
allowed-token masks), so rows with different samplers, strengths and grammars share one call
and one compiled program; the only static arguments are shapes and the model config, so
compiled programs stay few: one decode step per slot count, one prefill chunk per (rows, chunk,
bucket), one insert per (rows, bucket).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mup.models import (
    ForwardSteering,
    KVCache,
    ModelConfig,
    forward,
    lm_head,
    site_activation,
    token_positions,
)


def sample_rows(logits, temperature, top_p, keys, top_k: int = 1):
    """Per-row next tokens and their float32 log-probabilities.

    logits [B, V] float32, temperature [B] (0 = greedy), top_p [B] (1 = off), keys [B] PRNG
    keys -> (tokens [B] int32, chosen logprob [B], top-k ids [B, X], top-k logprobs [B, X]).

    Logprobs are the log-softmax of the raw logits (temperature and nucleus only shape the
    draw), as vLLM and the OpenAI API report them. A row's draw depends only on its own logits,
    parameters and key: greedy rows take the top-k's first id (ties: the lowest, as argmax);
    sampled rows invert the CDF of their tempered, nucleus-cut distribution at one uniform draw.
    Why not `jax.random.categorical`: it draws V Gumbel variates per row, a large share of a
    small model's decode step on CPU; the sampling branch is skipped when every row is greedy.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B]
    if top_k > 1:
        top_vals, top_ids = jax.lax.top_k(logits, top_k)  # [B, X], stable: lowest id first
        greedy = top_ids[:, 0].astype(jnp.int32)
    else:  # one column: argmax is far cheaper than XLA CPU's top-k
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        top_ids = greedy[:, None]
        top_vals = jnp.take_along_axis(logits, top_ids, axis=-1)

    def nucleus(x):
        ranked = jnp.sort(x, axis=-1)[:, ::-1]  # [B, V] most likely first
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(mass_above < top_p[:, None], axis=-1)  # [B] >= 1
        cut = jnp.take_along_axis(ranked, jnp.maximum(keep - 1, 0)[:, None], axis=-1)  # [B, 1]
        cut = jnp.where(top_p[:, None] < 1.0, cut, -jnp.inf)
        return jnp.where(x >= cut, x, -jnp.inf)

    def sample(_):
        t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
        scaled = logits / t[:, None]  # [B, V]
        # The sort is skipped when no row asks for a nucleus; it is the identity for p = 1.
        scaled = jax.lax.cond(
            jnp.any((top_p < 1.0) & (temperature > 0)), nucleus, lambda x: x, scaled
        )
        cdf = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)  # [B, V]
        u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # [B] in (0, 1]: never a 0-mass token
        drawn = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
        drawn = jnp.minimum(drawn, logits.shape[-1] - 1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    return tokens, chosen, top_ids.astype(jnp.int32), top_vals - lse[:, None]


def mask_logits(logits, allowed):
    """logits [B, V] with the tokens that `allowed` [B, W] (packed bits, llguidance's layout:
    bit v % 32 of word v // 32) does not allow set to -inf. A row of -1 words allows every
    token and leaves its logits exactly as they were."""
    B, V = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (allowed[:, :, None] >> shifts) & 1  # [B, W, 32]; arithmetic shift, bit kept by & 1
    keep = bits.reshape(B, -1)[:, :V].astype(bool)  # [B, V]
    return jnp.where(keep, logits, -jnp.inf)


def _steering(steer_blocks, vectors, multipliers):
    if not steer_blocks:
        return None
    return ForwardSteering(blocks=steer_blocks, vectors=vectors, multipliers=multipliers)


def _captures(config: ModelConfig, params, out, captures):
    """Activations at each (layer, site) of `captures` from a forward that captured the layers
    at the residual site (the normed site is the block's input norm applied to that residual),
    so probes of both sites share one forward."""
    return tuple(site_activation(config, params, out.hidden[c], c, site) for c, site in captures)


@functools.partial(
    jax.jit,
    static_argnames=("config", "steer_blocks", "captures", "top_k", "all_logprobs"),
    donate_argnames=("cache",),
)
def prefill_chunk(
    params,
    cache: KVCache,  # [L, R, K, P, H], shared index = this chunk's first column
    tokens,  # [R, C] int32, right-padded
    valid,  # [R, C] bool
    last_col,  # [R] int32: column of the row's last prompt token within this chunk (clipped)
    next_tokens,  # [R, C] int32: the prompt token after each position (echo), or None
    temperature,  # [R]
    top_p,  # [R]
    keys,  # [R] PRNG keys (step 0)
    allowed,  # [R, W] int32 packed allowed-token masks of the first new token
    vectors,  # [J, D] or None
    multipliers,  # [J, R] or None
    *,
    config: ModelConfig,
    steer_blocks: tuple[int, ...],
    captures: tuple[tuple[int, str], ...],
    top_k: int,
    all_logprobs: bool,
):
    """One chunk of a right-padded prompt batch into its prefill cache; the first new token of
    every row whose last prompt token is in this chunk (the host keeps those rows' values),
    drawn among the tokens its mask allows (logprobs too are of that masked distribution, as
    vLLM reports them)."""
    R, C = tokens.shape
    L = config.n_layers
    positions = token_positions(valid, start=cache.index)  # [R, C], right-padded
    out = forward(
        params,
        tokens,
        positions,
        config=config,
        valid=valid,
        cache=cache,
        capture=tuple(sorted({c for c, _ in captures} | {L})),
        steering=_steering(steer_blocks, vectors, multipliers),
        logits=False,
    )
    final = out.hidden[L]  # [R, C, D] normed
    last = jnp.take_along_axis(final, last_col[:, None, None], axis=1)[:, 0]  # [R, D]
    logits = mask_logits(lm_head(config, params, last), allowed)  # [R, V]
    # The first new token is step 0 of the row's key, as in `mup.models.generate`.
    step0 = jax.vmap(jax.random.fold_in)(keys, jnp.zeros(R, jnp.int32))
    first, first_lp, top_ids, top_lp = sample_rows(logits, temperature, top_p, step0, top_k)
    result = {
        "cache": out.cache,
        "first": first,
        "first_lp": first_lp,
        "top_ids": top_ids,
        "top_lp": top_lp,
        "probe": _captures(config, params, out, captures),  # each [R, C, D]
    }
    if all_logprobs:
        # Every position's next-token distribution: the prompt tokens' logprobs (echo).
        all_logits = lm_head(config, params, final)  # [R, C, V]
        lp = jax.nn.log_softmax(all_logits, axis=-1)
        result["prompt_lp"] = jnp.take_along_axis(lp, next_tokens[:, :, None], axis=-1)[..., 0]
        if top_k > 1:
            p_top_lp, p_top_ids = jax.lax.top_k(lp, top_k)  # [R, C, X]
        else:
            p_top_ids = jnp.argmax(lp, axis=-1)[..., None]
            p_top_lp = jnp.take_along_axis(lp, p_top_ids, axis=-1)
        result["prompt_top_lp"], result["prompt_top_ids"] = p_top_lp, p_top_ids.astype(jnp.int32)
    return result


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: KVCache, k, v, valid, slots, lengths) -> KVCache:
    """Write prefilled rows (k/v [L, R, K, P, H], valid [R, P]) into slots [R] of the slot
    cache [L, B, K, S, H]; each slot's next write goes to its prompt length. Slots >= B (the
    padding rows of a prefill batch) are dropped."""
    P = min(k.shape[3], cache.max_len)  # a chunked prompt's bucket may pass the slot length
    k, v, valid = k[:, :, :, :P], v[:, :, :, :P], valid[:, :P]
    new_k = cache.k.at[:, slots, :, :P].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[:, slots, :, :P].set(v.astype(cache.v.dtype), mode="drop")
    row_valid = jnp.zeros((valid.shape[0], cache.max_len), bool).at[:, :P].set(valid)
    new_valid = cache.valid.at[slots].set(row_valid, mode="drop")
    new_index = cache.index.at[slots].set(lengths.astype(jnp.int32), mode="drop")
    return cache.replace(k=new_k, v=new_v, valid=new_valid, index=new_index)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config", "steer_blocks", "captures", "top_k", "n_steps", "attend_len"
    ),
    donate_argnames=("cache",),
)  # fmt: skip
def decode_steps(
    params,
    cache: KVCache,  # [L, B, K, S, H], per-row index
    rows,  # [R] int32: the distinct slots to advance (the live ones, padded with free ones)
    tokens,  # [B] int32: each slot's last token (not yet in the cache)
    steps,  # [B] int32: tokens the row has generated (the PRNG step of the next draw)
    temperature,  # [B]
    top_p,  # [B]
    keys,  # [B] PRNG keys of the rows
    allowed,  # [B, W] int32 packed allowed-token masks (-1: all); only valid for one step
    vectors,  # [J, D] or None
    multipliers,  # [J, B] or None
    *,
    config: ModelConfig,
    steer_blocks: tuple[int, ...],
    captures: tuple[tuple[int, str], ...],
    top_k: int,
    n_steps: int,
    attend_len: int,
):
    """`n_steps` decode steps of the slots `rows` (fixed shapes: R is a bucket of the live
    count, padded with free slots whose outputs are ignored), reading the first `attend_len`
    columns of the slots (a bucket of the longest live row). The per-slot arguments are [B]
    and indexed by `rows` here, so the host keeps one array per slot. Returns the cache and
    per-step tokens [R, n], logprobs [R, n], top-k ids / values [R, n, X] and probe-layer
    activations of the fed tokens, each [R, n, D], in the order of `rows`. Every step applies
    `allowed`, so rows whose mask changes after each token (a grammar) need n_steps = 1."""
    L = config.n_layers
    B = cache.k.shape[1]
    # All slots in order: the cache is read by slices, not gathers (see `forward`'s rows).
    every = rows.shape[0] == B
    tokens, steps, temperature, top_p = (a[rows] for a in (tokens, steps, temperature, top_p))
    keys, allowed = keys[rows], allowed[rows]
    if multipliers is not None:
        multipliers = multipliers[:, rows]
    steering = _steering(steer_blocks, vectors, multipliers)

    def one(carry, _):
        cache, tok, step = carry
        out = forward(
            params,
            tok[:, None],
            cache.index[rows][:, None],  # right-padded rows: a token's rope position is its column
            config=config,
            cache=cache,
            capture=tuple(sorted({c for c, _ in captures} | {L})),
            steering=steering,
            logits=False,
            attend_len=attend_len,
            rows=None if every else rows,
        )
        logits = mask_logits(lm_head(config, params, out.hidden[L][:, 0]), allowed)  # [R, V]
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        nxt, lp, top_ids, top_lp = sample_rows(logits, temperature, top_p, step_keys, top_k)
        probe = tuple(h[:, 0] for h in _captures(config, params, out, captures))
        return (out.cache, nxt, step + 1), (nxt, lp, top_ids, top_lp, probe)

    # A Python loop, not lax.scan: a while-loop carry made XLA copy the whole slot cache.
    carry, outs = (cache, tokens, steps), []
    for _ in range(n_steps):
        carry, y = one(carry, None)
        outs.append(y)
    cache = carry[0]
    nxt, lp, top_ids, top_lp, probe = jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outs)
    return cache, {"tokens": nxt, "lp": lp, "top_ids": top_ids, "top_lp": top_lp, "probe": probe}
