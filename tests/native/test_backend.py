"""Backend selection: the compiled module, the numpy fallback and forcing either."""

import os
import subprocess
import sys

import pytest

import mup.native as mn


def test_native_module_required_in_ci():
    # CI sets MUP_REQUIRE_NATIVE=1: a wheel without the compiled core must fail loudly there.
    if os.environ.get("MUP_REQUIRE_NATIVE") == "1":
        assert mn.native_available(), "MUP_REQUIRE_NATIVE=1 but mup._native did not import"
        assert mn.backend() == "native"
    elif not mn.native_available():
        pytest.skip("mup._native is not built (set MUP_REQUIRE_NATIVE=1 to make this fail)")
    else:
        assert mn.backend() == "native"


def test_use_backend_forces_and_restores():
    before = mn.backend()
    with mn.use_backend("numpy"):
        assert mn.backend() == "numpy"
    assert mn.backend() == before
    with pytest.raises(ValueError, match="backend must be 'native' or 'numpy'"):
        mn.use_backend("cuda").__enter__()


def test_env_var_disables_native(tmp_path):
    code = "import mup.native as mn; print(mn.backend())"
    env = dict(os.environ, MUP_NATIVE="0")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numpy"
