"""The command-line entry points keep XLA programs in a persistent cache (mup._compile_cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Enable the cache as a command does, then compile one program (recorded whatever its compile
# time) and print where JAX keeps programs.
SCRIPT = """
from mup import _compile_cache
import jax, jax.numpy as jnp
print("enabled:", _compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print("jax dir:", jax.config.jax_compilation_cache_dir)
"""


def _run(env_updates: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "MUP_"))}
    env.update(env_updates, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_commands_cache_compiled_programs_under_mup_cache_dir(tmp_path):
    out = _run({"MUP_CACHE_DIR": str(tmp_path)})
    xla = tmp_path / "xla"
    assert f"enabled: {xla}" in out and f"jax dir: {xla}" in out
    assert any(xla.iterdir()), "no compiled program was written to the cache"


def test_cache_can_be_turned_off_or_pointed_elsewhere(tmp_path):
    out = _run({"MUP_CACHE_DIR": str(tmp_path), "MUP_COMPILATION_CACHE": "0"})
    assert "enabled: None" in out and "jax dir: None" in out
    assert not (tmp_path / "xla").exists()
    # The user's own JAX setting wins (JAX reads the variable itself).
    mine = tmp_path / "mine"
    out = _run({"MUP_CACHE_DIR": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(mine)})
    assert f"enabled: {mine}" in out and f"jax dir: {mine}" in out
    assert not (tmp_path / "xla").exists()
