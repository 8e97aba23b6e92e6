"""`jsonl_objects`: the reader of score files, deployments and benchmark sets."""

from __future__ import annotations

import pytest

from mup.data import jsonl_objects


class _Refused(Exception):
    pass


def test_objects_come_with_their_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": [2]}\n')
    assert list(jsonl_objects(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"b": [2]})]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}\n{not json}\n', r"a\.jsonl:2: not valid JSON \(Expecting property name"),
        ('\n["a", 1]\n', r"a\.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_a_bad_line_is_named_with_the_callers_error(tmp_path, text, message):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(jsonl_objects(path))
    with pytest.raises(_Refused, match=message):
        list(jsonl_objects(path, _Refused))
