"""Every probe kind: learning a planted signal, mask-correctness, determinism, files, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _support.activations import FAST, D, scramble_unread, synth

from mup import metrics, native, probes
from mup.probes._heads import sequence_logits

GRADIENT = ("mean", "max", "last", "softmax", "rolling", "attention", "linear_mean")


def test_default_configs_follow_the_paper():
    for kind in probes.PROBE_KINDS:
        cfg = probes.default_config(kind)
        assert cfg.kind == kind
        if kind in GRADIENT and kind != "attention":
            assert (cfg.batch_size, cfg.lr, cfg.final_lr) == (16, 5e-3, 1e-4)
            assert (cfg.weight_decay, cfg.epochs, cfg.patience) == (1e-3, 200, 50)
    att = probes.default_config("attention")
    assert (att.batch_size, att.final_lr, att.lr) == (128, 5e-4, 5e-3)
    assert probes.default_config("softmax").temperature == 5.0
    assert probes.default_config("rolling").window == 40
    assert probes.default_config("mean", lr=1e-2).lr == 1e-2
    with pytest.raises(ValueError, match="unknown probe config field.*lrr"):
        probes.default_config("mean", lrr=1e-2)
    with pytest.raises(ValueError, match="unknown probe kind 'bogus'"):
        probes.default_config("bogus")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        probes.default_config("mean", batch_size=0)


@pytest.mark.parametrize("kind", probes.PROBE_KINDS)
def test_kind_learns_planted_signal_and_is_mask_correct(kind, fitted, val_data):
    probe = fitted(kind)
    p = probe.predict(val_data)
    assert p.dtype == np.float32 and p.shape == (val_data.n_records,)
    assert np.all((p >= 0) & (p <= 1))
    assert metrics.auroc(p, val_data.labels) > 0.9
    # Unmasked tokens carry a perfectly predictive decoy: replacing them changes nothing.
    p2 = probe.predict(scramble_unread(val_data, seed=5))
    np.testing.assert_allclose(p2, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["max", "softmax", "rolling", "attention"])
def test_sequence_logits_ignore_padding_and_match_reference(kind):
    rng = np.random.default_rng(3)
    b, p, d = 5, 16, D
    lengths = np.array([1, 4, 16, 7, 12])
    m = np.arange(p)[None, :] < lengths[:, None]  # [B, P]
    x = rng.normal(size=(b, p, d)).astype(np.float32)
    params = {
        k: rng.normal(size=s).astype(np.float32)
        for k, s in {"w": (d,), "b": (), "q": (d,), "qb": ()}.items()
    }
    kw = dict(kind=kind, temperature=5.0, window=6)
    z = np.asarray(sequence_logits(params, x, m, **kw))
    x_garbage = np.where(m[..., None], x, 1e4 * rng.normal(size=x.shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sequence_logits(params, x_garbage, m, **kw)), z)
    # Ragged reference: per-token scores, pooled by mup.native (the numpy / C++ core).
    acts = np.concatenate([x[i, : lengths[i]] for i in range(b)])  # [T, D]
    offsets = np.r_[0, np.cumsum(lengths)]
    s = (acts @ params["w"] + params["b"])[:, None]  # [T, 1]
    if kind == "max":
        ref = native.pool(s, offsets, method="max")[:, 0]
    elif kind == "softmax":
        ref = native.pool(s, offsets, method="softmax", scores=s[:, 0], temperature=5.0)[:, 0]
    elif kind == "rolling":
        ref = native.pool(s, offsets, method="rolling_mean_max", window=6)[:, 0]
    else:
        a = (acts @ params["q"] + params["qb"]) / np.sqrt(d)
        pooled = native.pool(acts, offsets, method="softmax", scores=a, temperature=1.0)
        ref = pooled @ params["w"] + params["b"]
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)


def test_padding_amount_does_not_change_scores(fitted, val_data):
    """A record scored alone (16-token bucket) and next to a long record (64-token bucket, so
    padded with 48 more positions) gets the same score."""
    short = val_data.select([int(np.argmin(val_data.lengths))])
    rng = np.random.default_rng(9)
    long = probes.Activations(
        acts=rng.normal(size=(40, val_data.d_model)).astype(np.float32),
        offsets=[0, 40],
        labels=np.array([0], np.int8),
    )
    both = probes.concat([dataclasses.replace(short, ids=None), long])
    for kind in ("max", "softmax", "rolling", "attention"):
        probe = fitted(kind)
        np.testing.assert_allclose(
            probe.logits(both)[0], probe.logits(short)[0], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_same_seed_same_params(kind, train_data, val_data, fitted):
    a = fitted(kind)
    b = probes.fit(kind, train_data, val=val_data, seed=0, **FAST)
    c = probes.fit(kind, train_data, val=val_data, seed=1, **FAST)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)


@pytest.mark.parametrize("kind", ["mean", "attention"])
def test_init_starts_training_from_the_given_probe(kind, train_data, val_data, fitted):
    base = fitted(kind)
    # A learning rate too small to move anything: what comes out is where training started.
    frozen = dict(epochs=1, lr=1e-9, final_lr=1e-10)
    warm = probes.fit(kind, train_data, init=base, seed=3, **frozen)
    cold = probes.fit(kind, train_data, seed=3, **frozen)
    assert warm.history["warm_start"] and "warm_start" not in cold.history
    for name, value in base.params.items():
        np.testing.assert_allclose(warm.params[name], value, atol=1e-6)
    assert not np.allclose(cold.params["w"], base.params["w"], atol=1e-3)
    # A params dict works as well as a Probe, and real fine-tuning keeps the signal.
    tuned = probes.fit(kind, val_data, init=dict(base.params), epochs=3, seed=3)
    assert metrics.auroc(tuned.predict(train_data), train_data.labels) > 0.95
    assert not np.allclose(tuned.params["w"], base.params["w"], atol=1e-4)


def test_init_errors(train_data, fitted):
    with pytest.raises(ValueError, match="gradient-trained kind.*'logreg' is fitted in closed"):
        probes.fit("logreg", train_data, init=fitted("mean"))
    with pytest.raises(ValueError, match="init= is a 'mean' probe; it cannot start a 'attention'"):
        probes.fit("attention", train_data, init=fitted("mean"), **FAST)
    with pytest.raises(ValueError, match=r"has parameters \['b', 'w'\]; a attention probe has"):
        probes.fit("attention", train_data, init=dict(fitted("mean").params), **FAST)
    with pytest.raises(ValueError, match=r"shapes \{'w': \(3,\)\} do not fit data of width 16"):
        probes.fit("mean", train_data, init={"w": np.zeros(3), "b": np.float32(0)}, **FAST)
    with pytest.raises(TypeError, match="a Probe or a params dict"):
        probes.fit("mean", train_data, init=np.zeros(16), **FAST)


@pytest.mark.parametrize("kind", probes.PROBE_KINDS)
def test_save_load_round_trip(kind, fitted, val_data, tmp_path):
    probe = fitted(kind)
    path = probe.save(tmp_path / f"{kind}.safetensors")
    back = probes.load(path)
    assert back.config == probe.config and back.d_model == probe.d_model
    assert back.history == probe.history
    for name in probe.params:
        assert back.params[name].shape == np.shape(probe.params[name]), name  # scalars stay 0-d
        np.testing.assert_array_equal(back.params[name], probe.params[name])
    np.testing.assert_array_equal(back.predict(val_data), probe.predict(val_data))
    np.testing.assert_array_equal(back.token_scores(val_data)[0], probe.token_scores(val_data)[0])
    if kind == "attention":
        np.testing.assert_array_equal(
            back.attention_weights(val_data)[0], probe.attention_weights(val_data)[0]
        )


def test_scalars_saved_as_one_element_arrays_load_as_scalars(fitted, val_data, tmp_path):
    """Probe files written before the save fix hold b / qb as [1] (np.ascontiguousarray made
    0-d arrays 1-d); they load as scalars, and attention_weights works on them."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    probe = fitted("attention")
    path = probe.save(tmp_path / "new.safetensors")
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata()
    old = {k: np.asarray(v, np.float32).reshape(-1) for k, v in probe.params.items()}
    assert old["qb"].shape == (1,) and json.loads(meta["mup_probe"])["config"]["kind"]
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    back = probes.load(tmp_path / "old.safetensors")
    assert back.params["b"].shape == () and back.params["qb"].shape == ()
    np.testing.assert_array_equal(
        back.attention_weights(val_data)[0], probe.attention_weights(val_data)[0]
    )


def test_load_names_the_file_and_the_fault(tmp_path):
    """Empty, truncated, garbage and malformed files: one ProbeFileError line each."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    w = np.linspace(-1, 1, 8).astype(np.float32)
    probe = probes.Probe(config=probes.default_config("mean"), d_model=8,
                         params={"w": w, "b": np.array(0.5, np.float32)})  # fmt: skip
    good = probe.save(tmp_path / "good.safetensors").read_bytes()
    with safe_open(str(tmp_path / "good.safetensors"), "numpy") as f:
        header = json.loads(f.metadata()["mup_probe"])

    def meta_file(name, mup_probe=None, params=None):
        path = tmp_path / name
        meta = None if mup_probe is None else {"mup_probe": mup_probe}
        save_file(params or {"w": w, "b": np.array(0.5, np.float32)}, str(path), metadata=meta)
        return path

    rng = np.random.default_rng(0)
    cases = {
        "empty file (0 bytes)": b"",
        "not a readable safetensors file": good[: len(good) // 2],
        "not a readable safetensors file (truncated": good[:5],
        "not a readable safetensors": rng.bytes(300),
    }
    for message, data in cases.items():
        (tmp_path / "bad.safetensors").write_bytes(data)
        cases[message] = tmp_path / "bad.safetensors"
        with pytest.raises(probes.ProbeFileError) as e:
            probes.load(cases[message])
        assert str(e.value).startswith(f"{tmp_path / 'bad.safetensors'}: " + message.split(" (")[0])
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    malformed = [
        (meta_file("plain.safetensors"), "not a mup probe file"),
        (meta_file("json.safetensors", "{not json"), "probe header is not valid JSON"),
        (meta_file("fmt.safetensors", json.dumps({"format": "other/9"})), "unsupported probe"),
        (meta_file("key.safetensors", json.dumps({k: v for k, v in header.items()
                                                  if k != "d_model"})),
         "malformed probe header: missing 'd_model'"),
        (meta_file("cfg.safetensors", json.dumps({**header, "config": {"kind": "mean", "x": 1}})),
         "malformed probe header"),
        (meta_file("shape.safetensors", json.dumps(header),
                   {"w": w[:4], "b": np.array(0, np.float32)}), r"expected parameters w [8]"),
        (meta_file("nan.safetensors", json.dumps(header),
                   {"w": np.full(8, np.nan, np.float32), "b": np.array(0, np.float32)}),
         "not finite"),
    ]  # fmt: skip
    for path, message in malformed:
        with pytest.raises(probes.ProbeFileError) as e:
            probes.load(path)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        probes.load(tmp_path / "missing.safetensors")
    np.testing.assert_array_equal(probes.load(tmp_path / "good.safetensors").params["w"], w)


@pytest.mark.parametrize("kind", ["linear_mean", "max"])
def test_early_stopping_restores_best(kind):
    # Few noisy training records and a high learning rate: validation AUROC peaks early and
    # then degrades as the probe overfits, so the best epoch is not the last one.
    train = synth(24, 7, signal=0.4)
    val = synth(64, 8, signal=0.4)
    probe = probes.fit(
        kind, train, val=val, seed=0, lr=0.2, final_lr=0.2, epochs=40, patience=12, weight_decay=0.0
    )
    h = probe.history
    aucs = np.asarray(h["val_auroc"])
    assert h["best_epoch"] == int(np.argmax(aucs))
    assert h["best_epoch"] < h["epochs_run"] - 1, "precondition: the last epoch is not best"
    assert aucs[-1] < aucs.max()
    # The returned parameters are the best epoch's, not the last epoch's.
    assert metrics.auroc(probe.logits(val), val.labels) == pytest.approx(aucs.max(), abs=1e-6)
    if h["epochs_run"] < 40:  # stopped early: exactly `patience` epochs without improvement
        assert h["epochs_run"] == h["best_epoch"] + 1 + 12


def test_logreg_matches_sklearn(train_data):
    lm = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is the reference")
    pre = pytest.importorskip("sklearn.preprocessing", reason="scikit-learn is the reference")
    x = native.pool(train_data.acts, train_data.offsets, method="mean", mask=train_data.mask)
    for c in (1e-3, 1.0):
        probe = probes.fit("logreg", train_data, c=c)
        z = pre.StandardScaler().fit_transform(x.astype(np.float64))
        ref = lm.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(z, train_data.labels)
        np.testing.assert_allclose(probe.params["w"], ref.coef_[0], rtol=2e-3, atol=2e-4)
        assert float(probe.params["b"]) == pytest.approx(ref.intercept_[0], abs=2e-4)
        assert metrics.auroc(probe.logits(train_data), train_data.labels) == pytest.approx(
            metrics.auroc(ref.decision_function(z), train_data.labels), abs=1e-3
        )


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0.3])
def test_lda_matches_sklearn_shrinkage_lda(shrinkage):
    da = pytest.importorskip("sklearn.discriminant_analysis", reason="scikit-learn reference")
    # One token per record, strongly correlated features: LDA's covariance solve matters.
    rng = np.random.default_rng(4)
    n, d = 200, 12
    y = np.resize(np.array([0, 1], np.int8), n)
    mixing = rng.normal(size=(d, d)) * np.linspace(0.2, 3.0, d)[None, :]
    x = (rng.normal(size=(n, d)) @ mixing + 1.5 * y[:, None] * rng.normal(size=d)).astype(
        np.float32
    )
    data = probes.Activations(acts=x, offsets=np.arange(n + 1), labels=y)
    probe = probes.fit("lda", data, shrinkage=shrinkage)
    sk_shrink = "auto" if shrinkage == "ledoit_wolf" else shrinkage
    ref = da.LinearDiscriminantAnalysis(solver="lsqr", shrinkage=sk_shrink).fit(
        x.astype(np.float64), y
    )
    w, r = probe.params["w"].astype(np.float64), ref.coef_[0]
    assert np.dot(w, r) / np.linalg.norm(w) / np.linalg.norm(r) > 1 - 1e-6
    # Not a difference of means: the covariance solve turns the direction.
    dom = probes.fit("dom", data).params["w"].astype(np.float64)
    assert np.dot(w, dom) / np.linalg.norm(w) / np.linalg.norm(dom) < 0.95
    assert metrics.auroc(probe.logits(data), y) > metrics.auroc(x @ dom, y)


def test_token_scores_and_attention_weights(fitted, val_data):
    probe = fitted("attention")
    scores, offsets = probe.token_scores(val_data)
    weights, offsets2 = probe.attention_weights(val_data)
    assert scores.shape == weights.shape == (val_data.acts.shape[0],)
    np.testing.assert_array_equal(offsets, offsets2)
    assert np.all(weights[~val_data.mask] == 0)
    np.testing.assert_allclose(np.add.reduceat(weights, offsets[:-1]), 1.0, atol=1e-5)
    # The classifier is linear, so the record logit is the attention-weighted token score.
    np.testing.assert_allclose(
        np.add.reduceat(weights * scores, offsets[:-1]), probe.logits(val_data), atol=1e-4
    )
    lin = fitted("linear_mean")
    s, _ = lin.token_scores(val_data)
    np.testing.assert_allclose(s, val_data.acts @ lin.params["w"] + lin.params["b"], atol=1e-5)
    with pytest.raises(ValueError, match="needs an attention probe"):
        lin.attention_weights(val_data)
    ev = lin.evaluate(val_data)
    assert ev["auroc"] == pytest.approx(metrics.auroc(lin.predict(val_data), val_data.labels))
    assert ev["n"] == val_data.n_records and ev["n_excluded"] == 0


def test_clear_errors(train_data, fitted):
    one_class = dataclasses.replace(train_data, labels=np.ones(train_data.n_records, np.int8))
    with pytest.raises(ValueError, match="single-class"):
        probes.fit("dom", one_class)
    with pytest.raises(ValueError, match="d_model mismatch.*16.*32"):
        fitted("mean").predict(synth(8, 2, d=32))
    with pytest.raises(ValueError, match="no masked token"):
        probes.Activations(
            acts=np.zeros((4, 2), np.float32), offsets=[0, 2, 4], mask=[True, True, False, False]
        )
    with pytest.raises(ValueError, match="must start at 0 and end at T = 4"):
        probes.Activations(acts=np.zeros((4, 2), np.float32), offsets=[0, 2, 5])
    with pytest.raises(ValueError, match="labels"):
        probes.fit("dom", dataclasses.replace(train_data, labels=None))
    with pytest.raises(TypeError, match="Activations or an activation store"):
        probes.fit("mean", np.zeros((3, 3)))
    at_20 = probes.fit("dom", dataclasses.replace(train_data, layers=(20,)))
    with pytest.raises(ValueError, match=r"layer \(20,\) requested.*hold layers \[3\]"):
        at_20.predict(dataclasses.replace(train_data, layers=(3,)))


def test_half_precision_input_matches_float32(fitted, val_data):
    """float16 activations (the store's default dtype) stay float16 in the padded batches and
    are upcast inside the probe: the same scores as the float32 copy of the same values."""
    half = dataclasses.replace(val_data, acts=val_data.acts.astype(np.float16))
    full = dataclasses.replace(val_data, acts=half.acts.astype(np.float32))
    for kind in ("attention", "mean"):
        probe = fitted(kind)
        np.testing.assert_allclose(probe.logits(half), probe.logits(full), rtol=1e-5, atol=1e-5)


def test_divergence_is_an_error_not_nan(train_data):
    # Non-finite activations make every gradient NaN; the probe must refuse, not save NaN.
    acts = train_data.acts.copy()
    acts[train_data.mask.nonzero()[0][0], 2] = np.inf
    with pytest.raises(FloatingPointError, match="diverged"):
        probes.fit("dom", dataclasses.replace(train_data, acts=acts))
