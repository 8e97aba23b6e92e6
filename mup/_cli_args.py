"""Command-line pieces shared by the `mup` commands: argument types and configs from arguments.

The types are argparse ``type=`` callables: a bad value is refused while the command line is
parsed, with a message that names the flag (argparse adds it) and the value, before any work.
`config_from_args` builds a command's config dataclass from its parsed arguments, so that a
flag named like a config field needs no line of its own in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
C = TypeVar("C")


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return n


def positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return x


def zero_means_none(value: str) -> int | None:
    """A limit where 0 means "no limit" (None)."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or a positive integer, got {n}")
    return None if n == 0 else n


def comma_separated(convert: Callable[[str], T], what: str) -> Callable[[str], tuple[T, ...]]:
    """A type for a comma-separated list of at least one value, each read by `convert`; `what`
    names the values in messages, in the plural ("integers", "numbers in [0, 1]")."""

    def parse(value: str) -> tuple[T, ...]:
        try:
            out = tuple(convert(x.strip()) for x in value.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {value!r}"
            ) from None
        if not out:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got nothing")
        return out

    return parse


def config_from_args(cls: type[C], args: argparse.Namespace, **given: Any) -> C:
    """The dataclass `cls` from parsed arguments: each field that `given` does not set takes the
    argument of the same name when the parser has one (a `progress` field: not --no-progress),
    else the field's default."""
    parsed = vars(args)
    if "no_progress" in parsed:
        parsed = {**parsed, "progress": not parsed["no_progress"]}
    values = {
        f.name: parsed[f.name]
        for f in dataclasses.fields(cls)
        if f.init and f.name not in given and f.name in parsed
    }
    return cls(**values, **given)
