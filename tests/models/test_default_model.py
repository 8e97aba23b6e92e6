"""The embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the
same file: tensors, hidden states at every layer, logits, and greedy chat generation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch", reason="torch is the parity reference")
transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Give me three tips for staying focused while studying."},
    ],
]
# Hidden states grow to |h| ~ 1e2 in late layers; float32 over 30 layers with different
# summation orders (XLA vs. torch) stays within this fraction of the largest magnitude.
HIDDEN_RTOL = 1e-5
LOGIT_ATOL = 2e-4


@pytest.fixture(scope="module")
def models():
    from mup._resolve import default_gguf_path
    from mup.models import load_model

    try:
        path = default_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ours = load_model("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return ours, hf


def test_tensors_equal_transformers_gguf_loading(models):
    from mup.models import iter_hf_tensors

    ours, hf = models
    state = hf.state_dict()
    seen = set()
    for name, array in iter_hf_tensors(ours.spec):
        seen.add(name)
        np.testing.assert_array_equal(array, state[name].numpy(), err_msg=name)
    # The GGUF has tied embeddings: transformers' lm_head is the embedding matrix.
    assert seen == set(state) - {"lm_head.weight"}


def test_hidden_states_and_logits_match_transformers(models):
    import jax.numpy as jnp

    from mup.models import jit_forward
    from mup.text import encode_prompts

    ours, hf = models
    L = ours.config.n_layers
    ids = encode_prompts(ours.tokenizer, CHATS)
    T = max(len(x) for x in ids)
    # Right padding for capture: padded positions come after every real token.
    tokens = np.zeros((len(ids), T), np.int32)
    valid = np.zeros((len(ids), T), bool)
    for b, row in enumerate(ids):
        tokens[b, : len(row)] = row
        valid[b, : len(row)] = True
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    out = jit_forward(
        ours.params,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        config=ours.config,
        valid=jnp.asarray(valid),
        capture=tuple(range(L + 1)),
    )
    worst_hidden = worst_logits = 0.0
    for b, row in enumerate(ids):
        with torch.no_grad():
            ref = hf(torch.tensor([row]), output_hidden_states=True)
        n = len(row)
        for layer in range(L + 1):
            want = ref.hidden_states[layer][0].numpy()
            got = np.asarray(out.hidden[layer][b, :n])
            diff = float(np.abs(got - want).max())
            scale = float(np.abs(want).max())
            assert diff <= HIDDEN_RTOL * max(scale, 1.0), (b, layer, diff, scale)
            worst_hidden = max(worst_hidden, diff / max(scale, 1.0))
        logit_diff = float(np.abs(np.asarray(out.logits[b, :n]) - ref.logits[0].numpy()).max())
        assert logit_diff <= LOGIT_ATOL, (b, logit_diff)
        worst_logits = max(worst_logits, logit_diff)
    print(
        f"\nsmollm2 vs transformers: hidden max |diff|/max|h| {worst_hidden:.2e}, "
        f"logits max |diff| {worst_logits:.2e}"
    )


def test_greedy_chat_generation_matches_transformers(models):
    from mup.models import default_stop_tokens, generate

    ours, hf = models
    stops = default_stop_tokens(ours.tokenizer)
    gen = generate(ours, CHATS, max_new_tokens=32)
    for prompt_ids, new_ids in zip(gen.prompt_ids, gen.token_ids, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        assert out[0, len(prompt_ids) :].tolist() == new_ids
    assert "Paris" in gen.texts[0]


def test_engine_logprobs_match_transformers(models):
    """`mup.engine`'s logprobs on the default model (generated tokens with top-5, and echo's
    prompt-token logprobs) equal a float32 log-softmax of transformers' logits, <= 1e-3."""
    from mup.engine import Engine, EngineConfig, Request
    from mup.text import encode_prompts

    ours, hf = models
    ids = encode_prompts(ours.tokenizer, CHATS[:1])[0]
    engine = Engine(ours, config=EngineConfig(max_slots=2, max_len=128, prefill_rows=(1,)))
    engine.start()
    try:
        r = engine.generate(
            [Request(prompt_ids=tuple(ids), max_tokens=8, logprobs=True, top_logprobs=5,
                     prompt_logprobs=True)]
        )[0]  # fmt: skip
    finally:
        engine.close()
    full = list(ids) + r.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1).numpy()
    n = len(ids)
    got = [t.logprob for t in r.prompt_logprobs[1:]] + [t.logprob for t in r.logprobs]
    want = [ref[c - 1, full[c]] for c in range(1, len(full))]
    np.testing.assert_allclose(got, want, atol=1e-3)
    for k, t in enumerate(r.logprobs):
        top_ids = [i for i, _ in t.top]
        assert top_ids[0] == t.token_id == int(np.argmax(ref[n - 1 + k]))  # greedy
        np.testing.assert_allclose([lp for _, lp in t.top], ref[n - 1 + k, top_ids], atol=1e-3)
