"""The labeller's pure parts: answer parsing, the expected score from token alternatives, the
label rule, the prompt's parts, and the append-only output file's repair."""

from __future__ import annotations

import json
import math

import pytest

from mup.data import bundled_path, load_records
from mup.datagen import (
    CONTEXTS,
    LabelConfig,
    LabelError,
    parse_answer,
    rejects_path,
    resolve_context,
    score_distribution,
    system_prompt,
)
from mup.datagen._label import JsonlLog, conversation_text, find_rubric, user_message


def test_parse_answer_reads_the_first_valid_object_in_prose_and_fences():
    a = parse_answer('Sure!\n```json\n{"score": 9, "confidence": "8", "reason": "a gun"}\n```')
    assert (a.score, a.confidence, a.reason) == (9, 8, "a gun")
    b = parse_answer('{"note": 1} then {"score": 2, "confidence": 10, "reason": "x", "extra": 0}')
    assert (b.score, b.confidence) == (2, 10)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("no braces at all", "no JSON object"),
        ('{"score": 9, "confidence": 8', "invalid JSON"),
        ('{"score": 11, "confidence": 8, "reason": "r"}', "score"),
        ('{"score": 5, "reason": "r"}', "confidence"),
        ('{"score": 7.5, "confidence": 8, "reason": "r"}', "score"),
    ],
)
def test_parse_answer_says_why_it_fails(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_answer(text)


def lp(p: float) -> float:
    return math.log(p)


def test_expected_score_at_the_score_value_of_a_split_digit_tokenizer():
    # SmolLM2 splits '{"score": 8, ...' into '{"', 'score', '":', ' ', '8', ','
    tokens = ['{"', "score", '":', " ", "8", ","]
    top = [[(t, lp(0.9))] for t in tokens]
    top[4] = [("8", lp(0.5)), ("9", lp(0.2)), ("7", lp(0.1)), ('"', lp(0.06))]
    d = score_distribution(tokens, top)
    assert d.position == 4 and d.from_key
    assert d.mass == pytest.approx(0.8)
    # the seven absent scores share the 0.14 left unlisted: 0.02 each (under the 0.06 bound)
    expected = (8 * 0.5 + 9 * 0.2 + 7 * 0.1 + 0.02 * (1 + 2 + 3 + 4 + 5 + 6 + 10)) / 0.94
    assert d.expected == pytest.approx(expected)


def test_a_one_that_the_answer_continues_with_zero_is_ten():
    tokens = ['{"score":', " ", "1", "0", ","]
    top = [[(t, lp(0.99))] for t in tokens]
    top[2] = [("1", lp(0.7)), ("9", lp(0.3))]
    top[3] = [("0", lp(0.8)), (",", lp(0.2))]  # after "1": "10" with 0.8, "1" with 0.2
    d = score_distribution(tokens, top)
    # nothing is left unlisted at the score's token: the absent scores get nothing
    assert d.expected == pytest.approx(1 * 0.7 * 0.2 + 10 * 0.7 * 0.8 + 9 * 0.3)


def test_single_token_numbers_and_prefixes_inside_the_value_token():
    # a tokenizer with "10" as one token, and the key's '":' merged into the value's token
    tokens = ['{"score', '":10', ', "confidence": 9}']
    top = [[(tokens[0], 0.0)], [('":10', lp(0.5)), ('":9', lp(0.4)), ('": 8', lp(0.1))], [("x", 0)]]
    d = score_distribution(tokens, top)
    assert d.position == 1 and d.from_key and d.mass == pytest.approx(1.0)
    assert d.expected == pytest.approx(10 * 0.5 + 9 * 0.4 + 8 * 0.1)


def test_an_answer_without_a_score_key_is_read_at_its_first_number_then_its_start():
    d = score_distribution(["I'd say ", "7", " out of ten"], [[("x", 0)], [("7", lp(0.5))], []])
    assert d.position == 1 and not d.from_key and d.mass == pytest.approx(0.5)
    junk = score_distribution(["blah", " blah"], [[("blah", lp(0.2)), ("foo", lp(0.1))], []])
    # no score among the alternatives: every score gets the same bound, the mean of 1..10
    assert junk.position == 0 and junk.mass == 0 and junk.expected == pytest.approx(5.5)
    assert score_distribution([], []) is None


@pytest.mark.parametrize(
    ("score", "confidence", "label"),
    [
        (8.0, 7, "high-stakes"),
        (10, 10, "high-stakes"),
        (7.99, 9, "ambiguous"),
        (3.0, 7, "low-stakes"),
        (3.01, 9, "ambiguous"),
        (9, 6, "ambiguous"),  # not confident enough
        (1, None, "ambiguous"),  # confidence unknown (the answer did not parse)
        (None, 9, "ambiguous"),
    ],
)
def test_label_rule(score, confidence, label):
    assert LabelConfig(rubric="r").label(score, confidence) == label


def test_label_thresholds_are_settings():
    config = LabelConfig(rubric="r", high_threshold=6, low_threshold=4, confidence_threshold=3)
    assert config.label(6, 3) == "high-stakes" and config.label(4.5, 9) == "ambiguous"
    with pytest.raises(ValueError, match="below"):
        LabelConfig(rubric="r", high_threshold=3, low_threshold=3)


def test_system_prompt_and_contexts():
    rubric = find_rubric().read_text()
    assert "High-Stakes" in rubric
    prompt = system_prompt(rubric, CONTEXTS["medical"])
    assert prompt.index("health and safety") < prompt.index("High-Stakes") < prompt.index('"score"')
    assert resolve_context("auto", "dev/anthropic") == ("anthropic", CONTEXTS["anthropic"])
    assert resolve_context("auto", "test/mts_raw")[0] == "medical"
    assert resolve_context("auto", None) == ("none", "")
    with pytest.raises(LabelError, match="unknown context"):
        resolve_context("nope")


def test_context_from_a_file(tmp_path):
    path = tmp_path / "finance.txt"
    path.write_text("In particular, consider large financial losses as high-stakes.\n")
    assert resolve_context(str(path)) == ("file:finance", path.read_text().strip())


def test_conversation_text_keeps_the_end_of_long_conversations():
    records = load_records(bundled_path())
    single = next(r for r in records if len(r.messages) == 1)
    assert conversation_text(single) == single.messages[0].content
    multi = next(r for r in records if len(r.messages) > 1)
    text = conversation_text(multi)
    assert text.startswith("User: ") and "\n\nAssistant: " in text
    cut = conversation_text(multi, max_chars=20)
    assert cut == "[...]\n" + text[-20:]
    framed = user_message(multi, max_chars=20)
    assert "<conversation>\n" + cut + "\n</conversation>" in framed


def test_rejects_path(tmp_path):
    assert rejects_path(tmp_path / "out.jsonl") == tmp_path / "out.rejects.jsonl"
    assert rejects_path(tmp_path / "out") == tmp_path / "out.rejects.jsonl"


def test_jsonl_log_cuts_an_incomplete_last_line_and_refuses_foreign_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"ids": "a", "x": 1}\n{"ids": "b", "x"')  # a write cut short by a kill
    log = JsonlLog(path)
    assert list(log.open()) == ["a"]
    log.append({"ids": "c"})
    log.close()
    assert [json.loads(line)["ids"] for line in path.read_text().splitlines()] == ["a", "c"]

    path.write_text('{"ids": "a"}\nnot json\n')
    with pytest.raises(LabelError, match=r"out.jsonl:2: not a record line"):
        JsonlLog(path).open()
    path.write_text('{"ids": "a"}\n{"ids": "a"}\n')
    with pytest.raises(LabelError, match="twice"):
        JsonlLog(path).open()
    assert list(JsonlLog(path, unique=False).open()) == ["a"]  # rejects: the last line counts


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    first = JsonlLog(path)
    first.open(lock=True)
    try:
        with pytest.raises(LabelError, match="another process is writing"):
            JsonlLog(path).open(lock=True)
    finally:
        first.close()
    again = JsonlLog(path)
    again.open(lock=True)  # free again
    again.close()


def test_a_one_the_answer_did_not_write_is_split_by_the_scale_ends():
    tokens = ['"score": ', "9"]
    top = [[(tokens[0], 0.0)], [("9", lp(0.6)), ("1", lp(0.2)), ("2", lp(0.2))]]
    d = score_distribution(tokens, top)
    ten = 0.6 / (0.6 + 0.2)  # P(9) against P(2): this "1" more likely opens a 10
    assert d.expected == pytest.approx(9 * 0.6 + 2 * 0.2 + 0.2 * (1 - ten) + 10 * 0.2 * ten)


def test_an_answer_cut_at_max_tokens_keeps_its_numbers():
    from mup.datagen._label import parse_cut_answer

    a = parse_cut_answer('{"score": 9, "confidence": 8, "reason": "A \\"crane\\" over a str')
    assert (a.score, a.confidence, a.reason) == (9, 8, 'A "crane" over a str...')
    with pytest.raises(ValueError, match="before its confidence"):
        parse_cut_answer('{"score": 9, "conf')
    with pytest.raises(ValueError, match="score"):
        parse_cut_answer('{"score": 12, "confidence": 8, "reason": "')
