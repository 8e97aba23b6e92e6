"""The steering judge without an endpoint: reading answers and logprobs, sweep files, the task
plan, Wilson intervals, and Bradley-Terry against known strengths, a closed form and a direct
maximum-likelihood fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from mup.steering._judge import (
    BUNDLED_RUBRICS,
    JudgeConfig,
    JudgeError,
    SweepError,
    bradley_terry,
    load_rubric,
    load_sweep,
    option_distribution,
    plan,
    read_choice,
    read_rating,
    summarize,
    wilson_interval,
)


def lp(p: float) -> float:
    return math.log(p)


# -- answers and logprobs ----------------------------------------------------------------------


def test_rating_is_the_expectation_over_the_score_token_with_the_parse_beside_it():
    tokens = ['{"', "score", '":', " 7", ',"', "reason", '":"', "ok", '"}']
    top = [[(t, 0.0)] for t in tokens]
    top[3] = [(" 7", lp(0.5)), (" 8", lp(0.25)), (" 6", lp(0.25))]
    read = read_rating("".join(tokens), (tokens, top))
    assert read["score_expected"] == pytest.approx(7.0) and read["score"] == read["score_expected"]
    assert read["score_parsed"] == 7 and read["valid"] and read["reason"] == "ok"
    assert read["score_mass"] == pytest.approx(1.0) and read["parse_error"] is None
    top[3] = [(" 9", lp(0.75)), (" 7", lp(0.25))]  # the model wrote 7, but believed 9 more
    assert read_rating("".join(tokens), (tokens, top))["score"] == pytest.approx(8.5)


def test_rating_without_logprobs_is_parsed_and_junk_without_them_is_no_rating():
    read = read_rating('Sure. ```json\n{"score": "4", "reason": "loops"}\n```', None)
    assert read["score"] == 4.0 and read["score_expected"] is None and read["valid"]
    assert read_rating("the the the", None) is None
    assert read_rating('{"score": 11, "reason": "x"}', None) is None  # out of the scale
    # junk with logprobs: scored from them, marked not valid, the parse error kept
    tokens = [" 3", " the"]
    junk = read_rating("".join(tokens), (tokens, [[(" 3", lp(0.9))], [(" the", 0.0)]]))
    assert junk["valid"] is False and junk["score_parsed"] is None and junk["parse_error"]
    assert junk["score"] < 3.5


def test_choice_reads_p_a_at_the_better_value_inside_or_after_its_token():
    tokens = ['{"', "better", '":', ' "', "A", '",', ' "reason": "', "x", '"}']
    top = [[(t, 0.0)] for t in tokens]
    top[4] = [("A", lp(0.6)), ("B", lp(0.3)), ("C", lp(0.1))]
    read = read_choice("".join(tokens), (tokens, top))
    assert read["p_a"] == pytest.approx(2 / 3) and read["choice_mass"] == pytest.approx(0.9)
    assert read["choice_parsed"] == "A" and read["valid"]
    # the quote and the letter in one token: alternatives that continue the same prefix count
    merged = ['{"better":', ' "B', '"}']
    dist = option_distribution(
        merged, [[(merged[0], 0.0)], [(' "B', lp(0.8)), (' "A', lp(0.2))], []]
    )
    assert dist.p_a == pytest.approx(0.2) and dist.from_key and dist.position == 1
    # no key: the first lone letter; an answer with no A/B alternatives has no distribution
    loose = ["I", " pick", " B", "."]
    dist = option_distribution(loose, [[], [], [(" B", lp(0.5)), (" A", lp(0.5))], []])
    assert dist.p_a == pytest.approx(0.5) and not dist.from_key
    assert option_distribution(["Hello"], [[("Hello", 0.0)]]) is None
    assert read_choice('{"better": "b", "reason": ""}', None)["p_a"] == 0.0


# -- sweep files and the plan ------------------------------------------------------------------


def sweep_row(m: float, prompt: str, answer: str = "an answer", **extra) -> dict:
    return {
        "vector": "v.safetensors", "block": 3, "epoch": 2, "multiplier": m, "prompt_id": prompt,
        "prompt": [{"role": "user", "content": f"question {prompt}"}], "answer": answer, **extra,
    }  # fmt: skip


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sweep_rows_from_before_the_block_rename(tmp_path):
    """Sweeps written before the rename call the steered block "layer": read as `block`, with
    the same key (so their judge outputs stay resumable)."""
    old = {("layer" if k == "block" else k): v for k, v in sweep_row(0, "p0").items()}
    write(tmp_path / "old.jsonl", [old])
    write(tmp_path / "new.jsonl", [sweep_row(0, "p0")])
    (was,) = load_sweep(tmp_path / "old.jsonl")
    (now,) = load_sweep(tmp_path / "new.jsonl")
    assert was.block == 3 and not was.model_extra and was.key == now.key


def test_sweep_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [sweep_row(0, "p0"), {**sweep_row(1, "p0"), "multiplier": "lots"}])
    with pytest.raises(SweepError, match=r"sweep.jsonl:2: field multiplier"):
        load_sweep(path)
    write(path, [sweep_row(0, "p0"), {**sweep_row(1, "p0"), "prompt": [{"role": "x"}]}])
    with pytest.raises(SweepError, match=r":2: field prompt.0.role"):
        load_sweep(path)
    write(path, [sweep_row(0, "p0"), sweep_row(0.0, "p0")])
    with pytest.raises(SweepError, match=r":2: the same answer as line 1"):
        load_sweep(path)
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "nope.jsonl")
    write(path, [sweep_row(0, 7), sweep_row(0, 7, sample=1)])  # int ids, repeated samples: fine
    assert [r.prompt_id for r in load_sweep(path)] == ["7", "7"]


def test_plan_rates_every_answer_per_rubric_and_pairs_both_orders(tmp_path):
    path = tmp_path / "sweep.jsonl"
    write(path, [sweep_row(m, p) for m in (-1.0, 0.0, 1.0) for p in ("p0", "p1")])
    rows = load_sweep(path)
    rubrics = tuple(load_rubric(name) for name in BUNDLED_RUBRICS)
    tasks = plan(rows, JudgeConfig(rubrics=rubrics, pairwise=True))
    ratings = [t for t in tasks if t.kind == "rating"]
    pairs = [t for t in tasks if t.kind == "pair"]
    assert len(ratings) == 6 * 2 and len(pairs) == 4 * 2 * 2
    assert len({t.key for t in tasks}) == len(tasks)
    assert all(t.base.multiplier == 0 and t.base.prompt_id == t.row.prompt_id for t in pairs)
    write(path, [sweep_row(m, "p0") for m in (-1.0, 1.0)])
    with pytest.raises(SweepError, match="no answer at multiplier 0 for prompt 'p0'"):
        plan(load_sweep(path), JudgeConfig(rubrics=rubrics[:1], pairwise=True))


def test_rubrics_bundled_or_from_files(tmp_path):
    assert "coherence" in BUNDLED_RUBRICS and "relationship-seeking" in BUNDLED_RUBRICS
    assert "1-2" in load_rubric("coherence").text
    own = tmp_path / "warmth.md"
    own.write_text("# Warmth\nRate warmth.\n")
    assert load_rubric(own).name == "warmth"
    with pytest.raises(JudgeError, match="unknown rubric 'nope'"):
        load_rubric("nope")
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(JudgeError, match="is empty"):
        load_rubric(tmp_path / "empty.md")


# -- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(("wins", "n"), [(8, 10), (0, 5), (5, 5), (37, 100)])
def test_wilson_matches_scipy(wins, n):
    ci = stats.binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(wins, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def expected_wins(s: np.ndarray, n: float) -> np.ndarray:
    """wins[i, j] = n * P(i beats j): the data whose MLE is exactly s."""
    p = 1 / (1 + np.exp(-(s[:, None] - s[None, :])))
    return n * p * (1 - np.eye(len(s)))


def test_bradley_terry_recovers_known_strengths_with_the_reference_at_zero():
    s = np.array([0.0, 1.0, -0.5, 2.0, 0.3])
    assert bradley_terry(expected_wins(s, 50.0)) == pytest.approx(s, abs=1e-7)
    shifted = bradley_terry(expected_wins(s, 50.0), reference=3)
    assert shifted == pytest.approx(s - s[3], abs=1e-7)
    batch = np.stack([expected_wins(s, 50.0), expected_wins(-s, 20.0)])  # [2, K, K]
    assert bradley_terry(batch) == pytest.approx(np.stack([s, -s]), abs=1e-7)


def test_bradley_terry_against_the_unsteered_only_is_the_logit_of_the_win_rate():
    # every multiplier compared with m=0 only: the MLE is closed form, logit(wins / n)
    w = np.zeros((4, 4))
    for i, (won, n) in enumerate([(6, 8), (2, 10), (9, 12)], start=1):
        w[i, 0], w[0, i] = won, n - won
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    fit = bradley_terry(w)
    assert fit[0] == 0 and fit[1:] == pytest.approx([logit(6 / 8), logit(2 / 10), logit(9 / 12)])
    # with the prior, as (w + 1/2) / (n + 1); a clean sweep stays finite
    w[1, 0], w[0, 1] = 8, 0
    fit = bradley_terry(w, prior=0.5)
    assert fit[1] == pytest.approx(logit(8.5 / 9)) and fit[2] == pytest.approx(logit(2.5 / 11))
    assert np.isnan(bradley_terry(w)).all()  # never lost: no finite fit without the prior


def test_bradley_terry_is_the_maximum_likelihood_fit_of_a_random_tournament():
    rng = np.random.default_rng(3)
    w = rng.integers(1, 9, size=(6, 6)).astype(float) * (1 - np.eye(6))

    def nll(free):
        s = np.concatenate([[0.0], free])
        d = s[:, None] - s[None, :]
        return float(np.sum(w * np.logaddexp(0, -d)))

    best = optimize.minimize(nll, np.zeros(5), method="BFGS", options={"gtol": 1e-10})
    assert bradley_terry(w)[1:] == pytest.approx(best.x, abs=1e-5)


def test_summary_win_rate_position_bias_and_bt_per_multiplier():
    rubric = load_rubric("coherence")
    config = JudgeConfig(rubrics=(rubric,), pairwise=True, bootstrap=200)
    # judge rows from before the rename, which call the steered block "layer", still summarise
    head = {"vector": "v", "layer": 3, "epoch": None, "rubric": "coherence", "sample": 0}
    judged = []
    for m, scores in ((0.0, [8, 9, 7, 8]), (1.0, [3, 4, 2, 3])):
        for q, score in enumerate(scores):
            judged.append({**head, "kind": "rating", "multiplier": m, "prompt_id": f"p{q}",
                           "score": float(score), "valid": True, "score_mass": 0.9})  # fmt: skip
    # m=1 loses 6 of 8 comparisons; the answer shown first is chosen 6 times of 8
    outcomes = [(0, "m_first", 1.0), (0, "zero_first", 0.0), (1, "m_first", 0.0),
                (1, "zero_first", 0.0), (2, "m_first", 1.0), (2, "zero_first", 0.0),
                (3, "m_first", 0.0), (3, "zero_first", 0.0)]  # fmt: skip
    for q, order, win in outcomes:
        judged.append({**head, "kind": "pair", "multiplier": 1.0, "prompt_id": f"p{q}",
                       "order": order, "m_wins": win, "p_m_better": win})  # fmt: skip
    for q, order in [(q, o) for q in range(4) for o in ("m_first", "zero_first")]:
        win = 0.0 if (q, order) == (2, "zero_first") else 1.0  # m=-1 (below 0) wins 7 of 8
        judged.append({**head, "kind": "pair", "multiplier": -1.0, "prompt_id": f"p{q}",
                       "order": order, "m_wins": win, "p_m_better": win})  # fmt: skip
    rejected = [{**head, "kind": "rating", "multiplier": 1.0, "prompt_id": "p9"}]
    rows = {r["multiplier"]: r for r in summarize(judged, rejected, config)}
    zero, one = rows[0.0], rows[1.0]
    assert zero["block"] == 3 and "layer" not in zero
    assert zero["mean"] == 8 and zero["n"] == 4 and zero["bt"] == 0 and zero["n_pairs"] == 0
    half = stats.t.ppf(0.975, 3) * np.std([3, 4, 2, 3], ddof=1) / 2
    assert one["mean"] == 3 and one["ci_high"] - one["mean"] == pytest.approx(half)
    assert one["n_rejected"] == 1 and one["n_valid"] == 4 and one["mean_mass"] == 0.9
    assert one["win_rate"] == 2 / 8 and (one["win_low"], one["win_high"]) == wilson_interval(2, 8)
    assert one["a_rate"] == 6 / 8
    assert one["bt"] == pytest.approx(math.log(2.5 / 6.5))  # logit((2 + 1/2) / (8 + 1))
    assert one["bt_low"] <= one["bt"] <= one["bt_high"] and one["bt_low"] < one["bt_high"]
    # each multiplier against the unsteered answer, whatever its sign (0 is the reference)
    below = rows[-1.0]
    assert below["win_rate"] == 7 / 8 and below["bt"] == pytest.approx(math.log(7.5 / 1.5))
    assert below["bt_low"] <= below["bt"] <= below["bt_high"] and below["bt_low"] > 0
