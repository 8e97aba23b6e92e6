"""The finetuned baseline on a tiny random llama: the classifier head against a hand
computation, LoRA's algebra, what one step may change, training on a separable task,
checkpoints, resume, score files, the command line and the errors."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support.toy import toy_records

from mup import metrics
from mup.models import jit_forward
from mup.monitors import (
    FinetuneCheckpointError,
    FinetuneConfig,
    LoraConfig,
    classifier_logits,
    finetune,
    finetuned_monitor_name,
    init_head,
    init_lora,
    last_token_index,
    llm_flops,
    load_finetuned,
    merge_lora,
    read_scores,
    score_records,
)
from mup.monitors import _finetune as ft_impl
from mup.text import encode_chats

ALL = ("q", "k", "v", "o", "gate", "up", "down")
# Jitted: eager dispatch of the decoder's scan costs seconds per call.
logits_of = jax.jit(classifier_logits, static_argnames="config")
merged_of = jax.jit(merge_lora, static_argnums=2)
# One length bucket (every toy record is < 16 tokens with the template): one compiled program
# per batch size for the whole module.
SMALL = dict(max_tokens=16, min_bucket=16, batch_size=8, eval_batch_size=8)


def _head(model, seed=1):
    head = init_head(model.config.d_model, jax.random.key(seed))
    # Larger than the init so that the logits differ clearly between records.
    return {"w": head["w"] * 50.0, "bias": jnp.array([0.1, -0.2])}


def _rows(model, records):
    enc = encode_chats(model.tokenizer, records)
    return [enc.row(i)[0] for i in range(len(enc))]


def _padded(rows, width, side):
    tokens = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, sl] = r
        valid[i, sl] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_are_the_head_on_the_last_real_tokens_final_hidden_state(tiny_model, side):
    model = tiny_model
    head = _head(model)
    rows = _rows(model, toy_records(3, seed=5))
    assert len({len(r) for r in rows}) > 1  # padding actually happens
    tokens, valid = _padded(rows, max(map(len, rows)) + 3, side)
    got = np.asarray(logits_of(model.params, head, tokens, valid, config=model.config))
    for i, r in enumerate(rows):
        t = jnp.asarray(r)[None]
        out = jit_forward(
            model.params,
            t,
            jnp.arange(len(r))[None],
            config=model.config,
            capture=(model.config.n_layers,),
            logits=False,
        )
        h = np.asarray(out.hidden[model.config.n_layers])[0, -1]  # final-normed, last token
        want = h @ np.asarray(head["w"]) + np.asarray(head["bias"])
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got[:, 1] - got[:, 0]) > 1e-2  # the rows really differ
    want_last = [len(r) - 1 for r in rows] if side == "right" else [tokens.shape[1] - 1] * 3
    np.testing.assert_array_equal(np.asarray(last_token_index(valid)), want_last)


def test_lora_at_init_leaves_the_forward_unchanged(tiny_model):
    model = tiny_model
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    adapters = init_lora(model.config, lora, jax.random.key(0))
    merged = merged_of(model.params, adapters, lora)
    for name in ALL:  # B = 0: W + scale * A @ 0 is W, bit for bit
        np.testing.assert_array_equal(merged["layers"][name], model.params["layers"][name])
        assert float(jnp.abs(adapters[name]["a"]).max()) > 0  # A itself is not zero
    tokens, valid = _padded(_rows(model, toy_records(2, seed=1)), 14, "right")
    head = _head(model)
    base = logits_of(model.params, head, tokens, valid, config=model.config)
    with_lora = logits_of(merged, head, tokens, valid, config=model.config)
    np.testing.assert_array_equal(base, with_lora)


@pytest.mark.parametrize("target", ["q", "o", "down"])
def test_lora_delta_is_x_a_b_on_the_flattened_weight(tiny_model, target):
    """x @ (W + s A B) == x @ W + s (x_flat @ A) @ B: the flattening of the weight's input and
    output axes is the one the decoder uses (o: heads-major N*H, as HF's o_proj input)."""
    model = tiny_model
    lora = LoraConfig(rank=3, alpha=6.0, targets=(target,))
    adapters = init_lora(model.config, lora, jax.random.key(2))
    b = adapters[target]["b"]
    adapters[target]["b"] = jax.random.normal(jax.random.key(3), b.shape)
    merged = merged_of(model.params, adapters, lora)
    w = np.asarray(model.params["layers"][target][1], np.float64)  # layer 1: [*in, *out]
    m = np.asarray(merged["layers"][target][1], np.float64)
    a = np.asarray(adapters[target]["a"][1], np.float64)  # [I, R]
    bb = np.asarray(adapters[target]["b"][1], np.float64)  # [R, O]
    n_in = 2 if target == "o" else 1
    x = np.random.default_rng(0).standard_normal(w.shape[:n_in])
    axes = (tuple(range(n_in)), tuple(range(n_in)))
    got = np.tensordot(x, m, axes=axes).reshape(-1)
    want = np.tensordot(x, w, axes=axes).reshape(-1) + lora.scale * (x.reshape(-1) @ a @ bb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _one_step(model, cfg, records):
    """Initial and updated trainables after one optimizer step (the library's own programs)."""
    tok = ft_impl._tokenize(model.tokenizer, records, cfg.max_tokens)
    (batch,) = ft_impl._plan(tok, cfg.batch_size, ft_impl._buckets(cfg), seed=0)
    tokens, valid, w = ft_impl._pad(tok, batch.rows, batch.padded_len, cfg.batch_size)
    labels = np.array([r.label for r in records], np.int32)[batch.rows]
    head = init_head(model.config.d_model, jax.random.key(0))
    if cfg.lora is None:
        trainable = {"head": head, "params": jax.tree.map(jnp.copy, model.params)}
        frozen = None
    else:
        trainable = {"head": head, "lora": init_lora(model.config, cfg.lora, jax.random.key(1))}
        frozen = model.params
    before = jax.tree.map(np.asarray, trainable)
    _, micro = ft_impl._programs(model.config, cfg.lora, cfg.dtype)
    tx, apply = ft_impl._update_program(cfg, 10, trainable)
    opt_state = tx.init(trainable)
    acc = jax.tree.map(jnp.zeros_like, trainable)
    acc, _ = micro(trainable, frozen, acc, tokens, valid, labels, w)
    after, _, _, _ = apply(trainable, opt_state, acc, jnp.float32(len(batch.rows)))
    return before, jax.tree.map(np.asarray, after)


def test_one_lora_step_changes_only_the_adapters_and_the_head(tiny_model):
    model = tiny_model
    params_before = jax.tree.map(np.asarray, model.params)
    cfg = FinetuneConfig(lora=LoraConfig(rank=2, targets=("q", "v")), lr=1e-2, **SMALL)
    before, after = _one_step(model, cfg, toy_records(8, seed=3))
    assert sorted(after) == ["head", "lora"]  # nothing else is trainable
    assert sorted(after["lora"]) == ["q", "v"]
    assert not np.array_equal(before["head"]["w"], after["head"]["w"])
    assert not np.array_equal(before["head"]["bias"], after["head"]["bias"])
    for t in ("q", "v"):  # B leaves zero; A moves by weight decay only (B = 0: no gradient)
        assert not np.array_equal(before["lora"][t]["b"], after["lora"][t]["b"])
        assert np.abs(after["lora"][t]["b"]).max() > 0
    # The base weights are bit for bit what they were.
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), params_before
    )


def test_one_full_step_changes_the_body(tiny_model):
    model = tiny_model
    cfg = FinetuneConfig(lora=None, lr=1e-3, **SMALL)
    before, after = _one_step(model, cfg, toy_records(8, seed=3))
    assert sorted(after) == ["head", "params"]
    for name in ALL:
        assert not np.array_equal(before["params"]["layers"][name], after["params"]["layers"][name])
    # Norm weights get gradients but no decay: they move, yet not towards 0 by lr * wd alone.
    assert not np.array_equal(before["params"]["final_norm"], after["params"]["final_norm"])


def test_gradient_accumulation_equals_the_whole_batch(tiny_model):
    """Two micro-batches of 4 summed into one step == one micro-batch of 8."""
    model = tiny_model
    cfg = FinetuneConfig(lora=LoraConfig(rank=2), lr=1e-2, **SMALL)
    records = toy_records(8, seed=4)
    tok = ft_impl._tokenize(model.tokenizer, records, cfg.max_tokens)
    labels = np.array([r.label for r in records], np.int32)
    trainable = {
        "head": init_head(model.config.d_model, jax.random.key(0)),
        "lora": init_lora(model.config, cfg.lora, jax.random.key(1)),
    }
    trainable["lora"]["v"]["b"] = jnp.full_like(trainable["lora"]["v"]["b"], 0.05)
    _, micro = ft_impl._programs(model.config, cfg.lora, cfg.dtype)
    tx, update = ft_impl._update_program(cfg, 10, trainable)
    results = []
    for rows in ([np.arange(8)], [np.arange(4), np.arange(4, 8)]):
        start = jax.tree.map(jnp.copy, trainable)  # the update donates its inputs
        acc = jax.tree.map(jnp.zeros_like, start)
        for r in rows:
            tokens, valid, w = ft_impl._pad(tok, r, 16, len(r))
            acc, _ = micro(start, model.params, acc, tokens, valid, labels[r], w)
        new, _, _, norm = update(start, tx.init(start), acc, jnp.float32(8))
        results.append((jax.tree.map(np.asarray, new), float(norm)))
    (one, n1), (two, n2) = results
    assert n1 == pytest.approx(n2, rel=1e-5) and n1 > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one, two)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A LoRA finetune of the toy task (train 64, val 32 records)."""
    out = tmp_path_factory.mktemp("ft")
    train, val = toy_records(64, seed=10), toy_records(32, seed=11, prefix="v")
    cfg = FinetuneConfig(
        lora=LoraConfig(rank=4, alpha=8.0, targets=ALL),
        lr=1e-2,
        epochs=6,
        patience=3,
        eval_every=4,
        warmup_ratio=0.1,
        **SMALL,
    )
    result = finetune(tiny_model, train, val, out, cfg, progress=False)
    return result, out, val, cfg


def test_finetune_learns_a_separable_task(trained):
    result, out, val, cfg = trained
    assert result.best_val_auroc >= 0.95, result.history
    hist = result.history
    losses = [h["train_loss"] for h in hist]
    assert losses[0] > 0.5 and losses[-1] < 0.5 * losses[0], losses  # it learnt from chance
    # Validation every 4 steps; stopped after `patience` evaluations without a better AUROC.
    assert [h["step"] for h in hist] == list(range(4, result.steps + 1, 4))
    best = [h["step"] for h in hist].index(result.best_step)
    assert result.stopped_early and len(hist) - 1 - best == cfg.patience
    assert result.steps < result.total_steps == 6 * 8  # 64 records / 8 rows, 6 epochs
    assert max(h["val_auroc"] for h in hist) == result.best_val_auroc
    assert result.records_seen == 8 * result.steps and result.records_per_s > 0
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["step"] == result.best_step and meta["val_auroc"] == result.best_val_auroc
    assert [p.name for p in out.glob("weights-*.safetensors")] == [meta["weights"]]
    mode = (out / meta["weights"]).stat().st_mode & 0o777
    assert mode == (out / "finetune.json").stat().st_mode & 0o777  # not left private


def test_checkpoint_round_trip_and_score_files(trained, tiny_model, tiny_dir, tmp_path):
    result, out, val, cfg = trained
    # The base model is found from the checkpoint's own metadata (the tiny checkpoint dir).
    loaded = load_finetuned(out)
    assert loaded.model.spec.path.resolve() == tiny_dir.resolve()
    assert loaded.monitor == finetuned_monitor_name(tiny_dir.name, cfg.lora)
    assert loaded.monitor == f"finetuned:{tiny_dir.name}/lora-r4"
    unlabelled = toy_records(3, seed=12, prefix="u")
    unlabelled = [type(r)(**{**r.__dict__, "label": None}) for r in unlabelled]
    records = [*val, *unlabelled]
    probs = score_records(loaded, records, dataset="toy/val", out=tmp_path / "s.jsonl")
    assert probs.shape == (len(records),) and np.all((probs >= 0) & (probs <= 1))
    # The reloaded checkpoint scores what the training run measured.
    labels = np.array([r.label for r in val])
    assert metrics.auroc(probs[: len(val)], labels) == pytest.approx(result.best_val_auroc)
    again = score_records(out, records[:5], model=tiny_model)  # the directory form
    np.testing.assert_allclose(again, probs[:5], rtol=1e-6)

    scores = read_scores(tmp_path / "s.jsonl")
    assert scores.monitor == loaded.monitor and scores.datasets == ("toy/val",)
    assert list(scores.ids) == [r.id for r in records]
    np.testing.assert_array_equal(scores.labels, [*labels, -1, -1, -1])
    np.testing.assert_allclose(scores.scores, probs)
    n = [len(encode_chats(tiny_model.tokenizer, [r]).input_ids) for r in records]
    np.testing.assert_array_equal(scores.n_tokens, n)
    d = tiny_model.config.d_model
    want = [llm_flops(tiny_model.config, k, logit_positions=0) + 2 * d * 2 for k in n]
    np.testing.assert_allclose(scores.flops, want)
    assert scores.evaluate()[loaded.monitor]["toy/val"]["auroc"] == pytest.approx(
        result.best_val_auroc
    )


def test_bfloat16_scoring_tracks_float32(trained, tiny_model):
    _, out, val, _ = trained
    f32 = load_finetuned(out, model=tiny_model).predict(val)
    bf16 = load_finetuned(out, model=tiny_model, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    np.testing.assert_allclose(bf16.predict(val), f32, atol=0.05)


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tiny_model, tmp_path, monkeypatch):
    train, val = toy_records(16, seed=20), toy_records(8, seed=21, prefix="v")
    cfg = FinetuneConfig(lora=LoraConfig(rank=2), lr=5e-3, epochs=3, patience=0, **SMALL)
    whole = finetune(tiny_model, train, val, tmp_path / "whole", cfg, progress=False)

    real = ft_impl._save_resume
    calls = []

    def crash_after_first(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt  # the process dies right after the epoch-1 state is saved

    monkeypatch.setattr(ft_impl, "_save_resume", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model, train, val, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(ft_impl, "_save_resume", real)
    with pytest.raises(FileExistsError, match="resume=True"):
        finetune(tiny_model, train, val, tmp_path / "cut", cfg, progress=False)
    with pytest.raises(FinetuneCheckpointError, match="config"):
        other = FinetuneConfig(lora=LoraConfig(rank=2), lr=1e-3, epochs=3, patience=0, **SMALL)
        finetune(tiny_model, train, val, tmp_path / "cut", other, resume=True, progress=False)
    resumed = finetune(tiny_model, train, val, tmp_path / "cut", cfg, resume=True, progress=False)
    assert resumed.steps == whole.steps and resumed.records_seen == 2 * 16  # epochs 2 and 3 only
    assert [h["val_auroc"] for h in resumed.history] == [h["val_auroc"] for h in whole.history]
    a = load_finetuned(tmp_path / "whole", model=tiny_model).trainable
    b = load_finetuned(tmp_path / "cut", model=tiny_model).trainable
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_bad_inputs_give_clear_errors(tiny_model, tmp_path, trained):
    with pytest.raises(ValueError, match=r"unknown LoRA target module\(s\) \['qproj'\]"):
        LoraConfig(targets=("q", "qproj"))
    for rank in (0, -2):
        with pytest.raises(ValueError, match="rank must be an int > 0"):
            LoraConfig(rank=rank)
    with pytest.raises(ValueError, match="at least one target"):
        LoraConfig(targets=())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        FinetuneConfig(batch_size=0)
    val = toy_records(8, seed=1)
    with pytest.raises(ValueError, match="the train set is empty"):
        finetune(tiny_model, [], val, tmp_path / "a", progress=False)
    high_only = toy_records(6, seed=2, label=1)
    with pytest.raises(ValueError, match="the val set has only high-stakes records"):
        finetune(tiny_model, val, high_only, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="the train set has only high-stakes records"):
        finetune(tiny_model, high_only, val, tmp_path / "c", progress=False)
    ambiguous = [type(r)(**{**r.__dict__, "label": 2}) for r in toy_records(2, seed=3)]
    with pytest.raises(ValueError, match="2 records without a high/low-stakes label"):
        finetune(tiny_model, val + ambiguous, None, tmp_path / "d", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before any work
    with pytest.raises(FinetuneCheckpointError, match="no finetune.json"):
        load_finetuned(tmp_path)
    with pytest.raises(ValueError, match="needs the dataset name"):
        score_records(trained[1], val, out=tmp_path / "x.jsonl", model=tiny_model)


def test_a_damaged_checkpoint_is_refused(trained, tiny_model, tmp_path):
    _, out, _, _ = trained
    meta = json.loads((out / "finetune.json").read_text())
    (tmp_path / "finetune.json").write_text(
        json.dumps(
            {
                **meta,
                "lora": None,
                "config": {**meta["config"], "lora": {"rank": 8, "alpha": 8.0, "targets": ["q"]}},
            }
        )
    )
    (tmp_path / meta["weights"]).write_bytes((out / meta["weights"]).read_bytes())
    with pytest.raises(FinetuneCheckpointError, match="do not fit the config"):
        load_finetuned(tmp_path, model=tiny_model)
    (tmp_path / meta["weights"]).write_bytes(b"not safetensors")
    with pytest.raises(FinetuneCheckpointError, match="unreadable safetensors"):
        load_finetuned(tmp_path, model=tiny_model)


def _jsonl(path, records, split=None):
    with open(path, "w") as f:
        for r in records:
            row = {"inputs": r.messages[0].content, "ids": r.id, "labels": r.label}
            if split:
                row["split"] = split(r)
            f.write(json.dumps(row) + "\n")
    return path


def test_command_line_finetune_then_score(tiny_dir, tmp_path, capsys, monkeypatch):
    from mup.monitors._cli import main

    # `run` turns on the persistent XLA cache; a test must not write into the user's home.
    monkeypatch.setenv("MUP_COMPILATION_CACHE", "0")
    records = toy_records(24, seed=30)
    data = _jsonl(
        tmp_path / "toy.jsonl",
        records,
        split=lambda r: "test" if r.id.endswith(("1", "2")) else "train",
    )
    out = tmp_path / "ckpt"
    args = ["finetune", "--model", str(tiny_dir), "--train", str(data), "--out", str(out)]
    # The adapters of the `trained` fixture: the step program compiled there is reused.
    args += ["--lora-rank", "4", "--lora-targets", ",".join(ALL), "--max-tokens", "16"]
    args += ["--min-bucket", "16", "--batch-size", "8", "--eval-batch-size", "8", "--lr", "1e-2"]
    args += ["--max-records", "12", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_train"] == 12 and summary["n_val"] == 6  # the file's test split
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(ALL)}
    assert meta["data"]["train"]["path"] == str(data)

    # Again into the same directory: refused with a message, not a traceback.
    assert main(args) == 2
    assert "already holds a finetune checkpoint" in capsys.readouterr().err

    dev_records = toy_records(10, seed=31, prefix="d")
    dev = _jsonl(tmp_path / "dev.jsonl", dev_records)
    scores = tmp_path / "scores"
    assert main(["score", "--checkpoint", str(out), "--dataset", str(dev), "--dataset", str(data),
                 "--out", str(scores), "--no-progress", "--max-records", "7"]) == 0  # fmt: skip
    read = read_scores(scores)
    assert sorted(read.datasets) == ["dev", "toy"] and len(read) == 14
    assert read.monitor == f"finetuned:{tiny_dir.name}/lora-r4"
    # --limit: the first N records, the same ones every other monitor's --limit scores
    first = tmp_path / "first"
    assert main(["score", "--checkpoint", str(out), "--dataset", str(dev), "--out", str(first),
                 "--no-progress", "--limit", "4"]) == 0  # fmt: skip
    assert read_scores(first).ids == tuple(r.id for r in dev_records[:4])
    assert main(["score", "--checkpoint", str(out), "--dataset", "no/such-set", "--out",
                 str(scores)]) == 2  # fmt: skip
    assert "neither a file nor a data set name" in capsys.readouterr().err


def test_monitor_names():
    assert finetuned_monitor_name("smollm2-135m", None) == "finetuned:smollm2-135m"
    assert finetuned_monitor_name("meta-llama/Llama-3.2-1B", LoraConfig(rank=16)) == (
        "finetuned:Llama-3.2-1B/lora-r16"
    )
    assert math.isclose(LoraConfig(rank=4, alpha=8).scale, 2.0)
    assert FinetuneConfig(lora=None).learning_rate == 2e-5
    assert FinetuneConfig().learning_rate == 2e-4
    assert LoraConfig(targets=("v", "q")).targets == ("q", "v")  # canonical order
