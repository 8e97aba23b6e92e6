"""`mup data generate` against a real `mup serve` of a tiny random llama, through the official
openai client and the counting proxy (conftest): the pipeline generate -> relabel -> extract ->
probe, resume after SIGKILL, faults, and inputs refused before any request.

What a random model can and cannot show: its text is junk, so these tests check the machinery
(formats, schemas, ids, counts, resume, failure accounting), never the quality of what is
written. mup serve constrains decoding to the answer's JSON schema, which `auto` asks for
first; the pipeline tests name the prefix format instead (the answer starts as
``{"prompt": "`` and the model continues it), so that it keeps its coverage. Either way the
random model closes the string with a quote in some answers and not in others (before
max_tokens), which exercises both the valid path and the retries-then-reject path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from mup.data import load_records
from mup.datagen._cli import main
from mup.datagen._generate import MIN_WORDS, pair_specs, sidecar, variation
from mup.datagen._label import iter_jsonl

pytest.importorskip("openai")

FACTORS = {
    "role_of_user": ["nurses", "shop owners"],
    "impact_factor": ["permanent harm", "financial consequences"],
    "topic": ["Medicine", "Finance", "Education"],
}
VARIATIONS = {
    "prompt_style": {"Question": "question", "Third Person": "third-person statement"},
    "tone": {"casual": "Write in a casual tone.", "angry": "Write in an angry tone."},
    "language": {"English": "Write in English.", "German": "Write in German."},
    "length": {"very short": "8", "short": "12"},
}
# Few tokens per answer keep the tiny model's decode cheap.
FAST = ["--max-tokens", "48", "--prompt-max-tokens", "48", "--no-progress"]


@pytest.fixture
def inputs(tmp_path):
    factors, variations = tmp_path / "factors.json", tmp_path / "variations.json"
    factors.write_text(json.dumps(FACTORS))
    variations.write_text(json.dumps(VARIATIONS))
    return ["--factors", str(factors), "--variations", str(variations)]


def generate(proxy, inputs, out, *extra: str) -> int:
    args = ["generate", "--base-url", proxy.url, "--out", str(out), *inputs, *FAST, *extra]
    return main(args)


def request_keys(bodies) -> list[tuple[str, int]]:
    """(user message, seed) of each request: an attempt of an item, unique by construction."""
    return [
        (next(m["content"] for m in b["messages"] if m["role"] == "user"), b["seed"])
        for b in bodies
    ]


def check_accounting(proxy, out):
    """Every answered request is a finished item or a line of the rejects file, and each
    (message, seed) was answered once."""
    prompts = list(iter_jsonl(out))
    situations = list(iter_jsonl(sidecar(out, "situations")))
    rejects_file = sidecar(out, "rejects")
    rejects = list(iter_jsonl(rejects_file)) if rejects_file.exists() else []
    parse_rejects = [r for r in rejects if r["kind"] == "parse"]
    assert len(proxy.answered) == len(prompts) + len(situations) + len(parse_rejects)
    keys = request_keys(proxy.answered)
    assert len(set(keys)) == len(keys), "an attempt was asked twice"
    return prompts, situations, rejects


@pytest.mark.slow
def test_generate_label_extract_probe(proxy, inputs, tmp_path, tiny_dir, capsys):
    out = tmp_path / "synthetic.jsonl"
    args = ("--n-situations", "8", "--prompts-per-situation", "2", "--concurrency", "8")
    args += ("--response-format", "prefix")
    assert generate(proxy, inputs, out, *args, "--max-retries", "4") == 0
    printed = capsys.readouterr().out
    assert "response format: prefix" in printed and len(proxy.chats) == len(proxy.answered)
    assert all(b["messages"][-1]["role"] == "assistant" for b in proxy.answered)
    assert all(b["continue_final_message"] is True for b in proxy.answered)

    prompts, situations, rejects = check_accounting(proxy, out)
    specs = {p.pair_id: p for p in pair_specs(_factors(), 4, seed=0)}
    # situations: high then low of the same pair, with the pair's factors
    assert {s["pair_id"] for s in situations} <= set(specs)
    for s in situations:
        stake = s["ids"].rsplit("-", 1)[1]
        assert s["labels"] == f"{stake}-stakes" and len(s["situation"].split()) >= 5
        assert s["topic"] == specs[s["pair_id"]].topic and s["gen_model"] == "tiny-labeller"
        if stake == "low":  # written from its pair's high situation, which exists
            assert f"{s['pair_id']}-high" in {x["ids"] for x in situations}
    # rejects: the raw answer and the reason are kept; a final one ends its item
    assert rejects, "a random model writes some invalid answers"
    for r in rejects:
        assert r["raw"] is not None and r["error"] and r["stage"] in ("high", "low", "prompt")
        assert r["attempt"] <= 4 and r["final"] == (r["attempt"] == 4)
    finals = {r["ids"] for r in rejects if r["final"]}
    done_ids = {x["ids"] for x in situations} | {x["ids"] for x in prompts}
    assert not finals & done_ids
    # every wanted item is done, rejected, or skipped because its situation was rejected
    for pair_id in specs:
        for stake in ("high", "low"):
            sid = f"{pair_id}-{stake}"
            assert (sid in done_ids) != (sid in finals) or (
                stake == "low" and f"{pair_id}-high" in finals
            )
            for j in range(2):
                pid = f"{sid}-{j}"
                assert (pid in done_ids) + (pid in finals) == (sid in done_ids)
    # prompts: the stakes schema, the pair's shared variation, readable by load_records
    assert prompts, "some prompts got through"
    for p in prompts:
        pair_id, stake, j = p["ids"].rsplit("-", 2)
        assert p["labels"] == f"{stake}-stakes" and p["pair_id"] == pair_id
        assert {k: p[k] for k in VARIATIONS} == variation(_variations(), 0, pair_id, int(j))
        assert p["situation_id"] == f"{pair_id}-{stake}" and len(p["inputs"].split()) >= 3
    ds = load_records(out)
    assert len(ds) == len(prompts) and set(ds.labels.tolist()) <= {0, 1}
    n_line = f"{len(prompts)} of 16 prompts"
    assert n_line in printed and f"{len(situations)} of 8 situations" in printed

    # a rerun asks for nothing: every item is done or rejected
    before = len(proxy.chats)
    assert generate(proxy, inputs, out, *args, "--max-retries", "4") == 0
    assert len(proxy.chats) == before

    # relabel: the intended stakes stay in labels_before
    labelled = tmp_path / "relabelled.jsonl"
    relabel = ["relabel", "--dataset", str(out), "--out", str(labelled), "--base-url", proxy.url]
    assert main([*relabel, "--max-tokens", "8", "--no-progress", "--response-format", "none"]) == 0
    again = {r["ids"]: r for r in iter_jsonl(labelled)}
    assert set(again) == {p["ids"] for p in prompts}
    assert all(again[p["ids"]]["labels_before"] == p["labels"] for p in prompts)

    # extract + a probe on the generated set (its labels are the intended stakes; the random
    # labeller's are mostly ambiguous)
    from _support.extract import run_cli, store_dirs

    from mup import probes, store

    store_out = tmp_path / "acts"
    done = run_cli(
        ["--model", tiny_dir, "--dataset", out, "--out", store_out, "--layers", "1",
         "--batch-tokens", "512", "--no-progress"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (url,) = store_dirs(store_out)
    acts = store.open(str(url))
    assert acts.n_records == len(prompts)
    if len(set(ds.labels.tolist())) == 2:
        probe = probes.fit("mean", acts, layer=1, seed=0, epochs=2)
        scores = probe.predict(acts)
        assert scores.shape == (len(prompts),) and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.slow  # starts a mup serve process and generates under constraint
def test_auto_takes_json_schema_on_mup_serve_and_answers_validate(proxy, inputs, tmp_path, capsys):
    """`auto` asks for the answer's JSON schema first and mup serve constrains decoding to it:
    no request is refused, and every answer is the schema's JSON, complete (with the words its
    pattern asks for) or cut at max_tokens (a random model rarely closes its string)."""
    out = tmp_path / "schema.jsonl"
    args = ("--n-situations", "4", "--prompts-per-situation", "1", "--concurrency", "8")
    args += ("--max-tokens", "256", "--prompt-max-tokens", "256", "--max-retries", "4")
    assert generate(proxy, inputs, out, *args) == 0
    printed = capsys.readouterr().out
    assert "response format: json_schema" in printed and "refuses" not in printed
    assert len(proxy.chats) == len(proxy.answered)  # nothing refused, nothing stepped down
    for body in proxy.answered:
        schema = body["response_format"]["json_schema"]
        assert body["response_format"]["type"] == "json_schema" and schema["strict"] is True
    prompts, situations, rejects = check_accounting(proxy, out)
    assert situations and prompts, "some answers closed their string"
    for row in [*situations, *prompts]:
        assert row["gen_format"] == "json_schema"
    complete = set()
    for answer in proxy.answers:
        choice = answer["choices"][0]
        text = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            value = json.loads(text)  # complete: the schema's one string field, nothing else
            ((field, string),) = value.items()
            assert len(string.split()) >= MIN_WORDS[field]  # its pattern: closed no earlier
            complete.add(text)
        else:
            assert choice["finish_reason"] == "length" and text.startswith('{"')
    for r in rejects:  # a cut answer, or a complete one that the validator refused (too short)
        assert r["kind"] == "parse"
        assert r["raw"] not in complete or "JSON" not in r["error"], r
    assert any(r["raw"] not in complete for r in rejects), "a random model's strings run on"


def _factors():
    from mup.datagen._generate import Factors

    return Factors.model_validate(FACTORS)


def _variations():
    from mup.datagen._generate import Variations

    return Variations.model_validate(VARIATIONS)


def test_draws_do_not_depend_on_the_run_size():
    small, large = pair_specs(_factors(), 3, seed=5), pair_specs(_factors(), 10, seed=5)
    assert large[:3] == small and len({p.pair_id for p in large}) == 10
    assert pair_specs(_factors(), 3, seed=6) != small
    assert variation(_variations(), 5, "abc", 1) == variation(_variations(), 5, "abc", 1)


def test_resume_after_sigkill_asks_no_attempt_twice(proxy, inputs, tmp_path):
    out = tmp_path / "killed.jsonl"
    args = [sys.executable, "-m", "mup", "data", "generate", "--base-url", proxy.url]
    args += ["--out", str(out), "--n-situations", "4", "--prompts-per-situation", "1"]
    args += ["--concurrency", "2", "--max-retries", "2", "--response-format", "prefix"]
    args += [*inputs, *FAST]
    proxy.hold_after(3)  # three attempts are answered, then requests are parked
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(proxy.answered) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the generate process asked nothing"
            time.sleep(0.05)
        time.sleep(0.5)  # the answered attempts are written before the next is asked
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proxy.release()
    written = sum(1 for p in out.parent.glob("killed*.jsonl") for _ in iter_jsonl(p))
    assert written == 3  # each answered attempt: a finished item or an invalid answer
    assert main(["generate", "--base-url", proxy.url, *args[7:]]) == 0
    check_accounting(proxy, out)  # the rerun asked none of the three again


@pytest.mark.parametrize("status", [500, 429])
def test_faults_are_retried_and_counted(proxy, inputs, tmp_path, capsys, status):
    out = tmp_path / "faults.jsonl"
    proxy.fail_next(3, status)
    args = ("--n-situations", "2", "--prompts-per-situation", "1", "--concurrency", "1")
    assert generate(proxy, inputs, out, *args, "--response-format", "prefix") == 0
    assert proxy.failed == 3
    check_accounting(proxy, out)
    printed = capsys.readouterr().out
    n = len(proxy.answered)
    assert f"in {n} requests ({n + 3} HTTP attempts)" in printed


def test_an_endpoint_that_fails_for_good_stops_the_run(proxy, inputs, tmp_path, capsys):
    out = tmp_path / "down.jsonl"
    proxy.fail_next(100)
    args = ("--n-situations", "2", "--http-retries", "1", "--response-format", "prefix")
    assert generate(proxy, inputs, out, *args) == 1
    err = capsys.readouterr().err
    assert "answered 503 for high" in err and "rerun to continue" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"topics": ["x"]}, "field 'topics': unknown field"),
        ({"drop": "topic"}, "field 'topic': missing"),
        ({"topic": []}, "field 'topic'"),
        ({"n": "3"}, "--n-situations must be even"),
        ({"length": {"short": "a few"}}, "field 'length'"),
    ],
)
def test_bad_input_is_one_line_before_any_request(tmp_path, capsys, change, expected):
    factors, variations = dict(FACTORS), dict(VARIATIONS)
    if "topics" in change:
        factors["topics"] = change["topics"]
    if "drop" in change:
        del factors[change["drop"]]
    if "topic" in change:
        factors["topic"] = change["topic"]
    if "length" in change:
        variations["length"] = change["length"]
    (tmp_path / "f.json").write_text(json.dumps(factors))
    (tmp_path / "v.json").write_text(json.dumps(variations))
    files = ["--factors", str(tmp_path / "f.json"), "--variations", str(tmp_path / "v.json")]
    n = change.get("n", "4")
    # nothing listens on the discard port: a request would fail with exit 1, not 2
    args = ["generate", "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o.jsonl")]
    code = main([*args, *files, "--n-situations", n])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    if "n" not in change:
        assert str(tmp_path / ("v.json" if "length" in change else "f.json")) in err


def test_generate_needs_one_endpoint(tmp_path, inputs, capsys):
    assert (
        main(["generate", "--out", str(tmp_path / "o.jsonl"), "--n-situations", "2", *inputs]) == 2
    )
    assert "give exactly one of --base-url URL or --serve SPEC" in capsys.readouterr().err


def test_relabel_refuses_an_unlabelled_set(tmp_path, capsys):
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text(json.dumps({"inputs": "hi", "ids": "a"}) + "\n")
    args = ["relabel", "--dataset", str(unlabelled), "--out", str(tmp_path / "o.jsonl")]
    assert main([*args, "--base-url", "http://127.0.0.1:9/v1"]) == 1
    assert "has no labels to keep in labels_before" in capsys.readouterr().err
