"""Generation on a tiny random llama saved as a real checkpoint directory (weights + tokenizer).

The jitted prefill + while_loop is checked token for token against the uncached Python
reference loop and against transformers' `generate`; steering, stop tokens and per-row
independence are checked on the same model. One model, few shapes: compiles are shared.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support.checkpoints import SPECIALS, TINY_HF, word_tokenizer

from mup.models import (
    Greedy,
    Steering,
    Temperature,
    TopP,
    default_stop_tokens,
    generate,
    generate_reference,
    load_model,
)

torch = pytest.importorskip("torch", reason="torch is the parity reference")
transformers = pytest.importorskip("transformers", reason="transformers builds the tiny model")

VOCAB = TINY_HF["vocab_size"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
PROMPTS = [
    [{"role": "user", "content": "w1 w2 w3"}],
    [{"role": "system", "content": "w9"}, {"role": "user", "content": "w4 w5 w6 w7 w8 w10 w11"}],
    "w20 w21",  # a bare string is one user message
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(mup Model, HF model) of one tiny llama, saved and re-loaded from disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    # Three blocks and an untied head; rms_norm_eps stays transformers' default (1e-6).
    own = dict(num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=False)
    ids = dict(eos_token_id=2, pad_token_id=2, bos_token_id=1)
    config = transformers.LlamaConfig(**(TINY_HF | own | ids))
    hf = transformers.LlamaForCausalLM(config).eval()
    # Re-draw the weights large: at the default 0.02 init the logits are nearly uniform and
    # greedy decoding would hinge on float rounding.
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.25 if "embed" not in name else 1.0)
    hf.save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return load_model(path), hf


def _steer_vector(model, seed=1):
    v = np.random.default_rng(seed).normal(size=model.config.d_model).astype(np.float32)
    return v / np.linalg.norm(v) * 4.0


def _steering(model):
    # Every test steers the same two blocks: the loop is compiled once per batch size.
    return Steering((1, 2), [_steer_vector(model, 1), _steer_vector(model, 2)])


def test_loads_tokenizer_and_rejects_bad_dtype(tiny):
    model, _ = tiny
    assert model.config.n_layers == 3 and model.dtype == "float32"
    assert default_stop_tokens(model.tokenizer) == [2]
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(model.spec.path, dtype="float64")


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_jit_loop_equals_reference_with_steering(tiny, positions):
    model, _ = tiny
    kwargs = dict(
        max_new_tokens=MAX_NEW,
        stop_tokens=(),
        steering=_steering(model),
        multipliers=[-2.0, 0.0, 3.0],
        steer_positions=positions,
    )
    ours = generate(model, PROMPTS, **kwargs)
    ref = generate_reference(model, PROMPTS, **kwargs)
    assert ours.token_ids == ref.token_ids
    assert ours.prompt_ids == ref.prompt_ids
    assert all(len(ids) == MAX_NEW for ids in ours.token_ids)


@pytest.mark.parametrize("sampler", [Temperature(t=1.5), TopP(p=0.8, t=2.0)], ids=repr)
def test_seeded_sampling_equals_reference(tiny, sampler):
    model, _ = tiny
    kwargs = dict(max_new_tokens=MAX_NEW, sampler=sampler, stop_tokens=())
    a = generate(model, PROMPTS, seed=7, **kwargs)
    assert a.token_ids == generate_reference(model, PROMPTS, seed=7, **kwargs).token_ids
    assert a.token_ids == generate(model, PROMPTS, seed=7, **kwargs).token_ids
    b = generate(model, PROMPTS, seed=8, **kwargs)
    assert a.token_ids != b.token_ids  # the seed matters
    greedy = generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=())
    assert a.token_ids != greedy.token_ids  # and sampling is not argmax


def test_top_p_keeps_only_the_nucleus():
    import jax
    import jax.numpy as jnp

    # Probabilities 0.5, 0.3, 0.15, 0.05: with p = 0.75 only the first two can be drawn.
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 2000))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    drawn = np.asarray(jax.jit(TopP(p=0.75, t=1.0))(logits, keys))
    counts = np.bincount(drawn, minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the nucleus
    assert np.asarray(jax.jit(Greedy())(logits[:1], keys[:1])).tolist() == [1]


def test_stop_tokens_end_rows(tiny):
    model, _ = tiny
    free = generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=())
    # Stop on the token row 1 emits at step 4 (if it also appears earlier, that is where it ends).
    stop = free.token_ids[1][4]
    out = generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=[stop])
    ref = generate_reference(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=[stop])
    assert out.token_ids == ref.token_ids
    for row, full in zip(out.token_ids, free.token_ids, strict=True):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:end]
    assert out.finished[1] and out.token_ids[1][-1] == stop


def test_multiplier_zero_equals_no_steering(tiny):
    model, _ = tiny
    plain = generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=())
    steer = _steering(model)
    zero = generate(
        model,
        PROMPTS,
        max_new_tokens=MAX_NEW,
        stop_tokens=(),
        steering=steer,
        multipliers=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    )
    strong = generate(
        model,
        PROMPTS,
        max_new_tokens=MAX_NEW,
        stop_tokens=(),
        steering=steer,
        multipliers=[4.0, 4.0, 4.0],
    )
    assert zero.token_ids == plain.token_ids
    assert strong.token_ids != plain.token_ids  # the vector does act


def test_rows_independent_of_other_rows_multipliers(tiny):
    model, _ = tiny
    steer = _steering(model)
    prompt = PROMPTS[1]
    mults = [-3.0, 0.0, 3.0]
    kwargs = dict(max_new_tokens=MAX_NEW, stop_tokens=(), steering=steer)
    together = generate(model, [prompt] * 3, multipliers=mults, **kwargs)
    alone = [generate(model, [prompt], multipliers=[m], **kwargs).token_ids[0] for m in mults]
    assert together.token_ids == alone
    assert len({tuple(ids) for ids in alone}) == 3  # the strengths do differ


def test_greedy_equals_transformers_generate(tiny):
    model, hf = tiny
    ours = generate(model, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=[VOCAB - 1])
    for prompt_ids, new_ids in zip(ours.prompt_ids, ours.token_ids, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=VOCAB - 1,
                pad_token_id=2,
            )
        assert out[0, len(prompt_ids) :].tolist() == new_ids
    assert ours.texts[0] == model.tokenizer.decode(ours.token_ids[0], skip_special_tokens=True)


def test_bad_arguments(tiny):
    model, _ = tiny
    steer = Steering(1, _steer_vector(model))
    with pytest.raises(ValueError, match=r"multipliers must have shape \[3\]"):
        generate(model, PROMPTS, steering=steer, multipliers=[1.0, 2.0])
    with pytest.raises(ValueError, match="multipliers were given without a steering vector"):
        generate(model, PROMPTS, multipliers=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="steer_positions"):
        generate(model, PROMPTS, steering=steer, steer_positions="middle")
    with pytest.raises(ValueError, match=r"steering blocks \[3\] out of range"):
        generate(model, PROMPTS, steering=Steering(3, _steer_vector(model)))
    with pytest.raises(ValueError, match="d_model is 64"):
        generate(model, PROMPTS, steering=Steering(1, np.ones(65)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[5, 6, 500]])
    with pytest.raises(ValueError, match=r"stop tokens \[128\] outside the vocabulary"):
        generate(model, PROMPTS, stop_tokens=[2, VOCAB])
    with pytest.raises(TypeError, match="wrap a single one"):
        generate(model, "w1 w2")
