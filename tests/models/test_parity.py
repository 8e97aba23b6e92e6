"""Numerical parity of the JAX decoder with transformers (torch CPU float32, eager attention).

Tiny random models (see conftest.py): Llama MHA / GQA (tied) / MQA, llama3 rope scaling, Qwen2
biases, Mistral and Gemma 2 / Gemma 3 sliding windows over sequences three windows long.
Every layer's hidden state and the logits must agree within 1e-4 max abs.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support.checkpoints import TINY_HF

from mup.models._transformer import ForwardSteering, KVCache, forward, jit_forward

torch = pytest.importorskip("torch", reason="torch is the parity reference")

TOL = 1e-4
SEQ = 24  # three sliding windows of the Gemma / Mistral cases (conftest.WINDOW = 8)
VOCAB = TINY_HF["vocab_size"]
CASES = (
    "llama_mha",
    "llama_gqa_tied",
    "llama_mqa",
    "llama3_rope",
    "qwen2",
    "mistral",
    "gemma2",
    "gemma3",
)


def _tokens(batch: int, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq)).astype(np.int32)


def _positions(batch: int, seq: int) -> np.ndarray:
    return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()


def _hf(model, tokens: np.ndarray):
    """(hidden_states list of [B, T, D], logits [B, T, V]) as numpy float32."""
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states], out.logits.float().numpy()


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", CASES)
def test_every_layer_and_logits_match_transformers(tiny_models, name):
    case = tiny_models(name)
    cfg = case.config
    pad = 5
    tok = _tokens(2)
    valid = np.ones((2, SEQ), bool)
    valid[1, SEQ - pad :] = False  # row 1 is right-padded: its real tokens must not notice
    out = jit_forward(
        case.params,
        jnp.asarray(tok),
        jnp.asarray(_positions(2, SEQ)),
        config=cfg,
        valid=jnp.asarray(valid),
        capture=tuple(range(cfg.n_layers + 1)),
    )
    hf_full, hf_logits_full = _hf(case.hf_model, tok[:1])
    hf_short, hf_logits_short = _hf(case.hf_model, tok[1:, : SEQ - pad])
    assert len(hf_full) == cfg.n_layers + 1
    worst = 0.0
    for layer in range(cfg.n_layers + 1):
        d0 = _maxdiff(out.hidden[layer][0], hf_full[layer][0])
        d1 = _maxdiff(out.hidden[layer][1, : SEQ - pad], hf_short[layer][0])
        assert d0 <= TOL and d1 <= TOL, f"{name} layer {layer}: {d0:.2e} / padded row {d1:.2e}"
        worst = max(worst, d0, d1)
    d0 = _maxdiff(out.logits[0], hf_logits_full[0])
    d1 = _maxdiff(out.logits[1, : SEQ - pad], hf_logits_short[0])
    assert d0 <= TOL and d1 <= TOL, f"{name} logits: {d0:.2e} / padded row {d1:.2e}"
    assert np.abs(hf_logits_full).max() > 1.0, "reference logits are degenerate"
    print(f"\n{name}: max |hidden diff| {worst:.2e}, max |logit diff| {max(d0, d1):.2e}")


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gemma2"])
def test_bfloat16_forward_is_as_close_as_transformers_bfloat16(tiny_models, name):
    """bfloat16 weights and activations: every layer and the logits stay within twice the error
    of transformers' own bfloat16 forward, both against the float32 reference."""
    case = tiny_models(name)
    cfg = case.config
    tok = _tokens(2)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), case.params)
    out = jit_forward(
        params,
        jnp.asarray(tok),
        jnp.asarray(_positions(2, SEQ)),
        config=cfg,
        capture=tuple(range(cfg.n_layers + 1)),
    )
    ref_hidden, ref_logits = _hf(case.hf_model, tok)
    hf16_hidden, hf16_logits = _hf(copy.deepcopy(case.hf_model).to(torch.bfloat16), tok)
    pairs = [(out.hidden[i], ref_hidden[i], hf16_hidden[i]) for i in range(cfg.n_layers + 1)]
    for i, (ours, ref, hf16) in enumerate([*pairs, (out.logits, ref_logits, hf16_logits)]):
        if i <= cfg.n_layers:
            assert ours.dtype == jnp.bfloat16
        err, hf_err = _maxdiff(ours, ref), _maxdiff(hf16, ref)
        assert err <= 2 * hf_err + 1e-3, f"{name} output {i}: {err:.2e} vs HF bf16 {hf_err:.2e}"


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gemma3"])
def test_cached_decode_equals_uncached_forward(tiny_models, name):
    """Prefill 16 tokens, decode 8 one at a time; row 1 is LEFT-padded by 4 tokens."""
    case = tiny_models(name)
    cfg = case.config
    lpad, prefill = 4, 16
    tok = _tokens(2, seed=1)
    valid = np.ones((2, SEQ), bool)
    valid[1, :lpad] = False
    pos = _positions(2, SEQ)
    pos[1] = np.maximum(np.arange(SEQ) - lpad, 0)  # rope positions count real tokens only

    ref = jit_forward(
        case.params, jnp.asarray(tok), jnp.asarray(pos), config=cfg, valid=jnp.asarray(valid)
    ).logits

    cache = KVCache.create(cfg, batch=2, max_len=SEQ, dtype=jnp.float32)
    out = jit_forward(
        case.params,
        jnp.asarray(tok[:, :prefill]),
        jnp.asarray(pos[:, :prefill]),
        config=cfg,
        valid=jnp.asarray(valid[:, :prefill]),
        cache=cache,
    )
    steps = [out.logits]
    cache = out.cache
    for t in range(prefill, SEQ):
        out = jit_forward(
            case.params,
            jnp.asarray(tok[:, t : t + 1]),
            jnp.asarray(pos[:, t : t + 1]),
            config=cfg,
            cache=cache,
        )
        steps.append(out.logits)
        cache = out.cache
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert int(cache.index) == SEQ
    assert _maxdiff(cached[0], ref[0]) <= 1e-5
    assert _maxdiff(cached[1, lpad:], np.asarray(ref)[1, lpad:]) <= 1e-5
    # The left-padded row equals transformers on the same prompt without padding.
    _, hf_logits = _hf(case.hf_model, tok[1:, lpad:])
    assert _maxdiff(cached[1, lpad:], hf_logits[0]) <= TOL


@pytest.mark.parametrize("name", ["llama_gqa_tied", "gemma3"])
def test_per_row_cache_index_decode_equals_uncached_forward(tiny_models, name):
    """The engine's cache mode: rows prefilled to different lengths (right-padded), then decoded
    together, each row writing at its own slot index; logits equal the uncached forward."""
    case = tiny_models(name)
    cfg = case.config
    lengths = np.array([16, 11])  # row 1's prompt is shorter: its decode starts at column 11
    tok = _tokens(2, seed=3)
    pos = _positions(2, SEQ)
    ref = jit_forward(case.params, jnp.asarray(tok), jnp.asarray(pos), config=cfg).logits
    valid = np.arange(16)[None, :] < lengths[:, None]  # [2, 16] right padding
    out = jit_forward(
        case.params,
        jnp.asarray(tok[:, :16]),
        jnp.asarray(pos[:, :16]),
        config=cfg,
        valid=jnp.asarray(valid),
        cache=KVCache.create(cfg, batch=2, max_len=SEQ, dtype=jnp.float32),
    )
    cache = out.cache.replace(index=jnp.asarray(lengths, jnp.int32))  # [B] per-row index
    got = {0: [], 1: []}
    for _ in range(SEQ - 16):
        idx = np.asarray(cache.index)
        step_tok = tok[np.arange(2), idx][:, None]
        out = jit_forward(
            case.params, jnp.asarray(step_tok), jnp.asarray(idx[:, None]), config=cfg, cache=cache
        )
        cache = out.cache
        for b in range(2):
            got[b].append((int(idx[b]), np.asarray(out.logits)[b, 0]))
    assert np.asarray(cache.index).tolist() == [SEQ, 11 + SEQ - 16]
    for b in range(2):
        for t, logits in got[b]:
            assert _maxdiff(logits, np.asarray(ref)[b, t]) <= 1e-5, (b, t)


def _steer_jit():
    return jax.jit(forward, static_argnames=("config", "capture", "site", "logits"))


def _hook_add(model, layer: int, vector: np.ndarray, multiplier: float):
    """transformers forward hook adding multiplier * vector to block `layer`'s output."""
    add = torch.as_tensor(multiplier * vector, dtype=torch.float32)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + add, *output[1:])
        return output + add

    return model.model.layers[layer].register_forward_hook(hook)


@pytest.fixture(scope="module")
def steer_setup(tiny_models):
    case = tiny_models("llama_gqa_tied")
    vec = np.random.RandomState(3).randn(case.config.d_model).astype(np.float32)
    tok = np.repeat(_tokens(1, seed=2), 3, axis=0)  # three identical rows
    return case, vec, tok


def _steered_logits(case, tok, vec, mults, layer=1, gate=None) -> np.ndarray:
    spec = ForwardSteering(
        blocks=(layer,),
        vectors=jnp.asarray(vec[None]),
        multipliers=jnp.asarray(np.asarray(mults, np.float32)[None]),
        gate=None if gate is None else jnp.asarray(gate),
    )
    out = jit_forward(
        case.params,
        jnp.asarray(tok),
        jnp.asarray(_positions(*tok.shape)),
        config=case.config,
        steering=spec,
    )
    return np.asarray(out.logits)


def test_steering_zero_multiplier_is_no_steering(steer_setup):
    case, vec, tok = steer_setup
    plain = jit_forward(
        case.params, jnp.asarray(tok), jnp.asarray(_positions(*tok.shape)), config=case.config
    ).logits
    steered = _steered_logits(case, tok, vec, [0.0, 0.0, 0.0])
    assert _maxdiff(steered, plain) <= 1e-6


def test_steering_rows_are_independent_and_opposite(steer_setup):
    case, vec, tok = steer_setup
    a = _steered_logits(case, tok, vec, [0.0, 2.0, -2.0])
    b = _steered_logits(case, tok, vec, [0.0, 7.0, 0.5])
    # Row 0 does not depend on the other rows' multipliers.
    assert _maxdiff(a[0], b[0]) <= 1e-6
    up, down = a[1] - a[0], a[2] - a[0]  # [T, V]
    assert np.abs(up).max() > 1e-2 and np.abs(down).max() > 1e-2
    # +m and -m move every position's logits in opposite directions.
    assert np.all(np.sum(up * down, axis=-1) < 0)


def test_steering_matches_transformers_forward_hook(steer_setup):
    case, vec, tok = steer_setup
    ours = _steered_logits(case, tok, vec, [0.0, 1.5, -0.75])
    for row, m in ((1, 1.5), (2, -0.75)):
        handle = _hook_add(case.hf_model, 1, vec, m)
        try:
            _, ref = _hf(case.hf_model, tok[row : row + 1])
        finally:
            handle.remove()
        assert _maxdiff(ours[row], ref[0]) <= TOL


def test_steering_gate_leaves_ungated_prefix_alone(steer_setup):
    case, vec, tok = steer_setup
    gate = np.zeros(tok.shape, np.float32)
    gate[:, 10:] = 1.0
    plain = _steered_logits(case, tok, vec, [0.0, 0.0, 0.0], gate=gate)
    gated = _steered_logits(case, tok, vec, [3.0, 3.0, 3.0], gate=gate)
    assert _maxdiff(gated[:, :10], plain[:, :10]) <= 1e-6  # causal: nothing before 10 moves
    assert _maxdiff(gated[:, 10:], plain[:, 10:]) > 1e-2


@pytest.mark.parametrize("name", ["llama_mha", "gemma3"])
def test_normed_site_matches_input_layernorm(tiny_models, name):
    case = tiny_models(name)
    layer = 1
    tok = _tokens(2, seed=4)
    seen = {}
    block = case.hf_model.model.layers[layer].input_layernorm
    handle = block.register_forward_hook(lambda _m, _i, out: seen.setdefault("x", out))
    try:
        _hf(case.hf_model, tok)
    finally:
        handle.remove()
    out = jit_forward(
        case.params,
        jnp.asarray(tok),
        jnp.asarray(_positions(2, SEQ)),
        config=case.config,
        capture=(layer,),
        site="normed",
        logits=False,
    )
    assert out.logits is None
    assert _maxdiff(out.hidden[layer], seen["x"].numpy()) <= TOL


def test_capture_without_logits_runs_only_lower_blocks(tiny_models):
    """Blocks at and above the captured layer and the LM head are poisoned with NaN: a capture
    that touched them would be NaN."""
    case = tiny_models("llama_mqa")  # 3 layers, untied LM head
    tok = _tokens(2, seed=5)
    pos = jnp.asarray(_positions(2, SEQ))
    full = jit_forward(case.params, jnp.asarray(tok), pos, config=case.config, capture=(1, 2))
    poisoned = jax.tree.map(lambda a: a, case.params)
    poisoned["layers"] = jax.tree.map(lambda a: a.at[2:].set(jnp.nan), case.params["layers"])
    poisoned["lm_head"] = jnp.full_like(case.params["lm_head"], jnp.nan)
    poisoned["final_norm"] = jnp.full_like(case.params["final_norm"], jnp.nan)
    out = jit_forward(
        poisoned, jnp.asarray(tok), pos, config=case.config, capture=(1, 2), logits=False
    )
    assert out.logits is None and sorted(out.hidden) == [1, 2]
    for layer in (1, 2):
        assert np.isfinite(np.asarray(out.hidden[layer])).all()
        assert _maxdiff(out.hidden[layer], full.hidden[layer]) == 0.0


def test_forward_rejects_bad_arguments(tiny_models):
    case = tiny_models("llama_mha")
    tok = jnp.asarray(_tokens(2))
    pos = jnp.asarray(_positions(2, SEQ))
    with pytest.raises(ValueError, match="capture layers"):
        forward(case.params, tok, pos, config=case.config, capture=(9,))
    with pytest.raises(ValueError, match="positions shape"):
        forward(case.params, tok, pos[:, :3], config=case.config)
    spec = ForwardSteering(blocks=(0,), vectors=jnp.zeros((1, 5)), multipliers=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="steering.vectors shape"):
        forward(case.params, tok, pos, config=case.config, steering=spec)
