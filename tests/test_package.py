"""The installed package: the compiled core is present and the console script answers."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mup


def test_version_is_a_string():
    assert isinstance(mup.__version__, str) and mup.__version__.count(".") == 2


@pytest.mark.skipif(
    os.environ.get("MUP_TEST_INSTALLED") != "1", reason="only meaningful against the wheel"
)
def test_tests_run_against_the_installed_wheel():
    # scripts/test.sh installs the wheel; the suite must not silently test the checkout.
    assert "site-packages" in Path(mup.__file__).parts
    # The compiled extension shipped in the wheel (not a local `import`, which would make `mup`
    # a local name of this function).
    native = importlib.import_module("mup._native")
    assert "site-packages" in Path(native.__file__).parts


def test_console_script_lists_commands(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mup.cli", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("demo", "extract", "probes", "steering", "serve", "evals"):
        assert command in out


def test_console_script_rejects_unknown_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mup.cli", "frobnicate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr


def test_steering_exports_the_sweep_api():
    # What a user calls to sweep from Python: the run, its inputs, the summary and the plots.
    import mup.steering as steering
    from mup.steering import (
        DEFAULT_MULTIPLIERS,
        SweepPrompt,
        SweepVector,
        _sweep,
        best_vectors,
        format_best,
        parse_multipliers,
        plot_best,
        plot_vector,
        prompts_from_pairs,
        run_sweep,
        summarise,
        write_summary,
    )

    for obj in (SweepPrompt, SweepVector, run_sweep, summarise, best_vectors, write_summary):
        assert getattr(_sweep, obj.__name__) is obj
    for obj in (plot_vector, plot_best, format_best, prompts_from_pairs):
        assert getattr(_sweep, obj.__name__) is obj
    assert parse_multipliers("-20:20:2") == DEFAULT_MULTIPLIERS
    assert all(hasattr(steering, name) for name in steering.__all__)
    assert "run_sweep(" in steering.__doc__ and "summarise(" in steering.__doc__
