"""Probes read a real local activation store (mup.store) exactly like in-memory activations."""

from __future__ import annotations

import numpy as np
import pytest
from _support.activations import FAST
from _support.stores import JOB, batch_acts

from mup import probes

store = pytest.importorskip("mup.store", reason="mup.store is the activation store")


def _write_store(url, data: probes.Activations, layers=(3, 7), *, finish=True):
    """Layer 3 holds the data's activations, layer 7 a scaled copy plus noise."""
    rng = np.random.default_rng(0)
    acts = {3: data.acts, 7: 2.0 * data.acts + rng.normal(size=data.acts.shape).astype(np.float32)}
    t = data.acts.shape[0]
    w = store.create(
        url,
        layers=list(layers),
        d_model=data.d_model,
        dtype="float32",
        offsets=data.offsets,
        ids=list(data.ids),
        input_ids=np.zeros(t, np.int64),
        roles=np.zeros(t, np.uint8),
        mask=data.mask,
        labels=data.labels,
        attrs=dict(JOB),
    )
    n = data.n_records
    rows = np.arange(n) if finish else np.arange(n // 2)
    w.write(rows, batch_acts({x: acts[x] for x in layers}, data.offsets, rows))
    if finish:
        w.finalize()
    w.close()
    return acts


@pytest.fixture(scope="module")
def stores(tmp_path_factory, train_data, val_data):
    root = tmp_path_factory.mktemp("stores")
    train_acts = _write_store(root / "train", train_data)
    _write_store(root / "val", val_data)
    _write_store(root / "partial", val_data, finish=False)
    return root, train_acts


def test_store_and_memory_give_the_same_probe(stores, train_data, val_data, monkeypatch):
    # Pooled probes stream stores chunk by chunk: force many small chunks.
    monkeypatch.setattr("mup.store.READ_CHUNK_BYTES", 4096)
    root, _ = stores
    s_train, s_val = store.open(root / "train"), store.open(root / "val")
    a = probes.fit("mean", s_train, layer=3, val=s_val, seed=0, **FAST)
    b = probes.fit("mean", train_data, val=val_data, seed=0, **FAST)
    # Chunked pooling may round differently in the last bit; training keeps that tiny.
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-4, atol=1e-5)
    assert a.layers == (3,)
    # Where the activations came from travels with the probe (mup serve reads the same site).
    assert {k: a.metadata[k] for k in ("model", "site", "mask_mode")} == {
        "model": "tiny-test", "site": "residual", "mask_mode": "all",
    }  # fmt: skip
    assert "site" not in b.metadata
    np.testing.assert_allclose(a.predict(s_val), b.predict(val_data), rtol=1e-4, atol=1e-5)
    # A store row subset reads the same records as an in-memory selection.
    sub = probes.Activations.from_store(s_val, 3, rows=[5, 1, 9])
    ref = val_data.select([5, 1, 9])
    np.testing.assert_array_equal(sub.acts, ref.acts)
    np.testing.assert_array_equal(sub.mask, ref.mask)
    np.testing.assert_array_equal(sub.labels, ref.labels)
    assert sub.ids == ref.ids


def test_multi_layer_concat_and_sum(stores, train_data):
    root, acts = stores
    s = store.open(root / "train")
    cat = probes.Activations.from_store(s, [3, 7], combine="concat")
    np.testing.assert_array_equal(cat.acts, np.concatenate([acts[3], acts[7]], axis=1))
    summed = probes.Activations.from_store(s, [3, 7], combine="sum")
    np.testing.assert_allclose(summed.acts, acts[3] + acts[7], rtol=1e-6)
    probe = probes.fit("lda", s, layer=[3, 7], combine="concat")
    assert probe.d_model == 2 * train_data.d_model and probe.layers == (3, 7)
    assert probe.predict(s).shape == (train_data.n_records,)
    with pytest.raises(ValueError, match="d_model mismatch.*32.*16"):
        probe.predict(train_data)


def test_store_errors(stores):
    root, _ = stores
    s = store.open(root / "train")
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] not in activation store.*\[3, 7\]"):
        probes.fit("dom", s, layer=5)
    with pytest.raises(ValueError, match="layer is required"):
        probes.fit("dom", s)
    partial = store.open(root / "partial", require_complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        probes.fit("dom", partial, layer=3)
    probe = probes.fit("dom", s, layer=3)
    with pytest.raises(ValueError, match="incomplete"):
        probe.predict(partial)


def test_fit_on_several_stores(stores, train_data, val_data):
    root, _ = stores
    s_train, s_val = store.open(root / "train"), store.open(root / "val")
    a = probes.fit("lda", [s_train, s_val], layer=3)
    b = probes.fit("lda", probes.concat([train_data, val_data]))
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-5, atol=1e-6)
    assert a.history["n_train"] == train_data.n_records + val_data.n_records


def test_append_result_writes_self_describing_lines(stores, val_data, tmp_path):
    import json

    from mup import metrics

    root, _ = stores
    s_val = store.open(root / "val")
    probe = probes.fit("dom", store.open(root / "train"), layer=3)
    p = probe.predict(s_val)
    m = metrics.evaluate(p, s_val.labels)
    out = tmp_path / "results" / "probes.jsonl"
    for _ in range(2):
        probes.append_result(
            out,
            probe=probe,
            model="tiny-test",
            layer=3,
            train={"name": "synthetic-train", "sha256": "ab" * 32},
            eval=s_val,
            metrics=m,
            scores=p,
            labels=s_val.labels,
            ids=s_val.ids,
        )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2
    rec = lines[0]
    assert rec["probe"]["kind"] == "dom" and rec["probe"]["layers"] == [3]
    assert rec["eval"]["name"] == "synthetic.jsonl" and rec["eval"]["sha256"] == "ab" * 32
    assert rec["metrics"]["auroc"] == pytest.approx(m["auroc"])
    np.testing.assert_allclose(rec["scores"], p, rtol=1e-7)
    assert rec["labels"] == s_val.labels.astype(int).tolist() and rec["ids"] == list(s_val.ids)
    with pytest.raises(ValueError, match="scores .* and labels .* must both be"):
        probes.append_result(
            out,
            probe=probe,
            model="m",
            layer=3,
            train="a",
            eval="b",
            metrics=m,
            scores=p[:3],
            labels=s_val.labels,
        )
    with pytest.raises(TypeError, match="dataset name"):
        probes.append_result(
            out,
            probe=probe,
            model="m",
            layer=3,
            train=3,
            eval="b",
            metrics=m,
            scores=p,
            labels=s_val.labels,
        )


def test_sequence_probe_streams_a_store_over_its_memory_budget(
    stores, train_data, val_data, monkeypatch, tmp_path
):
    root, _ = stores
    s_train, s_val = store.open(root / "train"), store.open(root / "val")
    # A 40 kB budget: loading would hold 206 kB (the stored layer, its compacted copy and the
    # padded buckets), so training reads the store in chunks of at most a quarter of the
    # budget, every epoch.
    budget = 40_000
    fit = lambda **kw: probes.fit(  # noqa: E731
        "attention", s_train, layer=3, val=s_val, seed=0, **FAST, **kw
    )
    streamed = fit(memory_budget=budget)
    info = streamed.history["streamed"]
    assert info["chunks"] > 4 and 0 < info["max_chunk_bytes"] <= budget // 4
    assert streamed.history["n_train"] == train_data.n_records
    loaded = fit()
    assert "streamed" not in loaded.history
    for probe in (streamed, loaded):
        assert probe.history["val_auroc_final"] > 0.95
    # Same seed, same chunk order and batches: identical parameters.
    again = fit(memory_budget=budget)
    for name in streamed.params:
        np.testing.assert_array_equal(streamed.params[name], again.params[name])

    # Scoring a store streams it too (many small chunks here) and equals in-memory scoring.
    monkeypatch.setattr("mup.store.READ_CHUNK_BYTES", 2048)
    np.testing.assert_allclose(streamed.predict(s_val), streamed.predict(val_data), atol=2e-6)
    for method in ("token_scores", "attention_weights"):
        got, got_off = getattr(streamed, method)(s_val)
        want, want_off = getattr(streamed, method)(val_data)
        np.testing.assert_array_equal(got_off, want_off)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Unlabelled records are left out of streamed training, across several stores.
    partial = probes.Activations(
        acts=val_data.acts,
        offsets=val_data.offsets,
        mask=val_data.mask,
        labels=np.where(np.arange(val_data.n_records) % 5 == 0, -1, val_data.labels),
        ids=val_data.ids,
    )
    _write_store(tmp_path / "some-unlabelled", partial)
    s_partial = store.open(tmp_path / "some-unlabelled")
    both = probes.fit("max", [s_train, s_partial], layer=3, seed=0, memory_budget=budget, **FAST)
    assert both.history["n_train"] == train_data.n_records + int((partial.labels != -1).sum())
    assert both.history["streamed"]["chunks"] > 4
    assert probes.fit("max", s_partial, layer=3, seed=0, **FAST).history["n_train"] == int(
        (partial.labels != -1).sum()
    )
