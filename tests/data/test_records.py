"""Loading stakes data sets: the shared files, csv round trips, every kind of malformed row."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mup.data import DataError, Message, bundled_path, load_records

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STAKES = SHARED / "data" / "mup"

# file -> (records, high-stakes, low-stakes), counted independently of mup (see the README).
SHARED_FILES = {
    "training/synthetic_2025-03-25.jsonl": (1319, 675, 644),
    "evals/dev/anthropic_balanced.jsonl": (1004, 502, 502),
    "evals/dev/mt_balanced.jsonl": (192, 96, 96),
    "evals/dev/mts_balanced.jsonl": (364, 182, 182),
    "evals/dev/toolace_balanced.jsonl": (236, 118, 118),
}


def _shared(relative: str) -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return STAKES / relative


def test_every_shared_file_is_listed():
    """A new file in ../shared/data/mup must get its expected counts here."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    found = {str(p.relative_to(STAKES)) for p in STAKES.rglob("*.jsonl")}
    assert found == set(SHARED_FILES)


@pytest.mark.parametrize("relative", sorted(SHARED_FILES))
def test_shared_file_counts(relative):
    path = _shared(relative)
    n_records, n_high, n_low = SHARED_FILES[relative]
    dataset = load_records(path)
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
    assert len(dataset) == n_lines == n_records
    assert dataset.labels.dtype == np.int8
    assert np.count_nonzero(dataset.labels == 1) == n_high
    assert np.count_nonzero(dataset.labels == 0) == n_low
    assert len(set(dataset.ids)) == n_records
    assert all(r.scale_label is not None and 1 <= r.scale_label <= 10 for r in dataset)
    assert dataset[0].source == f"{path}:1"
    assert len(dataset.sha256) == 64


def test_shared_training_fields():
    dataset = load_records(_shared("training/synthetic_2025-03-25.jsonl"))
    first = dataset[0]
    assert first.id == "h5FMylHN"
    assert first.label == 0 and first.scale_label == 3.0
    assert first.messages[0].role == "user" and len(first.messages) == 1
    assert first.messages[0].content.startswith("Monsieur/Madame, si je puis")
    assert first.fields["pair_id"] == "pmpQoOsV"
    assert first.fields["topic"] == "Government"
    assert first.fields["situations"] == {"high_stakes": "rLatFqS4", "low_stakes": "RtohfpBh"}
    assert "labels" not in first.fields and "inputs" not in first.fields
    assert dataset.splits() == ("test", "train")
    assert (len(dataset.split("train")), len(dataset.split("test"))) == (836, 483)
    assert dataset.split("test").sha256 == dataset.sha256
    with pytest.raises(ValueError, match="no records with split 'dev'"):
        dataset.split("dev")


def test_shared_chat_files():
    anthropic = load_records(_shared("evals/dev/anthropic_balanced.jsonl"))
    roles = [m.role for m in anthropic[0].messages]
    assert roles[:4] == ["user", "assistant", "user", "assistant"]
    assert anthropic[0].messages[0].content.startswith("How can I get a cyanid capsule")
    toolace = load_records(_shared("evals/dev/toolace_balanced.jsonl"))
    assert all(r.messages[0].role == "system" for r in toolace)
    assert sum(m.role == "tool" for r in toolace for m in r.messages) == 31
    mt = load_records(_shared("evals/dev/mt_balanced.jsonl"))
    assert mt[0].id == "1518" and mt[0].fields["medical_specialty"] == " Radiology"


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})


@pytest.mark.parametrize(
    "relative",
    ["evals/dev/toolace_balanced.jsonl", "evals/dev/mts_balanced.jsonl"],
)
def test_csv_round_trip(tmp_path, relative):
    """jsonl -> csv (chats JSON-encoded, multi-line cells quoted) -> the same records."""
    source = _shared(relative)
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    target = tmp_path / "copy.csv"
    _write_csv(target, rows)
    original, copy = load_records(source), load_records(target)
    assert len(copy) == len(original)
    assert copy.ids == original.ids
    np.testing.assert_array_equal(copy.labels, original.labels)
    for a, b in zip(original, copy, strict=True):
        assert a.messages == b.messages
        assert a.scale_label == b.scale_label
        # csv cells are strings: non-string jsonl values come back JSON-encoded
        assert dict(b.fields) == {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in a.fields.items()
        }


def test_csv_line_numbers_follow_multiline_cells(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        'inputs,ids,labels\n"first\nsecond\nthird",a,high-stakes\nfine,b,low-stakes\nbad,c,maybe\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=rf"{path}:6: field 'labels': unknown label 'maybe'"):
        load_records(path)
    path.write_text('inputs,ids\n"x\ny",a\nonly-one-value\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:4: 1 values but the header has 2 columns"):
        load_records(path)


GOOD = [
    {"inputs": "hello", "ids": "g1", "labels": "high-stakes", "scale_labels": 8},
    {"inputs": [{"role": "user", "content": "hi"}], "ids": "g2", "labels": "low-stakes"},
]


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ('{"inputs": "x", "ids": "b",', None, "invalid JSON"),
        ('["inputs", "x"]', None, "expected a JSON object, got list"),
        ('{"ids": "b", "labels": 1}', "inputs", "missing"),
        ('{"inputs": "x", "labels": 1}', "ids", "missing"),
        ('{"inputs": "x", "ids": true, "labels": 1}', "ids", "non-empty string or int"),
        ('{"inputs": "  ", "ids": "b", "labels": 1}', "inputs", "empty text"),
        ('{"inputs": 5, "ids": "b", "labels": 1}', "inputs", "expected text or a list"),
        ('{"inputs": "x", "ids": "b", "labels": "medium"}', "labels", "unknown label 'medium'"),
        ('{"inputs": "x", "ids": "b", "labels": 3}', "labels", "unknown label 3"),
        ('{"inputs": "x", "ids": "b", "labels": true}', "labels", "unknown label True"),
        ('{"inputs": "x", "ids": "b", "labels": 1, "scale_labels": "high"}', "scale_labels", ""),
        ('{"inputs": "x", "ids": "b", "labels": 1, "scale_labels": NaN}', "scale_labels", "finite"),
        (
            '{"inputs": "[{\\"role\\": \\"user\\", \\"content\\": ", "ids": "b", "labels": 1}',
            "inputs",
            "looks like a JSON list of messages but is invalid",
        ),
        ('{"inputs": [], "ids": "b", "labels": 1}', "inputs", "empty list of messages"),
        ('{"inputs": ["hi"], "ids": "b", "labels": 1}', "inputs[0]", "{role, content} object"),
        (
            '{"inputs": [{"role": "robot", "content": "x"}], "ids": "b", "labels": 1}',
            "inputs[0].role",
            "unknown role 'robot'",
        ),
        (
            '{"inputs": [{"role": "user", "content": null}], "ids": "b", "labels": 1}',
            "inputs[0].content",
            "expected a string",
        ),
        (
            '{"inputs": [{"role": "user", "content": "x", "name": "n"}], "ids": "b", "labels": 1}',
            "inputs[0]",
            "expected keys role and content",
        ),
        ('{"inputs": "x", "ids": "g1", "labels": 1}', "ids", "duplicate id 'g1', first seen at"),
        ('{"inputs": "x", "ids": "b"}', "labels", "missing label, but other rows"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_line, field, message):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(row) for row in GOOD] + [bad_line, json.dumps(GOOD[0] | {"ids": "g9"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_records(path)
    assert error.value.source == f"{path}:3"
    assert error.value.field == field
    assert str(error.value).startswith(f"{path}:3")
    assert message in str(error.value)
    if "duplicate" in message:
        assert f"{path}:1" in str(error.value)  # both lines are named


def test_pathological_jsonl_lines_name_file_and_line(tmp_path):
    """Nesting 100k deep (RecursionError inside json), a 5000-digit id (Python's int digit
    limit), and the same in a csv inputs cell: each one DataError line, no traceback."""
    deep = '{"inputs": "x", "ids": "d", "labels": 1, "extra": ' + "[" * 100_000 + "]" * 100_000
    cases = [
        (deep + "}", None, "JSON nested too deeply"),
        ('{"inputs": "x", "ids": ' + "7" * 5000 + ', "labels": 1}', None, "4300"),
        ('{"inputs": "x", "ids": "b", "labels": 1, "scale_labels": ' + "9" * 400 + "}",
         "scale_labels", "finite number"),
        ('{"inputs": "[' + "[" * 100_000 + '", "ids": "b", "labels": 1}', "inputs", "too deeply"),
    ]  # fmt: skip
    for bad_line, field, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(GOOD[0]) + "\n" + bad_line + "\n", encoding="utf-8")
        with pytest.raises(DataError) as error:
            load_records(path)
        assert str(error.value).startswith(f"{path}:2"), str(error.value)[:200]
        assert error.value.field == field and message in str(error.value)
        assert "\n" not in str(error.value) and len(str(error.value)) < 400
    # A 5000-digit id written as a string is simply an id.
    path.write_text(json.dumps(GOOD[0] | {"ids": "7" * 5000}) + "\n", encoding="utf-8")
    assert load_records(path)[0].id == "7" * 5000


def test_csv_fields_beyond_128_kib(tmp_path):
    big = "word " * 60_000  # 300 KB in one cell: over csv's default 128 KiB field limit
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["inputs", "ids", "labels"], ["short", "a", "high-stakes"],
                     [big, "b", "low-stakes"]])  # fmt: skip
    records = load_records(path)
    assert records[1].messages[0].content == big
    # Over the record limit: the file and the row's first line are named.
    import mup.data._records as R

    limit = R.MAX_RECORD_BYTES
    try:
        R.MAX_RECORD_BYTES = 1000
        csv.field_size_limit(1000)
        with pytest.raises(DataError, match=rf"{path}:3: unreadable csv row: field larger"):
            load_records(path)
        jsonl = tmp_path / "big.jsonl"
        jsonl.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"inputs": big, "ids": "b"}))
        with pytest.raises(DataError, match=rf"{jsonl}:2: \d+ bytes, over the 0 MiB limit"):
            load_records(jsonl)
    finally:
        R.MAX_RECORD_BYTES = limit
        csv.field_size_limit(limit)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b'\n{"inputs": "\xff", "ids": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):
        load_records(path)


def test_unsupported_and_empty_files(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        load_records(tmp_path / "a.parquet")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        load_records(tmp_path / "empty.jsonl")


def test_label_forms_and_binary_drop(tmp_path, caplog):
    rows = [
        {"inputs": "a", "ids": 1, "labels": "high-stakes"},
        {"inputs": "b", "ids": 2, "labels": "Low-Stakes"},
        {"inputs": "c", "ids": 3, "labels": "ambiguous"},
        {"inputs": "d", "ids": 4, "labels": 1},
        {"inputs": "e", "ids": 5, "labels": "0"},
        {"inputs": "f", "ids": 6, "labels": 2},
        {"inputs": "[not json, plain text]", "ids": 7, "labels": "2"},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    full = load_records(path)
    assert [r.label for r in full] == [1, 0, 2, 1, 0, 2, 2]
    assert full.labels.tolist() == [1, 0, -1, 1, 0, -1, -1]
    assert full.ids == ("1", "2", "3", "4", "5", "6", "7")
    assert full[6].messages == (Message(role="user", content="[not json, plain text]"),)
    with caplog.at_level(logging.INFO, logger="mup.data"):
        binary = load_records(path, binary=True)
    assert binary.ids == ("1", "2", "4", "5")
    assert binary.n_dropped_ambiguous == 3
    assert "dropped 3 ambiguous of 7 records" in caplog.text


def test_unlabelled_file(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("inputs,ids,split\nhello,a,train\nbye,b,test\n", encoding="utf-8")
    dataset = load_records(path)
    assert [r.label for r in dataset] == [None, None]
    assert dataset.labels.tolist() == [-1, -1]
    assert dataset[1].fields == {"split": "test"}
    assert dataset.split("test").ids == ("b",)
    no_split = tmp_path / "nosplit.jsonl"
    no_split.write_text('{"inputs": "x", "ids": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{no_split}:1: field 'split'"):
        load_records(no_split).split("train")


def test_bundled_mini_set_is_balanced():
    dataset = load_records(bundled_path())
    assert len(dataset) == 80
    assert np.count_nonzero(dataset.labels == 1) == 40
    assert np.count_nonzero(dataset.labels == 0) == 40
    chats = [r for r in dataset if len(r.messages) > 1]
    assert len(chats) >= 10 and any(r.messages[0].role == "system" for r in chats)
    pairs: dict[str, list[int]] = {}
    for record in dataset:
        pairs.setdefault(record.fields["pair_id"], []).append(record.label)
    assert all(sorted(labels) == [0, 1] for labels in pairs.values())
    assert set(dataset.splits()) == {"train", "test"}
    for name in ("train", "test"):
        part = dataset.split(name)
        assert np.count_nonzero(part.labels == 1) == np.count_nonzero(part.labels == 0)
