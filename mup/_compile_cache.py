"""JAX's persistent compilation cache for the command-line entry points.

`mup extract`, `mup serve`, `mup probes` ... compile one XLA program per length bucket, and
on CPU those compiles are a large share of a short job (SmolLM2-135M: about 3 s per bucket).
Every command runs `enable()` first, so a second run with the same model and shapes loads the
programs from disk instead. Library users keep JAX's own settings: importing mup changes none.

Location: ``$MUP_CACHE_DIR/xla`` (default ``~/.cache/mup/xla``). An explicit
``JAX_COMPILATION_CACHE_DIR`` wins; ``MUP_COMPILATION_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Programs that compile faster than this are not worth a disk round trip.
MIN_COMPILE_SECONDS = 0.5


def cache_dir() -> Path:
    root = os.environ.get("MUP_CACHE_DIR") or Path.home() / ".cache" / "mup"
    return Path(root) / "xla"


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at `cache_dir()`; returns the directory in use
    (None when turned off or not writable)."""
    import jax

    if os.environ.get("MUP_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only home must not stop a job: run without the cache
        log.warning("compilation cache disabled: cannot create %s (%s)", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
