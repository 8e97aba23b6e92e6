"""Load the fast tokenizer (with its chat template) that belongs to a model spec."""

from __future__ import annotations

import functools
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mup._resolve import resolve_spec

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
    if resolved.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(
            str(resolved.path.parent), gguf_file=resolved.path.name
        )
        if tokenizer.chat_template is None and "smollm2" in resolved.path.name.lower():
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    if not tokenizer.is_fast:
        raise ValueError(
            f"{resolved.path}: the tokenizer is a slow (Python) one; mup needs a fast tokenizer "
            "(tokenizer.json) for character offsets"
        )
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{resolved.path}: the tokenizer has no chat template; mup encodes conversations "
            "with the model's template (use an instruction-tuned checkpoint)"
        )
    return tokenizer
