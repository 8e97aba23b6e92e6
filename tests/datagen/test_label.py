"""`mup data label` against a real `mup serve` of a tiny random llama, through the official
openai client, with a counting proxy in front (conftest): end to end, resumed after SIGKILL,
rejects, retries, an endpoint that fails for good, and inputs refused before any request."""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time

import pytest
from _support.endpoints import kill_after_lines
from _support.servers import free_port

from mup.data import bundled_path, load_records
from mup.datagen import (
    EndpointConfig,
    LabelConfig,
    find_rubric,
    label_dataset,
    open_endpoint,
    rejects_path,
)
from mup.datagen._cli import main
from mup.datagen._label import iter_jsonl, user_message

pytest.importorskip("openai")

LABELS = {"high-stakes", "low-stakes", "ambiguous"}
# Short answers keep the tiny model's decode cheap; the score is still read from logprobs.
# Asking for no response format keeps these tests on the prompt-only path; the end-to-end test
# takes the default (auto), which mup serve answers with JSON constrained to the schema.
FAST = ["--max-tokens", "12", "--no-progress", "--response-format", "none"]


def label(proxy, out, *extra: str) -> int:
    return main(["label", "mini", "--base-url", proxy.url, "--out", str(out), *FAST, *extra])


def mini(n: int):
    return list(load_records(bundled_path()))[:n]


def requested(proxy, start: int = 0) -> collections.Counter:
    """How often each record (by id) was forwarded to the server, from request `start` on."""
    by_text = {user_message(r): r.id for r in load_records(bundled_path())}
    return collections.Counter(by_text[t] for t in proxy.user_texts(start))


def test_label_end_to_end(proxy, tmp_path, capsys):
    out = tmp_path / "labelled.jsonl"
    assert label(proxy, out, "--limit", "8", "--concurrency", "4", "--response-format", "auto") == 0
    rows = list(iter_jsonl(out))
    records = {r.id: r for r in mini(8)}
    assert sorted(r["ids"] for r in rows) == sorted(records)
    inputs = {
        json.loads(line)["ids"]: json.loads(line)
        for line in bundled_path().read_text().splitlines()
        if line.strip()
    }
    for row in rows:
        original = inputs[row["ids"]]
        # every input field is kept; the old label and scale label are kept aside
        assert {k: row[k] for k in original if k not in ("labels", "scale_labels")} == {
            k: v for k, v in original.items() if k not in ("labels", "scale_labels")
        }
        assert row["labels_before"] == original["labels"]
        assert row["scale_labels_before"] == original["scale_labels"]
        assert row["labels"] in LABELS
        # a random model writes junk, but with logprobs every record still gets a score
        assert row["score_expected"] is not None and 1 <= row["scale_labels"] <= 10
        assert row["scale_labels"] == row["score_expected"]
        assert 0 <= row["score_mass"] <= 1
        assert row["label_model"] == "tiny-labeller" and row["label_context"] == "none"
        if row["score_parsed"] is None:  # what it wrote is kept next to the label
            assert row["labels"] == "ambiguous" and "label_raw" in row
    # mup serve constrains decoding to the schema: one request per record, none refused
    answered = collections.Counter(
        by_text
        for by_text in (user_message(r) for r in mini(8))
        for body in proxy.answered
        if next(m["content"] for m in body["messages"] if m["role"] == "user") == by_text
    )
    assert list(answered.values()) == [1] * 8
    assert all(body["response_format"]["type"] == "json_schema" for body in proxy.answered)
    assert not rejects_path(out).exists()  # no rejects, no file
    # what was sent: the rubric and the format as the system prompt, logprobs, a JSON schema
    body = proxy.chats[0]
    system = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "system"
    assert find_rubric().read_text().strip() in system and '"score"' in system
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["response_format"]["type"] == "json_schema" and body["temperature"] == 0
    assert len(proxy.chats) == len(proxy.answered) == 8  # nothing refused
    # token accounting: the sums of what the server reported
    printed = capsys.readouterr().out
    prompt = sum(a["usage"]["prompt_tokens"] for a in proxy.answers)
    completion = sum(a["usage"]["completion_tokens"] for a in proxy.answers)
    assert f"tokens: {prompt} prompt + {completion} completion in 8 requests" in printed
    assert "8 of 8 records labelled" in printed and "response format: json_schema" in printed

    # a rerun asks for nothing: every record is done
    before = len(proxy.chats)
    assert label(proxy, out, "--limit", "8", "--response-format", "auto") == 0
    assert len(proxy.chats) == before and len(list(iter_jsonl(out))) == 8
    # ... and more records continue the same file
    assert label(proxy, out, "--limit", "10", "--response-format", "auto") == 0
    assert len(proxy.answered) == 8 + 2 and len(list(iter_jsonl(out))) == 10


def test_json_schema_answers_from_a_random_model_parse(proxy, tmp_path, capsys):
    """With decoding constrained to the answer schema (score and confidence 1..10), even a
    random model's answers parse: every record gets its parsed score and confidence, and only
    the free-text reason may be cut at max_tokens (then read up to the cut)."""
    out = tmp_path / "schema.jsonl"
    args = ("--limit", "4", "--concurrency", "4", "--response-format", "auto")
    assert label(proxy, out, *args, "--max-tokens", "40") == 0
    rows = list(iter_jsonl(out))
    assert len(rows) == 4 and not rejects_path(out).exists()
    for row in rows:
        assert 1 <= row["score_parsed"] <= 10 and 1 <= row["confidence"] <= 10
        assert "label_parse_error" not in row and isinstance(row["reason"], str)
    for answer in proxy.answers:
        choice = answer["choices"][0]
        if choice["finish_reason"] == "stop":
            assert set(json.loads(choice["message"]["content"])) == {
                "score",
                "confidence",
                "reason",
            }
    assert "response format: json_schema" in capsys.readouterr().out


def test_resume_after_sigkill_never_requests_a_finished_record_again(proxy, tmp_path):
    out = tmp_path / "killed.jsonl"
    args = [sys.executable, "-m", "mup", "data", "label", "mini", "--base-url", proxy.url]
    args += ["--out", str(out), "--limit", "8", "--concurrency", "2", *FAST]
    # three records are answered, then requests are parked and the process is killed
    assert kill_after_lines(proxy, args, out, 3, "labelling") == -signal.SIGKILL
    first = {row["ids"] for row in iter_jsonl(out)}
    assert len(first) == 3 and len(proxy.chats) == 3
    proxy.release()
    with open(out, "ab") as f:  # and a write that the kill cut short
        f.write(b'{"ids": "mini37-h", "inputs": "half a li')

    assert label(proxy, out, "--limit", "8", "--concurrency", "2") == 0
    counts = requested(proxy)
    assert counts == {r.id: 1 for r in mini(8)}, "a record was requested twice"
    assert not set(requested(proxy, start=3)) & first  # the rerun skipped the finished ones
    resumed = [row["ids"] for row in iter_jsonl(out)]
    assert len(resumed) == len(set(resumed)) == 8

    whole = tmp_path / "whole.jsonl"  # an uninterrupted run labels the same records
    assert label(proxy, whole, "--limit", "8", "--concurrency", "2") == 0
    assert {row["ids"] for row in iter_jsonl(whole)} == set(resumed)


def test_rejects_are_kept_with_the_raw_answer_and_counted(proxy, tmp_path, capsys):
    out = tmp_path / "parsed.jsonl"
    # no logprobs: the random model's junk must parse, and it does not
    assert label(proxy, out, "--limit", "4", "--top-logprobs", "0") == 0
    assert "logprobs" not in proxy.chats[0]
    rejects = list(iter_jsonl(tmp_path / "parsed.rejects.jsonl"))
    assert sorted(r["ids"] for r in rejects) == sorted(r.id for r in mini(4))
    answers = {a["choices"][0]["message"]["content"] for a in proxy.answers}
    for row in rejects:
        assert row["kind"] == "parse" and row["error"] and row["raw"] in answers
    assert not out.read_text()
    printed = capsys.readouterr().out
    assert "this run: 0 labelled, 4 rejected" in printed and "4 rejected records" in printed

    # rejects are finished records: a rerun does not ask again, --retry-rejects does
    assert label(proxy, out, "--limit", "4", "--top-logprobs", "0") == 0
    assert len(proxy.chats) == 4
    assert label(proxy, out, "--limit", "4", "--top-logprobs", "0", "--retry-rejects") == 0
    assert len(proxy.chats) == 8
    assert "4 rejected records" in capsys.readouterr().out


def test_a_record_the_server_refuses_is_rejected_and_the_rest_labelled(proxy, tmp_path):
    records = tmp_path / "two.jsonl"
    rows = [
        {"inputs": "word " * 6000, "ids": "long"},  # past the server's 2048-token context
        {"inputs": "How do I keep basil alive?", "ids": "short"},
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "two-labelled.jsonl"
    args = ["label", str(records), "--base-url", proxy.url, "--out", str(out), *FAST]
    assert main(args) == 0
    assert [r["ids"] for r in iter_jsonl(out)] == ["short"]
    (reject,) = iter_jsonl(tmp_path / "two-labelled.rejects.jsonl")
    assert reject["ids"] == "long" and reject["kind"] == "request"
    assert "context length" in reject["error"] and reject["raw"] is None
    # --max-input-chars keeps the end of it, and then it is labelled (another file: the
    # setting is part of what an output's records must share)
    cut = tmp_path / "cut.jsonl"
    args = ["label", str(records), "--base-url", proxy.url, "--out", str(cut), *FAST]
    assert main([*args, "--max-input-chars", "2000"]) == 0
    assert sorted(r["ids"] for r in iter_jsonl(cut)) == ["long", "short"]


def test_several_inputs_through_one_endpoint_into_a_folder(proxy, tmp_path, capsys):
    anthropic = tmp_path / "anthropic_like.jsonl"
    anthropic.write_text(json.dumps({"inputs": "Is it fine to skip a dentist visit?", "ids": 1}))
    out = tmp_path / "labelled"
    args = ["label", "mini", str(anthropic), "--base-url", proxy.url, "--out", str(out)]
    assert main([*args, "--limit", "2", "--context", "medical", *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["anthropic_like.jsonl", "mini.jsonl"]
    (row,) = iter_jsonl(out / "anthropic_like.jsonl")
    assert row["ids"] == 1 and row["label_context"] == "medical"  # the id keeps its type
    assert len(list(iter_jsonl(out / "mini.jsonl"))) == 2
    printed = capsys.readouterr().out  # each input's tokens are its own
    assert printed.count(" completion in 2 requests") == 1
    assert printed.count(" completion in 1 requests") == 1
    assert sum(p.startswith("GET") for p in proxy.paths) == 1  # one endpoint check for both
    assert main([*args, "--out", str(tmp_path / "x.jsonl")]) == 1  # several inputs: a folder


def test_refused_options_are_dropped_one_at_a_time(proxy, tmp_path, capsys):
    out = tmp_path / "plain.jsonl"
    proxy.refuse = {"response_format", "logprobs"}
    assert label(proxy, out, "--limit", "3", "--concurrency", "3", "--response-format", "auto") == 0
    # json_schema, then json_object refused; then logprobs: each step taken once, however many
    # requests were refused together
    assert set(proxy.refused) == {"response_format", "logprobs"}
    assert all("response_format" not in b and "logprobs" not in b for b in proxy.chats)
    assert len(proxy.chats) == 3  # one answered request per record
    printed = capsys.readouterr().out  # the run's summary repeats each warning
    assert "refuses response_format json_schema; using json_object" in printed
    assert "refuses response_format json_object; using none" in printed
    assert "refuses logprobs" in printed
    # parse only now: the random model's junk is rejected
    assert len(list(iter_jsonl(rejects_path(out)))) == 3

    proxy.refused.clear()
    named = tmp_path / "named.jsonl"
    args = ("--limit", "1", "--response-format", "json_schema")
    assert label(proxy, named, *args) == 1  # a format asked for by name is not replaced
    err = capsys.readouterr().err
    assert err.startswith("mup data label: the endpoint refuses response_format json_schema")
    assert "Traceback" not in err


def test_transient_failures_are_retried_by_the_client(proxy, tmp_path, capsys):
    out = tmp_path / "retried.jsonl"
    proxy.fail_next(2)  # two 503s: the openai client backs off and tries again
    assert label(proxy, out, "--limit", "2", "--concurrency", "1") == 0
    assert len(list(iter_jsonl(out))) == 2 and proxy.failed == 2
    assert "in 2 requests (4 HTTP attempts)" in capsys.readouterr().out


def test_an_endpoint_that_fails_for_good_stops_the_run_and_keeps_the_work(proxy, tmp_path, capsys):
    out = tmp_path / "stopped.jsonl"
    assert label(proxy, out, "--limit", "2", "--concurrency", "1") == 0
    proxy.fail_next(10**6)
    assert label(proxy, out, "--limit", "6", "--concurrency", "1", "--max-retries", "1") == 1
    err = capsys.readouterr().err
    assert "answered 503 for record" in err and "2 labelled" in err and "rerun" in err
    assert "Traceback" not in err
    assert len(list(iter_jsonl(out))) == 2
    proxy.fail_next(0)
    assert label(proxy, out, "--limit", "6", "--concurrency", "1") == 0
    assert len(list(iter_jsonl(out))) == 6


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mup data label: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rubric", "no/such/rubric.md"], "the rubric file no/such/rubric.md does not exist"),
        (["--context", "nope"], "unknown context 'nope'"),
        (["--high-threshold", "2"], "must be below"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_request(proxy, tmp_path, capsys, extra, message):
    out = tmp_path / "never.jsonl"
    assert label(proxy, out, *extra) == 1
    assert message in _one_error_line(capsys.readouterr().err)
    assert proxy.paths == [] and not out.exists()


def test_missing_input_and_unreachable_endpoint_fail_in_one_line(tmp_path, capsys):
    out = tmp_path / "never.jsonl"
    down = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["label", str(tmp_path / "none.jsonl"), "--base-url", down, "--out", str(out)]) == 1
    assert "none.jsonl does not exist" in _one_error_line(capsys.readouterr().err)
    started = time.monotonic()
    assert main(["label", "mini", "--base-url", down, "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot reach the endpoint {down}" in line and "refused" in line.lower()
    assert time.monotonic() - started < 10  # no retrying a dead endpoint for minutes
    assert main(["label", "mini", "--out", str(out)]) == 1
    assert "exactly one of --base-url" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_an_output_of_other_settings_is_refused(proxy, tmp_path, capsys):
    out = tmp_path / "mixed.jsonl"
    assert label(proxy, out, "--limit", "1") == 0
    before = len(proxy.chats)
    assert label(proxy, out, "--limit", "2", "--context", "medical") == 1
    assert "label_prompt_sha256" in _one_error_line(capsys.readouterr().err)
    assert label(proxy, out, "--limit", "2", "--model", "other") == 1
    assert "does not serve the model 'other'" in _one_error_line(capsys.readouterr().err)
    assert len(proxy.chats) == before


def test_serve_runs_a_local_server_for_the_block(tiny_dir, tmp_path):
    config = EndpointConfig(
        serve=str(tiny_dir), serve_args=("--max-context", "2048", "--no-warmup")
    )
    rubric = find_rubric().read_text()
    with open_endpoint(config) as endpoint:
        server = endpoint.server
        assert server.proc.poll() is None and server.log_path.is_file()
        summary = label_dataset(
            endpoint,
            load_records(bundled_path()),
            tmp_path / "served.jsonl",
            LabelConfig(rubric=rubric, max_tokens=8),
            limit=2,
            progress=False,
        )
    assert summary.n_labelled == 2 and endpoint.model == tiny_dir.name
    assert server.proc.returncode is not None  # stopped with the block
    assert not server.log_path.exists()  # a clean run leaves no log behind


def test_serve_that_cannot_start_names_its_log(tmp_path, capsys):
    out = tmp_path / "never.jsonl"
    missing = tmp_path / "no-model"
    assert main(["label", "mini", "--serve", str(missing), "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"mup serve --model {missing} exited" in line and "(log: " in line
    log = line.rsplit("(log: ", 1)[1].rstrip(")")
    assert os.path.isfile(log)
    os.unlink(log)
