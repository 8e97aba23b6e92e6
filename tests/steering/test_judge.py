"""`mup steering judge` against a real `mup serve` of a tiny random llama, through the official
openai client, with the counting proxy of `_support.endpoints` in front: ratings and pairwise
comparisons end to end, the summary files and figure, resumed after SIGKILL, and inputs refused
before any request."""

from __future__ import annotations

import collections
import csv
import json
import sys

import pytest
from _support.endpoints import kill_after_lines, proxy, server, tiny_dir  # noqa: F401 (fixtures)
from _support.servers import free_port

from mup.datagen._label import iter_jsonl
from mup.steering._cli import main
from mup.steering._judge import (
    PAIR_SCHEMA,
    RATING_SCHEMA,
    JudgeConfig,
    load_rubric,
    load_sweep,
    pair_messages,
    plan,
    rating_messages,
)

pytest.importorskip("openai")

# Short answers keep the tiny model's decode cheap; ratings still come from logprobs.
FAST = ["--max-tokens", "8", "--no-progress", "--bootstrap", "50"]
MULTIPLIERS = (-1.0, 0.0, 1.0)
PROMPTS = ("p0", "p1", "p2")


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep" / "sweep.jsonl"
    path.parent.mkdir()
    rows = [
        {
            "vector": "caa_L3.safetensors",
            "block": 3,
            "epoch": 0,
            "multiplier": m,
            "prompt_id": p,
            "prompt": [{"role": "user", "content": f"Tell me about your day ({p})."}],
            "answer": f"My day at {m:+g} was fine, thanks ({p}).",
            "tokens": 9,  # the sweep's own fields are not read
        }
        for m in MULTIPLIERS
        for p in PROMPTS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge(proxy, sweep, out, *extra: str) -> int:  # noqa: F811
    args = ["judge", "--sweep", str(sweep), "--out", str(out), "--base-url", proxy.url, *FAST]
    return main([*args, *extra])


def requested(proxy, sweep, *rubrics, pairwise=False, start=0) -> collections.Counter:  # noqa: F811
    """How often each planned task (by key) was answered by the server (counted over answered
    requests: an endpoint that refuses response_format gets refused requests first)."""
    config = JudgeConfig(rubrics=tuple(load_rubric(r) for r in rubrics), pairwise=pairwise)
    by_text = {}
    for t in plan(load_sweep(sweep), config):
        if t.kind == "rating":
            messages = rating_messages(t.rubric, t.row)
        else:
            a, b = (t.row, t.base) if t.order == "m_first" else (t.base, t.row)
            messages = pair_messages(t.rubric, a, b)
        by_text[(messages[0]["content"], messages[1]["content"])] = t.key
    return collections.Counter(
        by_text[(body["messages"][0]["content"], body["messages"][1]["content"])]
        for body in proxy.answered[start:]
    )


def test_judge_end_to_end_ratings_pairs_summary_and_resume(proxy, sweep, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "judge.jsonl"
    assert judge(proxy, sweep, out, "--pairwise", "--concurrency", "4") == 0
    rows = list(iter_jsonl(out))
    rejects_file = tmp_path / "judge.rejects.jsonl"
    rejects = list(iter_jsonl(rejects_file)) if rejects_file.exists() else []
    n_ratings, n_pairs = 9, 2 * 6  # every answer; every steered answer in both orders
    keys = requested(proxy, sweep, "coherence", pairwise=True)
    assert keys == {k: 1 for k in keys} and len(keys) == n_ratings + n_pairs
    # every judgement is a row or a reject, never dropped
    assert sorted([r["key"] for r in rows] + [r["key"] for r in rejects]) == sorted(keys)
    ratings = [r for r in rows if r["kind"] == "rating"]
    assert len(ratings) == n_ratings  # a random model writes junk; logprobs still rate it
    for r in ratings:
        assert 1 <= r["score"] <= 10 and r["score"] == r["score_expected"]
        assert 0 <= r["score_mass"] <= 1 and r["rubric"] == "coherence"
        assert r["judge_model"] == "tiny-labeller" and r["multiplier"] in MULTIPLIERS
        assert r["valid"] is (r["score_parsed"] is not None)
        if not r["valid"]:
            assert r["parse_error"] and "raw" in r  # what it wrote is kept beside the score
    answers = {a["choices"][0]["message"]["content"] for a in proxy.answers}
    for r in rows:
        if r["kind"] == "pair":
            assert 0 <= r["p_m_better"] <= 1 and r["m_wins"] in (0, 0.5, 1)
    for r in rejects:  # pairs whose junk names neither answer
        assert r["reject"] == "parse" and r["error"] and r["raw"] in answers
    # what was sent: the rubric in the system prompt, logprobs, each kind's JSON schema (mup
    # serve constrains decoding to it)
    asked = [b for b in proxy.chats if b.get("response_format", {}).get("type") == "json_schema"]
    bodies = {b["response_format"]["json_schema"]["name"]: b for b in asked}
    assert bodies["rating"]["response_format"]["json_schema"] == RATING_SCHEMA
    assert bodies["comparison"]["response_format"]["json_schema"] == PAIR_SCHEMA
    for body in bodies.values():
        assert load_rubric("coherence").text in body["messages"][0]["content"]
        assert body["logprobs"] is True and body["top_logprobs"] == 20
    # both orders: the unsteered answer is shown first in half of the comparisons
    texts = [b["messages"][1]["content"] for b in proxy.answered]
    shown_first = [t.split("<answer_B>")[0] for t in texts if "<answer_A>" in t]
    assert collections.Counter("+0 was" in t for t in shown_first) == {True: 6, False: 6}

    # the summary: one row per multiplier for the rubric; the plot beside it
    with open(tmp_path / "judge.summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["multiplier"]) for r in table] == list(MULTIPLIERS)
    by_m = {float(r["multiplier"]): r for r in table}
    assert all(int(r["n"]) == 3 and r["block"] == "3" for r in table)
    mean = sum(r["score"] for r in ratings if r["multiplier"] == 1.0) / 3
    assert float(by_m[1.0]["mean"]) == pytest.approx(mean, rel=1e-5)
    pairs_1 = [r for r in rows if r["kind"] == "pair" and r["multiplier"] == 1.0]
    assert int(by_m[1.0]["n_pairs"]) == len(pairs_1)
    assert int(by_m[1.0]["n_pairs"]) + int(by_m[1.0]["n_pairs_rejected"]) == 6
    assert by_m[0.0]["n_pairs"] == "0" and by_m[0.0]["bt"] in ("0", "")
    summary = json.loads((tmp_path / "judge.summary.json").read_text())
    assert len(summary) == 3 and summary[0]["rubric"] == "coherence"
    assert (tmp_path / "judge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    prompt_tokens = sum(a["usage"]["prompt_tokens"] for a in proxy.answers)
    assert f"tokens: {prompt_tokens} prompt + " in printed and "21 requests" in printed

    # a rerun asks for nothing; a second rubric (a file) asks only for its own ratings
    before = len(proxy.answered)
    asked_before = len(proxy.chats)
    assert judge(proxy, sweep, out, "--pairwise") == 0
    assert len(proxy.chats) == asked_before
    own = tmp_path / "warmth.md"
    own.write_text("# Warmth\nRate how warm the answer is: 1 cold, 10 very warm.\n")
    assert judge(proxy, sweep, out, "--rubric", "coherence", str(own)) == 0
    new = requested(proxy, sweep, "coherence", str(own), start=before)
    assert len(new) == 9 and all(k.startswith("rating|warmth|") for k in new)
    with open(tmp_path / "judge.summary.csv") as f:
        assert sorted({r["rubric"] for r in csv.DictReader(f)}) == ["coherence", "warmth"]
    # other settings into the same file are refused: its ratings would not be comparable
    assert judge(proxy, sweep, out, "--max-tokens", "9") == 1
    assert "judge into another --out" in capsys.readouterr().err


def test_resume_after_sigkill_never_requests_a_finished_rating_again(proxy, sweep, tmp_path):  # noqa: F811
    out = tmp_path / "killed.jsonl"
    args = [sys.executable, "-m", "mup", "steering", "judge", "--sweep", str(sweep)]
    args += ["--out", str(out), "--base-url", proxy.url, "--concurrency", "2", *FAST]
    args += ["--response-format", "none"]  # every request is answered: hold_after counts them
    # three ratings are answered, then requests are parked and the process is killed
    kill_after_lines(proxy, args, out, 3, "judging")
    first = {row["key"] for row in iter_jsonl(out)}
    assert len(first) == 3 and len(proxy.chats) == 3
    proxy.release()
    with open(out, "ab") as f:  # and a line that the kill cut short
        f.write(b'{"key": "rating|coherence|caa_L3.safe')

    assert judge(proxy, sweep, out, "--concurrency", "2", "--response-format", "none") == 0
    counts = requested(proxy, sweep, "coherence")
    assert counts == {k: 1 for k in counts} and len(counts) == 9, "a rating was asked twice"
    assert not set(requested(proxy, sweep, "coherence", start=3)) & first
    resumed = [row["key"] for row in iter_jsonl(out)]
    assert len(resumed) == len(set(resumed)) == 9


def test_bad_inputs_are_refused_before_any_request(proxy, sweep, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "j.jsonl"
    bad = tmp_path / "bad.jsonl"
    # "layer": the steered block's name in sweeps from before the rename (still read)
    bad.write_text(sweep.read_text() + '{"vector": "v", "layer": "three"}\n')
    assert judge(proxy, bad, out) == 2
    assert "bad.jsonl:10: field layer" in capsys.readouterr().err
    assert judge(proxy, sweep, out, "--rubric", "nope") == 2
    assert "unknown rubric 'nope'" in capsys.readouterr().err
    steered = tmp_path / "steered.jsonl"
    lines = sweep.read_text().splitlines()
    steered.write_text("".join(ln + "\n" for ln in lines if '"multiplier": 0.0' not in ln))
    assert judge(proxy, steered, out, "--pairwise") == 2  # no multiplier 0 to compare with
    assert "no answer at multiplier 0" in capsys.readouterr().err
    assert main(["judge", "--sweep", str(sweep), "--out", str(out), "--serve", "x",
                 "--base-url", proxy.url]) == 2  # fmt: skip
    assert proxy.paths == [] and not out.exists()
    gone = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["judge", "--sweep", str(sweep), "--out", str(out), "--base-url", gone]) == 1
    assert "cannot reach the endpoint" in capsys.readouterr().err
