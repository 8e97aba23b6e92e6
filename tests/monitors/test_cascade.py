"""The monitoring cascade: end points equal the single monitors, a hand-computed middle
fraction for every selection and merge, FLOPs accounting, errors before work, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.scores import pairwise_auroc, rows_for

from mup import metrics
from mup.monitors import (
    CascadeFileError,
    CascadeStrategy,
    ScoreFileError,
    Scores,
    cascade_curve,
    cascade_scores,
    read_cascade,
    read_scores,
    score_row,
    write_scores,
)
from mup.monitors._cascade import _n_escalated
from mup.monitors._cascade_cli import main

# The hand case: one data set of 8 records.
# First-monitor ascending order: r1 .1, r6 .2, r4 .3, r3 .4, r2 .6, r7 .7, r5 .8, r0 .9.
LABELS = np.array([1, 0, 0, 1, 0, 1, 0, 1])
S1 = np.array([0.9, 0.1, 0.6, 0.4, 0.3, 0.8, 0.2, 0.7])
S2 = np.array([0.3, 0.2, 0.1, 0.9, 0.6, 0.5, 0.4, 0.7])
F1 = 10.0 + np.arange(8)  # 10 .. 17
F2 = 1000.0 * (1 + np.arange(8))  # 1000 .. 8000


def _hand(tmp_path, s1=S1, s2=S2, labels=LABELS):
    a = write_scores(tmp_path / "first.jsonl", rows_for("probe:p", "dev/a", s1, labels, F1))
    b = write_scores(tmp_path / "second.jsonl", rows_for("prompted:q", "dev/a", s2, labels, F2))
    return read_scores(a), read_scores(b)


def _one(rows, fraction, dataset="dev/a"):
    (row,) = [r for r in rows if r["fraction"] == fraction and r["dataset"] == dataset]
    return row


def test_hand_pairwise_aurocs_of_the_two_monitors():
    # first: positives .9 .8 .7 beat every negative (12 pairs), .4 beats .3 .2 .1 (3): 15/16.
    assert pairwise_auroc(S1, LABELS) == 15 / 16 == metrics.auroc(S1, LABELS)
    # second: .3 beats .2 .1; .9 beats all; .5 beats .2 .1 .4; .7 beats all: 13/16.
    assert pairwise_auroc(S2, LABELS) == 13 / 16 == metrics.auroc(S2, LABELS)


# (selection, merge, remaining, fraction) -> escalated records, cascade scores, AUROC by hand.
HAND = [
    # top 4 of the first: r2 r7 r5 r0; they take the second's score.
    (
        ("top", "second", "first", 0.5),
        [0, 2, 5, 7],
        [0.3, 0.1, 0.1, 0.4, 0.3, 0.5, 0.2, 0.7],
        15.5 / 16,  # positive .3 ties negative .3: half a pair lost
    ),
    # the same with everything else at 0: positive r3 (0) ties three negatives, loses to .1.
    (
        ("top", "second", "fixed_0", 0.5),
        [0, 2, 5, 7],
        [0.3, 0.0, 0.1, 0.0, 0.0, 0.5, 0.0, 0.7],
        13.5 / 16,
    ),
    # bottom 2: r1 r6, merged by max; positive .4 (r3) ties negative r6's max(.2, .4).
    (
        ("bottom", "max", "first", 0.25),
        [1, 6],
        [0.9, 0.2, 0.6, 0.4, 0.3, 0.8, 0.4, 0.7],
        14.5 / 16,
    ),
    # mid 4: ranks 2..5 (N//2 - k//2 = 2): r4 r3 r2 r7, merged by mean; now separable.
    (
        ("mid", "mean", "first", 0.5),
        [2, 3, 4, 7],
        [0.9, 0.1, 0.35, 0.65, 0.45, 0.8, 0.2, 0.7],
        1.0,
    ),
    # mid 3 (odd k): ranks 3..5 (4 - 1 = 3): r3 r2 r7.
    (
        ("mid", "second", "first", 0.375),
        [2, 3, 7],
        [0.9, 0.1, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7],
        1.0,
    ),
    # mid 2: ranks 3, 4: r3 r2, kept at fixed 0.5 elsewhere.
    (
        ("mid", "second", "fixed_0.5", 0.25),
        [2, 3],
        [0.5, 0.5, 0.1, 0.9, 0.5, 0.5, 0.5, 0.5],
        # positives .5 .9 .5 .5 vs negatives .5 .1 .5 .5: .9 wins 4, each .5 wins 1 + 3 ties.
        (4 + 3 * (1 + 1.5)) / 16,
    ),
]


@pytest.mark.parametrize("spec,escalated,expected,auroc", HAND, ids=lambda v: str(v))
def test_hand_computed_middle_fractions(tmp_path, spec, escalated, expected, auroc):
    first, second = _hand(tmp_path)
    selection, merge, remaining, fraction = spec
    strategy = CascadeStrategy(selection=selection, merge=merge, remaining=remaining)
    cascade = cascade_scores(first, second, fraction, strategy)
    mask = np.array([r["escalated"] for r in cascade.rows])
    assert np.flatnonzero(mask).tolist() == escalated
    np.testing.assert_allclose(cascade.scores, expected, atol=1e-12)
    assert pairwise_auroc(expected, LABELS) == pytest.approx(auroc)
    # Cost: the first monitor everywhere, the second where escalated.
    np.testing.assert_allclose(cascade.flops, F1 + mask * F2)
    (row,) = [
        r for r in cascade_curve(first, second, [fraction], strategy) if r["dataset"] == "dev/a"
    ]
    assert row["auroc"] == pytest.approx(auroc)
    assert row["mean_flops"] == pytest.approx((F1.sum() + F2[escalated].sum()) / 8)
    assert row["n_escalated"] == len(escalated) and row["n"] == 8


def test_end_points_equal_the_single_monitors(synthetic):
    paths, arrays = synthetic
    probe, prompted = "probe:attention@20", "prompted:big/single_word"
    first, second = read_scores(paths[probe]), read_scores(paths[prompted])
    for strategy in (
        CascadeStrategy(selection="top", merge="second"),
        CascadeStrategy(selection="mid", merge="second"),
        CascadeStrategy(selection="bottom", merge="second", remaining="fixed_0"),
    ):
        rows = cascade_curve(first, second, [0.0, 1.0], strategy)
        assert len(rows) == 2 * 3  # (2 data sets + mean) x 2 fractions
        aurocs = {}
        for dataset in ("dev/a", "dev/b"):
            s1, y, f1 = arrays[probe, dataset]
            s2, _, f2 = arrays[prompted, dataset]
            keep = y != -1
            at0, at1 = _one(rows, 0.0, dataset), _one(rows, 1.0, dataset)
            if strategy.remaining == "first":
                assert at0["auroc"] == pytest.approx(pairwise_auroc(s1[keep], y[keep]))
                assert at0["tpr_at_1pct_fpr"] == pytest.approx(
                    metrics.tpr_at_fpr(s1[keep], y[keep], 0.01)
                )
            else:  # every record at the fixed score: no ranking at all
                assert at0["auroc"] == 0.5
            assert at0["mean_flops"] == pytest.approx(f1.mean())
            assert at0["n_escalated"] == 0
            assert at1["auroc"] == pytest.approx(pairwise_auroc(s2[keep], y[keep]))
            assert at1["mean_flops"] == pytest.approx(f1.mean() + f2.mean())
            assert at1["n_escalated"] == y.size  # unlabelled records are escalated and paid
            assert at1["n"] == keep.sum()  # ... but not scored
            aurocs[dataset] = (at0, at1)
        for fraction, i in ((0.0, 0), (1.0, 1)):
            mean = _one(rows, fraction, "mean")
            for key in ("auroc", "tpr_at_1pct_fpr", "mean_flops"):
                expected = np.mean([aurocs[d][i][key] for d in aurocs])
                assert mean[key] == pytest.approx(expected)
            assert mean["n"] == 8 + 37


def test_mean_and_max_merges_at_full_escalation(synthetic):
    paths, arrays = synthetic
    first = read_scores(paths["probe:attention@20"])
    second = read_scores(paths["finetuned:big"])
    for merge, combine in (("mean", lambda a, b: (a + b) / 2), ("max", np.maximum)):
        rows = cascade_curve(first, second, [1.0], CascadeStrategy(merge=merge))
        s1, y, _ = arrays["probe:attention@20", "dev/b"]
        s2, _, _ = arrays["finetuned:big", "dev/b"]
        keep = y != -1
        expected = pairwise_auroc(combine(s1, s2)[keep], y[keep])
        assert _one(rows, 1.0, "dev/b")["auroc"] == pytest.approx(expected)


def test_a_two_step_llm_cascade_is_the_same_call(synthetic):
    paths, arrays = synthetic
    small, large = (
        read_scores(paths["prompted:big/single_word"]),
        read_scores(paths["finetuned:big"]),
    )
    rows = cascade_curve(small, large, [0.0, 0.5], CascadeStrategy(selection="mid"))
    row = _one(rows, 0.5, "dev/b")
    assert row["cascade"] == "prompted:big/single_word -> finetuned:big [mid/mean/first]"
    _, _, f1 = arrays["prompted:big/single_word", "dev/b"]
    _, _, f2 = arrays["finetuned:big", "dev/b"]
    assert row["n_escalated"] == 20
    # Escalated: 20 of 40, so the cost lies between the first's and the first's plus the most
    # expensive 20 of the second's.
    assert f1.mean() + np.sort(f2)[:20].sum() / 40 <= row["mean_flops"]
    assert row["mean_flops"] <= f1.mean() + np.sort(f2)[20:].sum() / 40


def test_a_cascade_score_file_feeds_another_cascade(synthetic, tmp_path):
    paths, _ = synthetic
    probe, prompted, finetuned = (read_scores(paths[m]) for m in paths)
    step = cascade_scores(probe, prompted, 0.2)
    assert step.monitor.startswith("cascade:probe:attention@20 -> prompted:big/single_word")
    write_scores(tmp_path / "step.jsonl", step.rows)  # a valid score file
    again = read_scores(tmp_path / "step.jsonl")
    rows = cascade_curve(again, finetuned, [0.0, 0.1])
    # Fraction 0 of the second cascade is the first cascade: its own per-data-set AUROC.
    expected = again.evaluate()[again.monitor]["dev/b"]["auroc"]
    assert _one(rows, 0.0, "dev/b")["auroc"] == pytest.approx(expected)


def test_floor_of_binary_fractions():
    assert _n_escalated(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996
    assert _n_escalated(8, 0.3) == 2
    assert _n_escalated(8, 1.0) == 8
    assert _n_escalated(50, 0.01) == 0


def test_mismatched_labels_are_an_error_naming_the_record(tmp_path):
    first, _ = _hand(tmp_path)
    flipped = LABELS.copy()
    flipped[5] = 0
    b = write_scores(tmp_path / "bad.jsonl", rows_for("prompted:q", "dev/a", S2, flipped, F2))
    with pytest.raises(ScoreFileError, match=r"record 'r5' of 'dev/a' is labelled 1 .* but 0"):
        cascade_curve(first, read_scores(b))


def test_no_shared_record_is_an_error(tmp_path):
    first, _ = _hand(tmp_path)
    b = write_scores(tmp_path / "other.jsonl", rows_for("prompted:q", "dev/z", S2, LABELS, F2))
    with pytest.raises(ScoreFileError, match="share no"):
        cascade_curve(first, read_scores(b))


def test_single_class_data_set_is_an_error_naming_it(tmp_path):
    ones = np.ones(8, int)
    first, second = _hand(tmp_path, labels=ones)
    with pytest.raises(ScoreFileError, match=r"'dev/a' has 8 high-stakes and 0 low-stakes"):
        cascade_curve(first, second)


def test_a_file_mixing_monitors_is_refused_as_first(tmp_path, synthetic):
    paths, _ = synthetic
    both = read_scores(*paths.values())
    with pytest.raises(ScoreFileError, match="expected one monitor"):
        cascade_curve(both, read_scores(paths["finetuned:big"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(selection="side"), "selection must be one of"),
        (dict(merge="median"), "merge must be one of"),
        (dict(remaining="fixed_2"), r"fixed_<x>"),
        (dict(remaining="fixed_abc"), r"fixed_<x>"),
        (dict(remaining="last"), r"fixed_<x>"),
    ],
)
def test_bad_strategies_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeStrategy(**kwargs)


def test_bad_fractions_are_refused(tmp_path):
    first, second = _hand(tmp_path)
    for bad in ([1.5], [-0.1], [float("nan")], []):
        with pytest.raises(ValueError, match="fraction"):
            cascade_curve(first, second, bad)


def test_order_of_records_does_not_matter(tmp_path):
    first, second = _hand(tmp_path)
    shuffled = Scores(tuple(reversed(second.rows)), "reversed")
    a = cascade_curve(first, second, [0.5], CascadeStrategy(selection="top"))
    b = cascade_curve(first, shuffled, [0.5], CascadeStrategy(selection="top"))
    assert [r["auroc"] for r in a] == [r["auroc"] for r in b]


# ---- the command line -----------------------------------------------------------------------


def test_cli_end_to_end(synthetic, tmp_path, capsys):
    import matplotlib.image

    paths, arrays = synthetic
    out = tmp_path / "out"
    rc = main(
        [
            "--first",
            str(paths["probe:attention@20"]),
            "--second",
            str(paths["prompted:big/single_word"]),
            "--second",
            str(paths["finetuned:big"]),
            "--fractions",
            "0,0.1,0.5,1",
            "--selection",
            "top",
            "--merge",
            "second",
            "--remaining",
            "first",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "probe:attention@20 -> finetuned:big [top/second/first]" in printed
    rows = read_cascade(out / "cascade.jsonl")
    assert len(rows) == 2 * 3 * 4  # cascades x (data sets + mean) x fractions
    assert {r["dataset"] for r in rows} == {"dev/a", "dev/b", "mean"}
    for row in rows:
        assert set(row) >= {"auroc", "tpr_at_1pct_fpr", "mean_flops", "fraction", "n"}
    s2, y, _ = arrays["finetuned:big", "dev/a"]
    (row,) = [
        r
        for r in rows
        if r["second"] == "finetuned:big" and r["dataset"] == "dev/a" and r["fraction"] == 1.0
    ]
    assert row["auroc"] == pytest.approx(pairwise_auroc(s2, y))
    image = matplotlib.image.imread(out / "cascade.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fractions", "0.5,1.5"], "fractions must be in [0, 1]"),
        (["--fractions", "half"], "comma-separated numbers"),
        (["--merge", "median"], "invalid choice: 'median'"),
        (["--selection", "side"], "invalid choice: 'side'"),
        (["--remaining", "fixed_abc"], "fixed_<x>"),
    ],
)
def test_cli_argument_errors(synthetic, tmp_path, capsys, extra, message):
    paths, _ = synthetic
    base = ["--first", str(paths["probe:attention@20"]), "--second", str(paths["finetuned:big"])]
    with pytest.raises(SystemExit) as exit_:
        main([*base, *extra, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_reports_data_errors_without_writing(tmp_path, capsys):
    _hand(tmp_path)
    flipped = LABELS.copy()
    flipped[0] = 0
    b = write_scores(tmp_path / "bad.jsonl", rows_for("prompted:q", "dev/a", S2, flipped, F2))
    rc = main(
        ["--first", str(tmp_path / "first.jsonl"), "--second", str(b), "--out", str(tmp_path / "o")]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "mup cascade: error:" in err and "'r0'" in err and "bad.jsonl" in err
    assert not (tmp_path / "o").exists()


def test_read_cascade_names_file_and_line(tmp_path):
    path = tmp_path / "cascade.jsonl"
    good = dict(
        cascade="a -> b [mid/mean/first]",
        first="a",
        second="b",
        selection="mid",
        merge="mean",
        remaining="first",
        dataset="mean",
        fraction=0.5,
        auroc=0.9,
        tpr_at_1pct_fpr=0.3,
        mean_flops=10.0,
        n=8,
        n_escalated=4,
    )
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "auroc": 1.5}) + "\n")
    with pytest.raises(CascadeFileError, match=r"cascade.jsonl:2: field 'auroc'"):
        read_cascade(path)


def test_score_row_is_what_the_fixture_writes():
    # The fixture goes through score_row, so a malformed synthetic row fails loudly.
    with pytest.raises(ScoreFileError, match="score"):
        score_row(id="x", dataset="d", label=1, score=1.5, monitor="m:x", flops=0, n_tokens=1)


def test_cli_gathers_a_monitors_rows_from_one_file_per_data_set(synthetic, tmp_path):
    """Per-data-set files of one monitor (what `mup baselines` writes) make ONE cascade, equal
    to the cascade from a single file holding both sets."""
    from mup.monitors import read_cascade, read_scores, write_scores

    paths, _ = synthetic
    second = read_scores(paths["prompted:big/single_word"])
    parts = [
        write_scores(tmp_path / f"part_{d.replace('/', '_')}.jsonl", second.select(dataset=d).rows)
        for d in second.datasets
    ]
    common = ["--first", str(paths["probe:attention@20"]), "--fractions", "0,0.5,1"]
    assert main([*common, "--second", str(paths["prompted:big/single_word"]),
                 "--out", str(tmp_path / "one")]) == 0  # fmt: skip
    second_args = [a for p in parts for a in ("--second", str(p))]
    assert main([*common, *second_args, "--out", str(tmp_path / "split")]) == 0
    one = read_cascade(tmp_path / "one" / "cascade.jsonl")
    split = read_cascade(tmp_path / "split" / "cascade.jsonl")
    assert len({r["cascade"] for r in split}) == 1
    assert [(r["dataset"], r["fraction"], r["auroc"]) for r in split] == [
        (r["dataset"], r["fraction"], r["auroc"]) for r in one
    ]
