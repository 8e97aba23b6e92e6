"""Packed rows (several records per row, `forward(..., segments=)`) compute what each record
computes alone, within float32 rounding: llama-like GQA and MQA, q/k/v biases, sliding windows,
Gemma 2 (soft-capping, (1 + w) norms, post norms, sqrt(D) embeddings) and Gemma 3 (q/k norms,
local rope base)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support.configs import tiny_config

from mup.models import KVCache, forward, init_params
from mup.models._config import RopeScaling
from mup.models._layers import CAUSAL_CHUNK

WINDOW = 16  # sliding window of the local layers: far shorter than the records
GEMMA = dict(
    norm_plus_one=True,
    embed_scale=True,
    post_norms=True,
    activation="gelu_tanh",
    head_dim=16,
    tie_embeddings=True,
)
CONFIGS = {
    "llama_gqa": tiny_config(),
    "llama_mqa": tiny_config(n_kv_heads=1, n_layers=3),
    "qwen2_bias": tiny_config(attention_bias=True),
    "mistral_window": tiny_config(layer_types=("sliding_attention",) * 2, sliding_window=WINDOW),
    "gemma2": tiny_config(
        **GEMMA,
        n_layers=3,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        sliding_window=WINDOW,
        attn_logit_softcap=5.0,  # small caps so that tanh bends
        final_logit_softcap=3.0,
        query_pre_attn_scalar=24,
    ),
    "gemma3": tiny_config(
        **GEMMA,
        layer_types=("sliding_attention", "full_attention"),
        sliding_window=WINDOW,
        qk_norm=True,
        rope_theta=1e6,
        local_rope_theta=1e4,
        rope_scaling=RopeScaling(kind="linear", factor=4.0),
    ),
}
# Two packed rows: the first crosses two causal query blocks and ends in padding, the second
# is padding after its records; lengths differ so that no record lines up with another.
ROWS = ((150, 61, 40, 33, 7), (200, 101, 1))
ROW_LEN = 2 * CAUSAL_CHUNK + 64


def _params(config, seed: int = 0):
    """Weights large enough that attention is far from uniform and rope positions matter."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        if "norm" in name:
            return jnp.asarray((0.0 if config.norm_plus_one else 1.0) + 0.2 * noise)
        return jnp.asarray((0.1 if "bias" in name else 0.3) * noise)

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _records(config, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, n).astype(np.int32) for row in ROWS for n in row]


def _packed_inputs(records):
    """tokens, valid, positions, segments [rows, ROW_LEN] and each record's (row, start)."""
    shape = (len(ROWS), ROW_LEN)
    tokens, positions, segments = (np.zeros(shape, np.int32) for _ in range(3))
    valid = np.zeros(shape, bool)
    where, k = [], 0
    for b, row in enumerate(ROWS):
        start = 0
        for n in row:
            span = slice(start, start + n)
            tokens[b, span], valid[b, span] = records[k], True
            positions[b, span], segments[b, span] = np.arange(n), k + 1
            where.append((b, start))
            start, k = start + n, k + 1
    return tokens, valid, positions, segments, where


def _one_per_row(config, params, records, capture):
    """The reference: one record per row, right-padded (the unpacked extraction path)."""
    width = max(map(len, records))
    tokens = np.zeros((len(records), width), np.int32)
    valid = np.zeros((len(records), width), bool)
    for i, r in enumerate(records):
        tokens[i, : len(r)], valid[i, : len(r)] = r, True
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    return jax.jit(
        lambda p, t, pos, v: forward(p, t, pos, config=config, valid=v, capture=capture)
    )(params, tokens, positions, valid)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_rows_equal_one_record_per_row(name):
    config = CONFIGS[name]
    params = _params(config)
    records = _records(config)
    capture = tuple(range(config.n_layers + 1))
    want = _one_per_row(config, params, records, capture)
    tokens, valid, positions, segments, where = _packed_inputs(records)

    def run(segments):
        return jax.jit(
            lambda p, t, pos, v, s: forward(
                p, t, pos, config=config, valid=v, segments=s, capture=capture
            )
        )(params, tokens, positions, valid, segments)

    got = run(segments)
    for i, (r, (b, start)) in enumerate(zip(records, where, strict=True)):
        span = slice(start, start + len(r))
        for layer in capture:
            np.testing.assert_allclose(
                np.asarray(got.hidden[layer][b, span]),
                np.asarray(want.hidden[layer][i, : len(r)]),
                rtol=2e-5,
                atol=2e-5,
                err_msg=f"{name}: record {i}, layer {layer}",
            )
        np.testing.assert_allclose(
            np.asarray(got.logits[b, span]),
            np.asarray(want.logits[i, : len(r)]),
            rtol=2e-5,
            atol=2e-5,
            err_msg=f"{name}: record {i}, logits",
        )

    # Without segment ids the later records of a row read their neighbours: the comparison
    # above is sensitive to the mask.
    leaky = run(jnp.ones_like(segments))
    b, start = where[1]
    top = capture[-1]
    diff = np.abs(
        np.asarray(leaky.hidden[top][b, start : start + len(records[1])])
        - np.asarray(want.hidden[top][1, : len(records[1])])
    ).max()
    assert diff > 1e-2


def test_segments_are_checked():
    config = CONFIGS["llama_gqa"]
    params = _params(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match=r"segments shape \(1, 7\) != tokens shape \(1, 8\)"):
        forward(params, tokens, positions, config=config, segments=jnp.zeros((1, 7), jnp.int32))
    cache = KVCache.create(config, 1, 16)
    with pytest.raises(ValueError, match="without a cache only"):
        forward(params, tokens, positions, config=config, cache=cache, segments=jnp.zeros((1, 8)))
