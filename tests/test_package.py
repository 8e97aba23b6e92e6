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
