"""Grammars that constrain a row's tokens: JSON schemas compiled by llguidance, one matcher per
constrained row, and the packed allowed-token masks that the jitted sampling step applies.

Axis letters: B slots (or R rows of a prefill), W mask words (ceil(V / 32)), V vocab.

llguidance is the grammar engine behind vLLM's, SGLang's and llama.cpp's structured output. It
builds its token trie from the model's own tokenizer.json (byte-level BPE tokens are mapped to
their bytes inside it; no transformers or torch), and computes a row's mask lazily from the
parser state after the row's last token, so a mask costs a small fraction of a decode step and
a schema needs no up-front index over the vocabulary.

A mask row holds bit ``v % 32`` of word ``v // 32`` for token v (llguidance's layout); -1 (every
bit set) allows every token, which is what rows without a grammar and free slots carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

ALL_ALLOWED = -1  # a mask word with every bit set
# A JSON grammar's mask takes microseconds per row; handing rows to llguidance's thread pool
# costs more than that until the batch is large, and on a busy CPU far more.
PARALLEL_ROWS = 32

# JSON as `json.dumps` writes it ({"a": 1, "b": [2, 3]}): no free whitespace. A small model
# given free whitespace between tokens can spend its whole budget on newlines and indentation,
# and models read and write this spacing more than the compact one.
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,  # a keyword llguidance does not implement is an error, never ignored
}


class GrammarError(ValueError):
    """A schema or grammar that cannot constrain decoding; the message says why."""


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A compiled grammar (llguidance's serialized form) and what it was compiled from.

    kind: "json_object" (any JSON object) or "json_schema".
    text: the llguidance grammar, as `llguidance.LLMatcher` takes it.
    """

    kind: str
    text: str


def _llguidance():
    """llguidance, imported on first use: rows without a grammar never need it."""
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as error:  # a broken install: llguidance is a dependency of mup
        raise GrammarError(
            f"constrained decoding needs the llguidance package ({error}); "
            "pip install 'llguidance>=1.0'"
        ) from None
    return llguidance


def json_schema_grammar(schema: dict[str, Any]) -> Grammar:
    """The grammar of JSON values that `schema` (a JSON Schema object) validates. GrammarError
    names what llguidance cannot compile: a malformed or unsatisfiable schema, an unresolvable
    $ref, a keyword it does not implement, a regex it does not support."""
    llg = _llguidance()
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        text = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError, RecursionError) as error:
        raise GrammarError(f"not a usable JSON schema: {_one_line(error)}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise GrammarError(_one_line(messages[0]) if messages else "invalid schema")
    return Grammar("json_schema", text)


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    grammar = json_schema_grammar({"type": "object"})
    return Grammar("json_object", grammar.text)


def _one_line(error: object, limit: int = 500) -> str:
    """An llguidance message on one line (its regex errors span several, the reason last)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask_words(vocab_size: int) -> int:
    """W: 32-bit words that hold one bit per token of the vocabulary."""
    return (vocab_size + 31) // 32


def allowed_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a packed mask row [W] allows (for tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


class Constraints:
    """The engine's llguidance side, bound to one tokenizer and vocabulary: a matcher per
    constrained row, and their masks written into the engine's mask rows.

    tokenizer: a fast (tokenizers-backed) tokenizer; its tokenizer.json is what llguidance reads.
    vocab_size: V, the model's logits width (may exceed the tokenizer's vocabulary: the extra
      ids are never allowed).
    eos_ids: the tokens that end a row; a grammar allows them once it is complete.
    threads: llguidance's mask threads for batches of `PARALLEL_ROWS` rows or more (None: half
      the cores, at most 8; 1: always in this thread).
    """

    def __init__(
        self, tokenizer, vocab_size: int, eos_ids: Sequence[int], threads: int | None = None
    ):
        llg = _llguidance()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError(
                "constrained decoding needs a fast tokenizer (tokenizer.json); this model's "
                f"is {type(tokenizer).__name__}"
            )
        self.vocab_size = int(vocab_size)
        self._tokenizer = llg.LLTokenizer(
            backend.to_str(), n_vocab=self.vocab_size, eos_token=[int(t) for t in eos_ids]
        )
        # Masks of many rows are computed in parallel, off the GIL; a few threads are plenty.
        if threads is None:
            threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        self._executor = llg.LLExecutor(num_threads=threads) if threads > 1 else None
        self._fill_one = llg.numpy.fill_next_token_bitmask
        self._fill_many = llg.numpy.fill_next_token_bitmask_par
        self._lock = threading.Lock()

    def matcher(self, grammar: Grammar):
        """A fresh matcher of `grammar` at its start; GrammarError if it cannot be built."""
        llg = _llguidance()
        m = llg.LLMatcher(self._tokenizer, grammar.text, log_level=0)
        if m.is_error():
            raise GrammarError(_one_line(m.get_error()))
        return m

    def fill(self, rows: Sequence[tuple[Any, int]], masks: np.ndarray) -> None:
        """Write each (matcher, row index)'s next-token mask into ``masks[index]`` ([N, W]
        int32, C-contiguous)."""
        if self._executor is None or len(rows) < PARALLEL_ROWS:
            for matcher, i in rows:
                self._fill_one(matcher, masks, i)
            return
        with self._lock:  # one executor, one batch at a time
            self._fill_many(self._executor, list(rows), masks)
