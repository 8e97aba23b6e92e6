"""A fast tokenizer built from a GGUF file's metadata, with `gguf` and `tokenizers` alone.

transformers can build the same tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`),
but its GGUF reader imports torch, which mup never needs at run time. A GGUF file has no
`tokenizer.json`; it stores llama.cpp's keys instead:

  tokenizer.ggml.model        "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen 2, ...) or
                              "llama" (sentencepiece), "t5", ...
  tokenizer.ggml.pre          the pre-tokenizer's name ("smollm", "llama-bpe", "qwen2", ...)
  tokenizer.ggml.tokens       the vocabulary, in id order
  tokenizer.ggml.token_type   per token: 1 normal, 3 control (special), 4 user-defined, ...
  tokenizer.ggml.merges       "a b" merge rules, in priority order
  tokenizer.ggml.*_token_id   bos / eos / unknown / padding ids
  tokenizer.chat_template     the Jinja chat template

Byte-level BPE vocabularies are built here, exactly as transformers' GGUF conversion builds
them (tests/text/test_gguf_tokenizer.py holds the two equal on the embedded default); other
kinds go through transformers, which then needs torch, and say so when it is missing.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# llama.cpp's token types (gguf.TokenType): control tokens are special; user-defined ones are
# matched whole in the text but are not special.
_CONTROL, _USER_DEFINED = 3, 4

# The pre-tokenizer split of the byte-level vocabularies whose GGUF name we recognise. Any other
# name (SmolLM2's "smollm", "gpt2", ...) uses GPT-2's own split, built into ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


class GGUFTokenizerError(ValueError):
    """A GGUF file whose tokenizer metadata cannot be turned into a fast tokenizer."""


def gguf_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `tokenizer.*` fields of a GGUF file (plus `general.architecture`), as Python values."""
    import gguf

    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise GGUFTokenizerError(f"{path} is not a readable GGUF file: {error}") from None
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }


def build_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The fast tokenizer (with chat template and special tokens) a GGUF file describes."""
    meta = gguf_tokenizer_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        return _through_transformers(Path(path), kind)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.merges" not in meta:
        raise GGUFTokenizerError(
            f"{path}: a byte-level BPE vocabulary without tokenizer.ggml.merges"
        )
    backend = _byte_level_bpe(
        tokens,
        list(meta["tokenizer.ggml.merges"]),
        list(meta.get("tokenizer.ggml.token_type") or ()),
        meta.get("tokenizer.ggml.pre"),
    )

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    # Offsets stay untrimmed (a token's span includes its leading space), as transformers'
    # conversion leaves them.
    bos = token("bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = token("eos_token_id") if meta.get("tokenizer.ggml.add_eos_token") else None
    backend.post_processor = processors.TemplateProcessing(
        single=_template(bos, "$A", eos, 0),
        pair=f"{_template(bos, '$A', eos, 0)} {_template(bos, '$B', eos, 1)}",
        special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t is not None],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(
    tokens: list[str], merges: list[str], token_types: list[int], pre: str | None
) -> Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        # Some converters write a token in plain UTF-8; the BPE model needs the byte alphabet.
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = _SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter's mislabel; adding it
    # would grow the vocabulary past the model's embedding table, so it stays an ordinary token.
    special = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    plain = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and spelled(token) in vocab
    ]
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)
    return backend


def _template(bos: str | None, sequence: str, eos: str | None, type_id: int) -> str:
    """One TemplateProcessing template: `[bos] $A [eos]`, each piece with its type id."""
    parts = [f"{bos}:{type_id}"] if bos else []
    parts.append(f"{sequence}:{type_id}")
    if eos:
        parts.append(f"{eos}:{type_id}")
    return " ".join(parts)


def _through_transformers(path: Path, kind: Any) -> PreTrainedTokenizerFast:
    try:
        import torch  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise GGUFTokenizerError(
            f"{path}: tokenizer kind {kind!r} is built through transformers' GGUF converter, "
            "which needs torch; install torch, or point --model at the model's HF checkpoint "
            "directory (it has a tokenizer.json)"
        ) from None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
