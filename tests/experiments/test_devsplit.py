"""Dev-split training on the synthetic stores: the three-way split of a dev set, the k cap,
held-out scoring (evaluation ids never trained or stopped on), the plot, and the errors
raised before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.stores import FAST

from mup import experiments, metrics
from mup.experiments._cli import main


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_dev_parts_are_disjoint_stratified_and_nested(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([1, 0, -1], np.int8), 101, p=[0.4, 0.5, 0.1])
    parts = experiments.dev_parts(labels, seed, val_fraction=0.2, eval_fraction=0.4)
    pool = np.concatenate([parts.pool_pos, parts.pool_neg])
    every = np.concatenate([pool, parts.val, parts.eval])
    assert len(set(every.tolist())) == every.size  # disjoint
    np.testing.assert_array_equal(np.sort(every), np.nonzero(labels != -1)[0])
    for cls in (0, 1):
        n = int((labels == cls).sum())
        assert (labels[parts.eval] == cls).sum() == int(np.floor(0.4 * n + 0.5))
        assert (labels[parts.val] == cls).sum() == int(np.floor(0.2 * n + 0.5))
    assert (labels[parts.pool_pos] == 1).all() and (labels[parts.pool_neg] == 0).all()
    prev = set()
    for k in (2, 3, 8, parts.capacity):
        drawn = parts.draw(k)
        assert drawn.size == k and set(drawn.tolist()) <= set(pool.tolist())
        assert (labels[drawn] == 1).sum() == k // 2
        assert prev <= set(drawn.tolist())  # nested: a larger k adds records
        prev = set(drawn.tolist())
    with pytest.raises(ValueError, match=f"k={parts.capacity + 1} exceeds the training pool"):
        parts.draw(parts.capacity + 1)
    other = experiments.dev_parts(labels, seed + 1, val_fraction=0.2, eval_fraction=0.4)
    assert not np.array_equal(other.eval, parts.eval)


def test_k_is_capped_per_set_with_a_note():
    balanced = np.resize(np.array([1, 0], np.int8), 48)  # 24 per class
    small = np.resize(np.array([1, 0], np.int8), 16)  # 8 per class
    plan, notes = experiments.plan_ks(
        {"big": balanced, "small": small}, (8, 2, 16, 32), val_fraction=0.25, eval_fraction=0.25
    )
    # Per class: 24 -> 6 eval, 6 val, 12 pool (k <= 24); 8 -> 2, 2, 4 (k <= 8).
    assert plan == {"big": (2, 8, 16), "small": (2, 8)}
    assert notes == [
        "big: k=[32] skipped: its training pool holds 12 high- / 12 low-stakes records after "
        "12 go to validation and 12 to evaluation, so at most k=24",
        "small: k=[16, 32] skipped: its training pool holds 4 high- / 4 low-stakes records "
        "after 4 go to validation and 4 to evaluation, so at most k=8",
    ]
    with pytest.raises(ValueError, match=r"dev set small: every k \[16, 32\] exceeds"):
        experiments.plan_ks({"small": small}, (16, 32))
    with pytest.raises(ValueError, match="k values must be >= 2"):
        experiments.plan_ks({"big": balanced}, (1, 4))
    with pytest.raises(ValueError, match="dev set tiny: 2 high-stakes records cannot fill"):
        experiments.plan_ks({"tiny": np.array([1, 1, 0, 0, 0], np.int8)}, (2,))


@pytest.fixture(scope="module")
def devsplit_run(stores, tmp_path_factory):
    results = tmp_path_factory.mktemp("devsplit") / "d.jsonl"
    rows = experiments.devsplit(
        stores.train,
        stores.evals,
        layer=2,
        val=stores.val,
        ks=(2, 8, 64),
        repeats=2,
        seed=3,
        kind="mean",
        warm_epochs=4,
        results=results,
        progress=False,
        # FAST's 20 epochs at the default rate leave some seeds' random start unlearned.
        **FAST,
        lr=0.05,
    )
    return rows, results


def test_evaluation_ids_never_appear_in_training_or_validation(stores, devsplit_run):
    rows, results = devsplit_run
    lines = _lines(results)
    assert len(lines) == len(rows)
    eval_ids = {}
    for line in lines:
        held = set(line["ids"])
        key = (line["eval"]["name"], line["train"]["seed"])
        # Within a repeat, every mode and k is scored on the same held-out part.
        assert eval_ids.setdefault(key, held) == held
        if line["train"]["mode"] == "synthetic-only":
            continue
        trained, validated = set(line["train"]["dev_ids"]), set(line["train"]["val_ids"])
        assert not held & trained, line["train"]["mode"]
        assert not held & validated
        assert not trained & validated
        assert len(trained) == line["train"]["k"]
        # The metrics are those of the saved scores.
        assert line["metrics"]["auroc"] == pytest.approx(
            metrics.auroc(np.array(line["scores"]), np.array(line["labels"]))
        )
    assert eval_ids["a", 3] != eval_ids["a", 4]  # each repeat splits afresh
    for name, store in stores.evals.items():
        ids = {str(i) for i in store.ids}
        assert all(eval_ids[name, s] <= ids for s in (3, 4))


def test_rows_cover_every_mode_k_and_repeat(stores, devsplit_run):
    rows, _ = devsplit_run
    # 48 records per set, 24 per class: 10 eval, 5 val, 9 pool per class -> k <= 18.
    got = {(r.dataset, r.mode, r.k, r.seed) for r in rows}
    want = {(s, "synthetic-only", 0, seed) for s in ("a", "b") for seed in (3, 4)}
    want |= {
        (s, mode, k, seed)
        for s in ("a", "b")
        for mode in experiments.MODES
        for k in (2, 8)
        for seed in (3, 4)
    }
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert r.n_eval == 20
        assert r.n_val == (stores.val.n_records if r.mode == "synthetic-only" else 10)
        if r.mode == "combined":
            assert r.n_train == stores.train.n_records + r.k
        elif r.mode != "synthetic-only":
            assert r.n_train == r.k
        if r.mode == "warm-start":
            assert r.best_epoch < 4
    # The strong planted signal of set "a": the synthetic probe and the combined one find it.
    ref = [r.auroc for r in rows if r.dataset == "a" and r.mode == "synthetic-only"]
    combined = [r.auroc for r in rows if r.dataset == "a" and r.mode == "combined"]
    assert min(ref) > 0.9 and min(combined) > 0.9


def test_plot(devsplit_run, tmp_path):
    import matplotlib.image

    rows, _ = devsplit_run
    image = matplotlib.image.imread(experiments.plot_devsplit(rows, tmp_path / "d.png"))
    # Three panels (a, b, mean over sets) side by side: wider than tall.
    assert image.ndim == 3 and image.shape[1] > 2.5 * image.shape[0]


def test_devsplit_errors(stores):
    with pytest.raises(ValueError, match="warm-start fine-tunes a gradient-trained probe"):
        experiments.devsplit(stores.train, stores.evals, layer=2, kind="logreg", progress=False)
    with pytest.raises(ValueError, match=r"unknown devsplit mode\(s\) \['bogus'\]"):
        experiments.devsplit(stores.train, stores.evals, layer=2, modes=("bogus",))
    with pytest.raises(ValueError, match="every k"):
        experiments.devsplit(
            stores.train,
            stores.evals,
            layer=2,
            kind="logreg",
            modes=("dev-only",),
            ks=(256,),
            progress=False,
        )


def test_run_devsplit_checks_k_before_extracting(data_root, tmp_path, capsys):
    # A model path that does not exist: reaching extraction would fail differently.
    common = ["--model", str(tmp_path / "nowhere"), "--layer", "1", "--data", str(data_root)]
    rc = main(["devsplit", *common, "--ks", "128,256", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "dev set anthropic: every k [128, 256] exceeds what it can provide" in err
    assert "at most k=" in err
    rc = main(["devsplit", *common, "--kind", "logreg", "--out", str(tmp_path)])
    assert rc == 1 and "warm-start fine-tunes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["devsplit", "--modes", "dev-only,bogus"])
    assert "unknown mode(s) ['bogus']" in capsys.readouterr().err
