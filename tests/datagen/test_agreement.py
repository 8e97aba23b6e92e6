"""Agreement between labellings: kappa, Spearman and the confusion matrix equal scikit-learn's
and scipy's, and `mup data agreement` joins files on ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mup.data import bundled_path, load_records
from mup.datagen import agreement, cohen_kappa, confusion_matrix, pooled_agreement, spearman
from mup.datagen._cli import main

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference")
stats = pytest.importorskip("scipy.stats", reason="scipy is the reference")


@pytest.mark.parametrize("seed", range(5))
def test_kappa_and_confusion_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, size=200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 3, size=200))  # agree 60% + chance
    assert cohen_kappa(a, b) == pytest.approx(metrics.cohen_kappa_score(a, b), abs=1e-12)
    classes = [1, 0, 2]
    assert (confusion_matrix(a, b, classes) == metrics.confusion_matrix(a, b, labels=classes)).all()


def test_kappa_edge_cases():
    assert cohen_kappa(np.array([1, 0, 1]), np.array([1, 0, 1])) == pytest.approx(1.0)
    assert cohen_kappa(np.array([1, 0]), np.array([0, 1])) == pytest.approx(-1.0)
    assert np.isnan(cohen_kappa(np.array([1, 1]), np.array([1, 1])))  # chance agreement is 1
    assert np.isnan(cohen_kappa(np.array([], int), np.array([], int)))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 11, size=150).astype(float)  # 1..10 scores: many ties
    y = x + rng.normal(0, 3, size=150).round()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def _relabelled(tmp_path, flips: int):
    """The bundled set with the first `flips` labels swapped and scale labels reversed."""
    rows = [json.loads(line) for line in bundled_path().read_text().splitlines() if line]
    swap = {"high-stakes": "low-stakes", "low-stakes": "high-stakes"}
    for i, row in enumerate(rows):
        if i < flips:
            row["labels"] = swap[row["labels"]]
        row["scale_labels"] = 11 - row["scale_labels"]
    rows = rows[5:]  # b lacks a's first five records: the join must notice
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_agreement_joins_on_ids(tmp_path):
    a = load_records(bundled_path())
    b = load_records(_relabelled(tmp_path, flips=20))
    result = agreement(a, b)
    assert (result.n_a, result.n_b, result.n_joined) == (80, 75, 75)
    by_id = {r.id: r for r in b}
    la = np.array([r.label for r in a if r.id in by_id])
    lb = np.array([by_id[r.id].label for r in a if r.id in by_id])
    assert result.kappa == pytest.approx(metrics.cohen_kappa_score(la, lb))
    assert result.spearman == pytest.approx(-1.0)  # reversed scale
    assert result.confusion.sum() == 75 and result.confusion[:, 2].sum() == 0
    assert result.confusion[0, 1] + result.confusion[1, 0] == 15  # flips 5..19 are joined
    both = pooled_agreement([(a, b), (a, b)])
    assert both.n_joined == 150 and both.kappa == pytest.approx(result.kappa)


def test_agreement_cli(tmp_path, capsys):
    b = _relabelled(tmp_path, flips=0)
    out = tmp_path / "agreement.json"
    assert main(["agreement", "--a", str(bundled_path()), "--b", str(b), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Cohen's kappa, labels (3 classes):     1.000  (75 records)" in printed
    numbers = json.loads(out.read_text())
    (pair,) = numbers.values()
    assert pair["kappa"] == pytest.approx(1.0) and pair["spearman"] == pytest.approx(-1.0)

    assert main(["agreement", "--a", str(b), "--b", str(tmp_path / "missing.jsonl")]) == 1
    assert main(["agreement", "--a", str(b), str(b), "--b", str(b)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("missing.jsonl does not exist") and "paired" in err[1]
