"""`mup.engine.Engine` in process on the tiny random llama: rows do not depend on their
batch-mates, outputs equal `mup.models.generate` and transformers (logprobs, prompt logprobs,
probe scores of the prompt and of every generated token), chunked prefill, continuous
admission and cancellation.

One engine (4 slots, 32-token prefill chunks so that chat prompts are chunked) serves every
test of the module, so the decode step and the few prefill shapes compile once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

STEER_LAYER, PROBE_LAYER = 0, 1  # the tiny checkpoint's, as in conftest

torch = pytest.importorskip("torch", reason="torch is the parity reference")

CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is it blue?"}],
    [{"role": "user", "content": "Count to five, slowly and carefully please."}],
    [{"role": "user", "content": "hi"}],
]
LOGPROB_ATOL = 1e-4  # float32, XLA vs torch summation order


@pytest.fixture(scope="module")
def model(tiny_dir):
    from mup.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def vectors(vector_file):
    v = np.load(vector_file)
    return {"a": (v, STEER_LAYER), "b": (-0.5 * v[::-1].copy(), 1)}


@pytest.fixture(scope="module")
def engine(model, vectors, probe_file):
    from mup import probes
    from mup.engine import Engine, EngineConfig

    eng = Engine(
        model,
        vectors=vectors,
        custom_block=STEER_LAYER,
        probe=probes.load(probe_file),
        config=EngineConfig(max_slots=4, max_len=160, prefill_chunk=32, prefill_rows=(1, 4)),
    ).start()
    yield eng
    eng.close()


def test_custom_layer_is_the_old_name_of_custom_block(model):
    from mup.engine import Engine

    with pytest.warns(DeprecationWarning, match="Engine: the keyword custom_layer= is deprecated"):
        eng = Engine(model, custom_layer=1)  # not started: nothing compiles
    assert eng.custom_block == 1


@pytest.fixture(scope="module")
def prompts(model):
    from mup.text import encode_prompts

    return [tuple(x) for x in encode_prompts(model.tokenizer, CHATS)]


@pytest.fixture(scope="module")
def hf(tiny_dir):
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _req(ids, **kw):
    from mup.engine import Request

    return Request(prompt_ids=tuple(ids), **kw)


def test_rows_do_not_depend_on_batch_mates(engine, prompts, vectors):
    """Greedy, sampled and nucleus rows with different vectors, strengths and budgets, more of
    them than slots, submitted at once: each equals the same row run alone."""
    mask = [np.ones(len(p), bool) for p in prompts]
    own = np.random.default_rng(5).normal(size=engine.d_model).astype(np.float32)
    specs = [
        dict(max_tokens=8, vector="a", multiplier=-2.0),
        dict(max_tokens=14, vector="b", multiplier=3.0, temperature=0.9, seed=11),
        dict(max_tokens=11, vector=own, multiplier=1.0, temperature=0.7, top_p=0.8, seed=3),
        dict(max_tokens=6, vector=None),
        dict(max_tokens=12, vector="a", multiplier=2.5, temperature=1.3, seed=7),
        dict(max_tokens=9, vector="b", multiplier=-1.0),
    ]
    reqs = [
        _req(prompts[i % 4], probe_mask=mask[i % 4], logprobs=True, top_logprobs=3, **s)
        for i, s in enumerate(specs)
    ]
    solo = [engine.generate([r])[0] for r in reqs]
    steps, advanced = engine.stats["decode_steps"], engine.stats["advanced_rows"]
    together = engine.generate(reqs)
    steps, advanced = engine.stats["decode_steps"] - steps, engine.stats["advanced_rows"] - advanced
    # the tail, when one row is left, steps that row alone (a smaller slot bucket)
    assert steps <= advanced < steps * engine.config.max_slots
    for a, b in zip(solo, together, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(
            [t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=LOGPROB_ATOL
        )  # float32 rounding of other batch shapes, never a different token
        assert a.probe_score == pytest.approx(b.probe_score, abs=1e-4)
    assert all(r.batch_rows == 1 for r in solo)
    assert max(r.batch_rows for r in together) == engine.config.max_slots
    # the rows really differ: vectors, strengths and samplers each changed something
    assert len({tuple(r.token_ids) for r in together}) == len(together)


def test_equals_generate_and_own_vector_equals_named(engine, model, prompts, vectors):
    from mup.models import Steering, generate

    v, layer = vectors["a"]
    ms = [-2.0, 0.0, 1.0, 3.0]
    want = generate(
        model, [list(p) for p in prompts], max_new_tokens=10, steering=Steering(layer, v),
        multipliers=ms, chat=False,
    )  # fmt: skip
    named = engine.generate(
        [_req(p, max_tokens=10, vector="a", multiplier=m) for p, m in zip(prompts, ms, strict=True)]
    )
    own = engine.generate(
        [_req(p, max_tokens=10, vector=v, multiplier=m) for p, m in zip(prompts, ms, strict=True)]
    )
    for w, a, b in zip(want.token_ids, named, own, strict=True):
        assert a.token_ids == w and b.token_ids == w


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([list(ids)])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()  # [T, V]


def test_logprobs_and_prompt_logprobs_equal_transformers(engine, hf, prompts):
    """Unsteered greedy rows: each generated token's logprob and top-5 and every prompt token's
    logprob (echo; the 40-token prompt is prefilled in two chunks) equal transformers'."""
    ids = prompts[2]
    assert len(ids) > engine.config.prefill_chunk  # chunked prefill
    r = engine.generate(
        [_req(ids, max_tokens=6, logprobs=True, top_logprobs=5, prompt_logprobs=True)]
    )[0]
    ref = _hf_logprobs(hf, list(ids) + r.token_ids)  # position t predicts token t + 1
    n = len(ids)
    assert len(r.logprobs) == len(r.token_ids) and r.prompt_logprobs[0] is None
    assert len(r.prompt_logprobs) == n
    for k, t in enumerate(r.logprobs):
        row = ref[n - 1 + k]
        assert t.token_id == r.token_ids[k] == int(np.argmax(row))
        assert abs(t.logprob - row[t.token_id]) <= LOGPROB_ATOL
        top_ids = [i for i, _ in t.top]
        assert len(top_ids) == 5 and top_ids[0] == t.token_id
        np.testing.assert_allclose([lp for _, lp in t.top], row[top_ids], atol=LOGPROB_ATOL)
        assert set(top_ids) == set(np.argsort(-row)[:5].tolist())
    for c in range(1, n):
        t = r.prompt_logprobs[c]
        assert t.token_id == ids[c]
        assert abs(t.logprob - ref[c - 1, ids[c]]) <= LOGPROB_ATOL
        assert len(t.top) == 5
    # max_tokens 0: the prompt's logprobs only (vLLM's echo scoring)
    z = engine.generate([_req(ids, max_tokens=0, prompt_logprobs=True)])[0]
    assert z.token_ids == [] and z.finish_reason == "length"
    np.testing.assert_allclose(
        [t.logprob for t in z.prompt_logprobs[1:]],
        [t.logprob for t in r.prompt_logprobs[1:]],
        atol=1e-6,
    )


def test_probe_scores_come_from_the_same_pass(engine, hf, prompts, probe_file):
    """The prompt's probe score and the per-token scores of the completion equal the probe on
    transformers' hidden states at the probe layer (unsteered: no hook needed)."""
    from mup import probes

    probe = probes.load(probe_file)
    ids = prompts[0]
    r = engine.generate(
        [_req(ids, max_tokens=7, probe_mask=np.ones(len(ids), bool), probe_token_scores=True)]
    )[0]
    full = list(ids) + r.token_ids
    with torch.no_grad():
        hidden = hf(torch.tensor([full]), output_hidden_states=True).hidden_states[PROBE_LAYER]
    acts = hidden[0].numpy()  # [T, D]
    n = len(ids)
    want = probe.predict(probes.Activations(acts=acts[:n], offsets=np.array([0, n])))[0]
    assert r.probe_score == pytest.approx(float(want), abs=1e-4)
    logits, _ = probe.token_scores(
        probes.Activations(acts=acts[n:], offsets=np.array([0, len(r.token_ids)]))
    )
    assert len(r.probe_token_scores) == len(r.token_ids)
    np.testing.assert_allclose(r.probe_token_scores, 1 / (1 + np.exp(-logits)), atol=1e-4)


def test_several_probes_score_from_one_prefill(model, hf, prompts, probe_file):
    """Two probes at different layers (the residual stream entering block 1, and the token
    embeddings): one prefill captures both; each score equals that probe on transformers'
    hidden states."""
    from mup import probes
    from mup.engine import Engine, EngineConfig

    first = probes.load(probe_file)
    rng = np.random.default_rng(7)
    acts = rng.normal(size=(60, engine_d(model))).astype(np.float32)
    labels = (np.arange(12) % 2).astype(np.int8)
    second = probes.fit(
        "dom",
        probes.Activations(acts=acts, offsets=np.arange(0, 61, 5), labels=labels, layers=(0,)),
        layer=0,
    )
    eng = Engine(model, probe=[first, second], config=EngineConfig(max_slots=1, max_len=64)).start()
    try:
        ids = prompts[0]
        r = eng.generate([_req(ids, max_tokens=1, probe_mask=np.ones(len(ids), bool))])[0]
    finally:
        eng.close()
    assert eng.captures == ((0, "residual"), (PROBE_LAYER, "residual"))
    with torch.no_grad():
        hidden = hf(torch.tensor([list(ids)]), output_hidden_states=True).hidden_states
    for probe, layer, got in zip((first, second), (PROBE_LAYER, 0), r.probe_scores, strict=True):
        data = probes.Activations(acts=hidden[layer][0].numpy(), offsets=np.array([0, len(ids)]))
        assert got == pytest.approx(float(probe.predict(data)[0]), abs=1e-4)
    assert r.probe_score == r.probe_scores[0]


def engine_d(model) -> int:
    return int(model.config.d_model)


def test_late_row_joins_and_short_finishes_first(engine, prompts):
    long = _req(prompts[0], max_tokens=120, stop_ids=())
    short = _req(prompts[1], max_tokens=4, vector="b", multiplier=2.0)
    alone = engine.generate([short])[0]
    h_long = engine.submit(long)
    events = h_long.events()
    next(events), next(events)  # the long row is decoding
    h_short = engine.submit(short)
    got = h_short.result(60)
    assert not h_long.done, "the short row waited for the long one"
    assert got.token_ids == alone.token_ids and got.batch_rows == 2
    assert len(h_long.result(120).token_ids) == 120


def test_one_request_of_many_rows_does_not_starve_another(engine, prompts):
    """16 rows of one group on 4 slots, then a 1-row group: the small one takes the first slot
    that frees (not the 13th), so it is done while most of the big group still waits."""
    big = [
        engine.submit(_req(prompts[3], max_tokens=12, stop_ids=(), group="big")) for _ in range(16)
    ]
    time.sleep(0.05)
    small = engine.submit(_req(prompts[3], max_tokens=2, stop_ids=(), group="small"))
    small.result(120)
    assert sum(h.done for h in big) <= 8, "the small request waited behind the big one's rows"
    assert all(len(h.result(120).token_ids) == 12 for h in big)


def test_long_prompt_prefill_is_chunked_between_decode_steps(engine, model, prompts):
    """A 150-token prompt (5 chunks of 32) arriving while a row decodes: the decoding row keeps
    receiving tokens while the long prompt is prefilled, and the long row's output equals
    `mup.models.generate` (one unchunked prefill)."""
    from mup.models import generate

    long_ids = tuple((list(prompts[2]) * 4)[:150])
    want = generate(model, [list(long_ids)], max_new_tokens=6, chat=False).token_ids[0]
    h_dec = engine.submit(_req(prompts[0], max_tokens=100, stop_ids=()))
    events = h_dec.events()
    next(events), next(events)
    interleaved = engine.stats["interleaved_steps"]
    h_long = engine.submit(_req(long_ids, max_tokens=6))
    first = next(h_long.events())
    got = h_long.result(60)
    h_dec.cancel()
    h_dec.result(60)
    assert got.token_ids[0] == first.token_id and got.token_ids == want
    # a decode step ran between the prefill's chunks (budget: 4 chunks per turn, 5 chunks)
    assert engine.stats["interleaved_steps"] > interleaved


def test_cancel_frees_the_slot_at_the_next_step(engine, prompts):
    h = engine.submit(_req(prompts[3], max_tokens=120, stop_ids=()))
    events = h.events()
    next(events)
    h.cancel()
    r = h.result(30)
    assert r.finish_reason == "cancelled" and len(r.token_ids) < 120
    deadline = time.monotonic() + 10
    while engine.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running() == 0


def test_stop_strings_cut_text_and_stream_holds_back(engine, prompts):
    """A stop string ends the row where it first appears; the streamed pieces (which hold back
    a tail that may still become the stop string) add up to the final text."""
    full = engine.generate([_req(prompts[1], max_tokens=24, stop_ids=())])[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3
    h = engine.submit(_req(prompts[1], max_tokens=24, stop_ids=(), stop=(stop,)))
    pieces = [e.text for e in h.events()]
    r = h.result(0)
    assert r.text == full.text[: full.text.find(stop)] and r.finish_reason == "stop"
    assert "".join(pieces) == r.text
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and len(r.token_ids) < 24


def test_bad_requests_are_refused(engine, prompts):
    with pytest.raises(ValueError, match="unknown steering vector"):
        engine.submit(_req(prompts[0], max_tokens=2, vector="zzz"))
    with pytest.raises(ValueError, match="slot length"):
        engine.submit(_req(prompts[0], max_tokens=200))
    with pytest.raises(ValueError, match="0 only with prompt logprobs"):
        engine.submit(_req(prompts[0], max_tokens=0))
    with pytest.raises(ValueError, match="finite floats"):
        engine.submit(_req(prompts[0], max_tokens=2, vector=np.zeros(3, np.float32)))
