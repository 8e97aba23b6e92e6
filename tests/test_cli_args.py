"""The argument types and `config_from_args` that the commands share (mup._cli_args)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mup._cli_args import (
    comma_separated,
    config_from_args,
    non_negative_int,
    positive_float,
    positive_int,
    zero_means_none,
)


def _parser(type_) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup x", exit_on_error=False)
    parser.add_argument("--value", type=type_)
    return parser


@pytest.mark.parametrize(
    ("type_", "text", "expected"),
    [
        (positive_int, "3", 3),
        (non_negative_int, "0", 0),
        (positive_float, "0.5", 0.5),
        (zero_means_none, "0", None),
        (zero_means_none, "7", 7),
        (comma_separated(int, "integers"), "1, 2,,3", (1, 2, 3)),
        (comma_separated(str, "ids"), "a,b", ("a", "b")),
    ],
)
def test_types_read_good_values(type_, text, expected):
    assert _parser(type_).parse_args(["--value", text]).value == expected


@pytest.mark.parametrize(
    ("type_", "text", "message"),
    [
        (positive_int, "0", "expected a positive integer, got 0"),
        (non_negative_int, "-1", "expected a number >= 0, got -1"),
        (positive_float, "nan", "expected a positive number, got nan"),
        (positive_float, "-2", "expected a positive number, got -2"),
        (zero_means_none, "-3", "expected 0 (no limit) or a positive integer, got -3"),
        (comma_separated(int, "integers"), "1,x", "expected comma-separated integers, got '1,x'"),
        (comma_separated(int, "integers"), " , ", "expected comma-separated integers, got nothing"),
    ],
)
def test_types_refuse_bad_values_naming_the_flag(type_, text, message):
    with pytest.raises(argparse.ArgumentError, match="--value") as error:
        _parser(type_).parse_args(["--value", text])
    assert message in str(error.value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Config:
    model: str = "m"
    layer: int | None = None
    n_bins: int = 10
    progress: bool = True


def test_config_from_args_takes_fields_by_name_and_given_ones_first():
    args = argparse.Namespace(model="x", layer=3, bins=4, no_progress=True, command="c")
    assert config_from_args(_Config, args, n_bins=args.bins) == _Config(
        model="x", layer=3, n_bins=4, progress=False
    )
    # given values win over same-named arguments; absent arguments keep the defaults
    assert config_from_args(_Config, argparse.Namespace(model="x"), model="y") == _Config(model="y")
