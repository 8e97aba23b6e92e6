"""Experiments on tiny synthetic stores: compare, grouped-CV sweep, data efficiency, calibration,
against numpy / scipy references where a number is computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.stores import FAST

from mup import experiments, metrics, probes
from mup.probes import Activations


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_compare_table_results_and_plot(stores, tmp_path):
    kinds = ("logreg", "dom", "attention")
    results = tmp_path / "r.jsonl"
    rows = experiments.compare(
        stores.train,
        stores.evals,
        layer=2,
        val=stores.val,
        kinds=kinds,
        model="synthetic",
        results=results,
        progress=False,
        overrides={"attention": FAST},
    )
    assert [(r.kind, r.dataset) for r in rows] == [(k, s) for k in kinds for s in ("a", "b")]
    for r in rows:
        assert r.auroc > 0.9, r
    lines = _lines(results)
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert line["probe"]["kind"] == row.kind
        assert line["eval"]["name"] == row.dataset and line["eval"]["store"]
        # Independent reference: the metric recomputed from the saved scores.
        assert line["metrics"]["auroc"] == pytest.approx(
            metrics.auroc(np.array(line["scores"]), np.array(line["labels"]))
        )
        assert len(line["ids"]) == 48
    table = experiments.markdown_table(rows)
    assert "| probe | a | b | mean |" in table
    for kind in kinds:
        mean = np.mean([r.auroc for r in rows if r.kind == kind])
        assert f"| **{mean:.3f}** |" in table
    png = experiments.plot_compare(rows, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_bad_input(stores):
    with pytest.raises(ValueError, match="unknown probe kind"):
        experiments.compare(stores.train, stores.evals, layer=2, kinds=("nope",), progress=False)
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] not in activation store"):
        experiments.compare(stores.train, stores.evals, layer=7, kinds=("dom",), progress=False)


@pytest.mark.parametrize("k", [2, 5])
def test_grouped_folds_never_split_a_group(k):
    rng = np.random.default_rng(k)
    groups = rng.integers(0, 30, 200)
    folds = experiments.grouped_folds(groups, k, seed=1)
    assert len(folds) == k
    every = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(every, np.arange(200))  # each record in exactly one fold
    owner = {}
    for f, rows in enumerate(folds):
        for g in set(groups[rows].tolist()):
            assert owner.setdefault(g, f) == f, f"group {g} in folds {owner[g]} and {f}"
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= np.bincount(groups).max()
    with pytest.raises(ValueError, match="distinct groups cannot fill"):
        experiments.grouped_folds(np.array([0, 0, 1]), 3)


def test_sweep_finds_the_planted_layer(stores, tmp_path):
    groups = experiments.record_field(stores.train, "pair_id")
    assert groups[0] == groups[1] == "s0-p0"
    results = tmp_path / "sweep.jsonl"
    rows = experiments.sweep(
        stores.train, groups, layers=(1, 2), kind="logreg", k=4, progress=False, results=results
    )
    by_layer = {r.layer: r for r in rows}
    assert by_layer[2].auroc_mean > 0.9
    assert by_layer[1].auroc_mean < 0.75  # layer 1 is noise
    assert len(by_layer[2].fold_aurocs) == 4
    assert by_layer[2].auroc_std == pytest.approx(np.std(by_layer[2].fold_aurocs))
    assert len(_lines(results)) == 2
    png = experiments.plot_sweep(rows, tmp_path / "s.png")
    assert png.stat().st_size > 1000


def test_record_field_errors(stores, tmp_path):
    with pytest.raises(ValueError, match="has no 'topic' field"):
        experiments.record_field(stores.train, "topic")


def test_stratified_subsample():
    labels = np.array([1] * 30 + [0] * 60 + [-1] * 10, np.int8)
    rows = experiments.stratified_subsample(labels, 9, seed=0)
    assert len(set(rows.tolist())) == 9
    assert (labels[rows] == 1).sum() == 3 and (labels[rows] == 0).sum() == 6
    assert not np.array_equal(rows, experiments.stratified_subsample(labels, 9, seed=1))
    with pytest.raises(ValueError, match="exceeds the 90 labelled"):
        experiments.stratified_subsample(labels, 91, seed=0)
    with pytest.raises(ValueError, match="at least 2 records"):
        experiments.stratified_subsample(labels, 1, seed=0)


def test_efficiency_curve(stores, tmp_path):
    rows = experiments.efficiency(
        stores.train,
        stores.evals,
        sizes=(4, 64),
        kinds=("logreg",),
        seeds=(0, 1),
        layer=2,
        progress=False,
        results=tmp_path / "e.jsonl",
    )
    assert [(r.size, r.seed) for r in rows] == [(4, 0), (4, 1), (64, 0), (64, 1)]
    for r in rows:
        assert r.mean_auroc == pytest.approx(np.mean(list(r.aurocs.values())))
    big = np.mean([r.mean_auroc for r in rows if r.size == 64])
    assert big > 0.9
    lines = _lines(tmp_path / "e.jsonl")
    assert len(lines) == 8 and {x["train"]["subset_size"] for x in lines} == {4, 64}
    assert experiments.plot_efficiency(rows, tmp_path / "e.png").stat().st_size > 1000


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is the rank-correlation reference")
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = rng.integers(1, 11, 50).astype(float)  # many ties, like scale_labels
    assert experiments.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        experiments.spearman(a, np.ones(50))


def test_bins_against_numpy_and_ece():
    rng = np.random.default_rng(1)
    probs = rng.random(200)
    labels = (rng.random(200) < probs).astype(np.int8)
    labels[:5] = -1
    rel = experiments.reliability_bins(probs, labels, n_bins=10)
    keep = labels != -1
    assert sum(b["n"] for b in rel) == keep.sum()
    ece = sum(b["n"] * abs(b["mean_prob"] - b["frac_positive"]) for b in rel) / keep.sum()
    assert ece == pytest.approx(metrics.ece(probs[keep], labels[keep], n_bins=10))
    scales = rng.integers(1, 4, 200)
    sb = experiments.scale_bins(probs, scales)
    for b in sb:
        sel = scales == b["scale"]
        assert b["n"] == sel.sum() and b["mean_prob"] == pytest.approx(probs[sel].mean())
    with pytest.raises(ValueError, match="must both be"):
        experiments.scale_bins(probs, scales[:3])


def test_calibration_follows_the_stakes_score(stores, tmp_path):
    probe = probes.fit("logreg", stores.train, layer=2)
    scales = {k: experiments.record_field(s, "scale_labels") for k, s in stores.evals.items()}
    per_set = experiments.calibration(probe, stores.evals, scales)
    for name, res in per_set.items():
        means = [b["mean_prob"] for b in res["scale_bins"]]
        assert res["spearman_scale"] > 0.6, name
        assert means[-1] > means[0]
        assert res["ece"] == pytest.approx(
            metrics.ece(probe.predict(stores.evals[name]), stores.evals[name].labels)
        )
    png = experiments.plot_calibration(per_set, tmp_path / "cal.png")
    assert png.stat().st_size > 1000


def test_sweep_on_in_memory_activations_checks_lengths(stores):
    acts = {2: Activations.from_store(stores.train, 2)}
    with pytest.raises(ValueError, match="groups for 96 records"):
        experiments.sweep(acts, np.arange(10) % 5, layers=(2,), k=2, progress=False)
