"""The old names kept for one release after `layer` came to mean a hidden_states index and
`block` the steered block: the decorator behind the old keywords, and every command's old
--layer / --layers flags (parsed only: no model loads). Each test fails when its alias goes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mup._renamed import old_keywords, old_name, renamed_field


def test_old_keywords_pass_the_value_on_and_warn_at_the_caller():
    @old_keywords(layer="block")
    def where(*, block=None):
        return block

    with pytest.warns(DeprecationWarning, match="the keyword layer= is deprecated") as got:
        assert where(layer=3) == 3
    assert got[0].filename == __file__  # the caller's line, not the decorator's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert where(block=4) == 4
    with pytest.raises(TypeError, match="got block= and its old name layer="):
        where(block=1, layer=1)


def test_old_name_of_a_function_and_of_a_row_field():
    def train_blocks(x):
        return x + 1

    old = old_name(train_blocks, "train_layers")
    assert old.__name__ == "train_layers"
    with pytest.warns(DeprecationWarning, match="train_layers is deprecated, use train_blocks"):
        assert old(1) == 2
    assert renamed_field({"a": 1, "layer": 2, "b": 3}, "layer", "block") == {
        "a": 1,
        "block": 2,
        "b": 3,
    }
    assert list(renamed_field({"a": 1, "layer": 2}, "layer", "block")) == ["a", "block"]
    row = {"block": 1, "layer": 9}  # both: the new field wins, nothing renamed
    assert renamed_field(row, "layer", "block") is row


def test_steering_layers_is_the_old_name_of_blocks():
    from mup.models import Steering

    with pytest.warns(DeprecationWarning, match="Steering: the keyword layers="):
        s = Steering(layers=(1, 2), vectors=np.ones((2, 4)))
    assert s.blocks == s.layers == (1, 2)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["vector", "--store", "s", "--layer", "3", "--out", "v.npy"], "block", 3),
        (["train-bipo", "--layer", "2", "--out", "o"], "block", 2),
        (["train-bipo", "--layers", "1,3-4", "--out", "o"], "blocks", [1, 3, 4]),
        (["import", "v.pt", "--model", "m", "--layer", "5", "--out", "v.safetensors"], "block", 5),
        (["sweep", "--vector", "v.npy", "--layer", "1", "--out", "o"], "block", 1),
    ],
)
def test_steering_commands_take_the_old_flags(argv, dest, value):
    from mup.steering._cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    new = [a.replace("--layers", "--blocks").replace("--layer", "--block") for a in argv]
    assert getattr(build_parser().parse_args(new), dest) == value


def test_serve_and_evals_take_the_old_layer_flag():
    from mup.evals._cli import build_parser as evals_parser
    from mup.serve._cli import parse_args

    assert parse_args(["--model", "m", "--layer", "2"]).block == 2
    assert parse_args(["--model", "m", "--block", "2"]).block == 2
    assert evals_parser().parse_args(["run", "--suite", "s", "--layer", "1"]).block == 1
    assert evals_parser().parse_args(["run", "--suite", "s", "--block", "1"]).block == 1


def test_help_shows_both_names():
    from mup.serve._cli import build_parser

    help_text = build_parser().format_help()
    assert "--block BLOCK, --layer BLOCK" in help_text
