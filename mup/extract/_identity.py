"""Which model an extraction reads: a revision that pins its weights, and its HF config (GGUF
configs through a small on-disk cache, so a no-op re-run does not parse the file again)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from mup._resolve import ResolvedSpec

log = logging.getLogger("mup.extract")


def model_identity(resolved: ResolvedSpec) -> tuple[str, str]:
    """(name, revision) of a model; the revision pins the weights without hashing all of them.

    GGUF: sha256 of the file's size and its first and last MiB (the header holds every tensor's
    name, type and offset). Hub snapshots: the commit hash in the cache path. Local directories:
    sha256 of config.json plus each weight file's name, size and first MiB.
    """
    digest = hashlib.sha256()
    path = resolved.path
    if resolved.kind == "gguf":
        files = [path]
    else:
        parts = path.resolve().parts
        if len(parts) >= 2 and parts[-2] == "snapshots":
            return resolved.name, parts[-1]
        files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return resolved.name, digest.hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def read_model_config(resolved: ResolvedSpec, revision: str) -> dict:
    """The model's HF config dict; for GGUF files through a small on-disk cache.

    Parsing a GGUF header (gguf.GGUFReader walks the whole vocabulary in Python) costs ~5 s of
    CPU for SmolLM2-135M, and a no-op re-run should not pay it. The cache key is the file's
    `model_identity` revision; the dict is tiny JSON.
    """
    from mup.models import read_hf_config

    if resolved.kind != "gguf":
        return read_hf_config(resolved)
    from mup.text import tokenizer_cache_dir

    cached = (
        tokenizer_cache_dir().parent / "model-configs" / f"{slug(resolved.name)}-{revision}.json"
    )
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass  # absent or damaged: parse the file and (re)write the cache
    hf_config = read_hf_config(resolved)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(json.dumps(hf_config))
        staging.replace(cached)  # atomic: concurrent processes never read half a file
    except (OSError, TypeError) as error:
        log.warning("could not cache the config of %s in %s: %s", resolved.path, cached, error)
    return hf_config
