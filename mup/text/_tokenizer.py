"""Load the fast tokenizer (with its chat template) that belongs to a model spec."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mup._resolve import resolve_spec
from mup.text._gguf import build_gguf_tokenizer

# Bump when build_gguf_tokenizer changes what it builds: cached copies of older builds are
# then ignored.
GGUF_BUILDER = "mup-gguf1"

logger = logging.getLogger(__name__)

# SmolLM2-Instruct's own template, as its GGUF and tokenizer_config.json carry it. Used only if a
# SmolLM2 GGUF file lacks the `tokenizer.chat_template` key (older conversions dropped it).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(spec: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a model spec (short name, .gguf file, checkpoint dir or hub id).

    Cached per spec: every caller shares one tokenizer object, so do not mutate it.
    Raises ValueError when the tokenizer is not a fast one (role assignment needs offsets) or
    has no chat template.
    """
    return _load_tokenizer(os.fspath(spec))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    resolved = resolve_spec(spec)
    # Second level keyed by location: "smollm2-135m" and the path of its GGUF share one object.
    return _load_resolved(resolved.kind, str(resolved.path))


@functools.lru_cache(maxsize=8)
def _load_resolved(kind: str, location: str) -> PreTrainedTokenizerBase:
    path = Path(location)
    gguf = kind == "gguf"
    tokenizer = _gguf_tokenizer(path) if gguf else AutoTokenizer.from_pretrained(location)
    if not tokenizer.is_fast:
        raise ValueError(
            f"{path}: the tokenizer is a slow (Python) one; mup needs a fast tokenizer "
            "(tokenizer.json) for character offsets"
        )
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{path}: the tokenizer has no chat template; mup encodes conversations "
            "with the model's template (use an instruction-tuned checkpoint)"
        )
    return tokenizer


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: ``$MUP_CACHE_DIR`` or ``~/.cache/mup``."""
    root = os.environ.get("MUP_CACHE_DIR") or Path.home() / ".cache" / "mup"
    return Path(root) / "tokenizers"


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Build the tokenizer from a GGUF file's metadata, through an on-disk cache.

    Reading the metadata walks the whole vocabulary in Python (4 s for SmolLM2 on a free core,
    far more on a busy machine), and every process that encodes chats would pay it. The built
    tokenizer is saved once in HF format; the key holds the file's identity, the builder's
    version and the transformers version that saves and loads the copy.
    """
    stat = path.stat()
    key = (
        f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{GGUF_BUILDER}"
        f"-transformers{transformers.__version__}"
    )
    cached = tokenizer_cache_dir() / key
    if (cached / "tokenizer_config.json").is_file():
        logger.info("tokenizer of %s: loading the converted copy in %s", path, cached)
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except (OSError, ValueError) as error:  # a damaged copy: convert again, say so
            logger.warning("replacing the damaged tokenizer cache %s (%s)", cached, error)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = build_gguf_tokenizer(path)
    if tokenizer.chat_template is None and "smollm2" in path.name.lower():
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: a concurrent reader never sees half a tokenizer.
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is fine to share
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(cached)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        logger.warning("could not cache the tokenizer of %s in %s: %s", path, cached, error)
    return tokenizer
