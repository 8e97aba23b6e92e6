"""The generalisation heatmap on the synthetic stores: each cell against a direct fit, skipped
values, validation parts, the plot, and the errors `run_heatmap` raises before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.stores import FAST, TONES

from mup import experiments, metrics, probes
from mup.experiments._cli import main
from mup.probes import Activations


def _field(store, name):
    return experiments.record_field(store, name)


def _heatmap(stores, field: str, **kwargs):
    """The heatmap of `field` trained on the train store and scored on the validation store."""
    train, test = stores.train, stores.val
    return experiments.heatmap(
        train,
        _field(train, field),
        test,
        _field(test, field),
        field=field,
        layer=2,
        progress=False,
        **kwargs,
    )


def test_matrix_cells_equal_a_direct_fit(stores, tmp_path):
    train, test = stores.train, stores.val
    results = tmp_path / "h.jsonl"
    result = _heatmap(stores, "tone", kind="logreg", min_per_class=2, results=results)
    assert result.values == tuple(sorted(TONES))
    assert result.auroc.shape == (3, 3) and np.isfinite(result.auroc).all()
    assert not result.skipped_train and not result.skipped_eval
    assert len(result.rows) == 9
    # One cell recomputed by hand: train on casual (train store), score angry (test store).
    tones_tr, tones_te = _field(train, "tone"), _field(test, "tone")
    fit_rows = np.nonzero(tones_tr == "casual")[0]
    eval_rows = np.nonzero(tones_te == "angry")[0]
    probe = probes.fit("logreg", Activations.from_store(train, 2).select(fit_rows))
    held = Activations.from_store(test, 2).select(eval_rows)
    expected = metrics.auroc(probe.predict(held), held.labels)
    i, j = result.values.index("casual"), result.values.index("angry")
    assert result.auroc[i, j] == pytest.approx(expected, abs=1e-6)
    row = next(r for r in result.rows if (r.train_value, r.eval_value) == ("casual", "angry"))
    assert (row.n_train, row.n_val, row.n_eval) == (fit_rows.size, 0, eval_rows.size)
    # Closed-form kinds use every record of the value; the planted signal is learned.
    assert result.auroc.min() > 0.8
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 9
    for line in lines:
        assert line["train"]["field"] == "tone"
        ids = set(line["ids"])
        want = {str(test.ids[r]) for r in np.nonzero(tones_te == line["eval"]["value"])[0]}
        assert ids == want
        assert line["metrics"]["auroc"] == pytest.approx(
            metrics.auroc(np.array(line["scores"]), np.array(line["labels"]))
        )


def test_values_with_one_class_are_reported_and_skipped(stores, tmp_path):
    result = _heatmap(stores, "language", kind="logreg", min_per_class=2)
    assert result.values == ("English", "French")
    # "French" is every 16th record: high-stakes only, in both stores.
    assert set(result.skipped_train) == {"French"} == set(result.skipped_eval)
    assert "6 high-stakes / 0 low-stakes train-split" in result.skipped_train["French"]
    assert "3 high-stakes / 0 low-stakes test-split" in result.skipped_eval["French"]
    assert np.isfinite(result.auroc[0, 0])
    assert np.isnan(result.auroc[[0, 1, 1], [1, 0, 1]]).all()
    assert [(r.train_value, r.eval_value) for r in result.rows] == [("English", "English")]
    assert any("not trained on" in n and "French" in n for n in result.notes)
    png = experiments.plot_heatmap(result, tmp_path / "skip.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no value can be trained and scored"):
        _heatmap(stores, "language", kind="logreg", min_per_class=100)


def test_gradient_kinds_stop_on_a_grouped_validation_part(stores, tmp_path):
    import matplotlib.image

    train = stores.train
    groups = _field(train, "pair_id")
    result = _heatmap(
        stores,
        "length",
        kind="mean",
        groups=groups,
        val_fraction=0.25,
        results=tmp_path / "m.jsonl",
        **FAST,
    )
    assert result.values == ("short", "long")  # plotted in the field's natural order
    lengths = _field(train, "length")
    for row in result.rows:
        assert row.n_val > 0
        assert row.n_train + row.n_val == int((lengths == row.train_value).sum())
    # A validation part holds whole pairs: no pair_id has records on both sides.
    ids = [str(i) for i in train.ids]
    pair_of = dict(zip(ids, groups, strict=True))
    for line in (json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()):
        of_value = {i for i, v in zip(ids, lengths, strict=True) if v == line["train"]["value"]}
        val = set(line["train"]["val_ids"])
        assert val and val <= of_value
        fit_pairs = {pair_of[i] for i in of_value - val}
        assert not {pair_of[i] for i in val} & fit_pairs
    image = matplotlib.image.imread(experiments.plot_heatmap(result, tmp_path / "h.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_run_heatmap_checks_the_file_before_extracting(data_root, tmp_path, capsys):
    # The bundled mini set has no variation fields; the model path does not exist either, so
    # reaching extraction would fail differently.
    common = ["--model", str(tmp_path / "nowhere"), "--layer", "1", "--data", str(data_root)]
    rc = main(["heatmap", *common, "--field", "tone", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    assert "no 'tone' field (56 of the 56 train-split records lack it)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["heatmap", "--field", "topic"])
    assert "invalid choice: 'topic'" in capsys.readouterr().err
