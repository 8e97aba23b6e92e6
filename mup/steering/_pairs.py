"""Preference / contrast pairs: a prompt (chat messages) with a chosen and a rejected response.

Axis letters: P pairs, R rows (2 per pair: chosen then rejected), T padded tokens.

File format (jsonl, one pair per line):
  {"id": "...", "prompt": [{"role": "user", "content": "..."}], "chosen": "...",
   "rejected": "...", "split": "train" | "test"}
`prompt` may also be a plain string (one user message); `id` and `split` are optional
(default: "line-N" and "train").

Encoding: each response is rendered as the assistant turn after the prompt with the model's
chat template; the RESPONSE tokens are the tokens of the assistant message content (role
assistant in `mup.text.encode_chats`), the template's end-of-turn marker excluded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")
BUNDLED_PAIRS = "cautious_vs_dismissive.jsonl"
# Padded lengths are rounded up to a multiple of this, so that sets of similar length share
# one compiled program.
LENGTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """One prompt with the response to move towards (chosen) and away from (rejected)."""

    id: str
    prompt: tuple[dict[str, str], ...]  # chat messages, the last one usually from the user
    chosen: str
    rejected: str
    split: str = "train"


class PairsError(ValueError):
    """A malformed pairs file; the message names the file, line and field."""


def bundled_pairs_path() -> Path:
    """The contrast-pair set shipped with mup (cautious vs dismissive answers, 100 pairs)."""
    resource = resources.files("mup.steering") / "data" / BUNDLED_PAIRS
    with resources.as_file(resource) as path:
        return Path(path)


def load_pairs(path: str | os.PathLike, *, split: str | None = None) -> list[PreferencePair]:
    """Read a pairs jsonl file (see the module docstring); `split` keeps only that split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    pairs: list[PreferencePair] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PairsError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
        if not line.strip():
            continue
        pair = _parse(line, f"{path}:{lineno}", lineno)
        if pair.id in seen:
            raise PairsError(
                f"{path}:{lineno}: duplicate id {pair.id!r} (first on line {seen[pair.id]})"
            )
        seen[pair.id] = lineno
        pairs.append(pair)
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    return [p for p in pairs if split is None or p.split == split]


def _parse(line: str, where: str, lineno: int) -> PreferencePair:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PairsError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise PairsError(f"{where}: not valid JSON: nested too deeply to parse") from None
    except ValueError as e:  # an int literal over Python's digit limit
        raise PairsError(f"{where}: not valid JSON: {str(e).split(';')[0]}") from None
    if not isinstance(obj, dict):
        raise PairsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise PairsError(f"{where}: missing field {key!r}")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise PairsError(f"{where}: field 'prompt' must be a non-empty list of messages or text")
    messages = []
    for m, msg in enumerate(prompt):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise PairsError(f"{where}: prompt[{m}] must be {{'role': str, 'content': str}}")
        if msg["role"] not in ("system", "user", "assistant", "tool"):
            raise PairsError(f"{where}: prompt[{m}] has unknown role {msg['role']!r}")
        messages.append({"role": msg["role"], "content": msg["content"]})
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise PairsError(f"{where}: field {key!r} must be a non-empty string")
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise PairsError(f"{where}: field 'split' is {split!r}, expected one of {SPLITS}")
    pair_id = obj.get("id", f"line-{lineno}")
    if not isinstance(pair_id, str):
        raise PairsError(f"{where}: field 'id' must be a string")
    return PreferencePair(
        id=pair_id,
        prompt=tuple(messages),
        chosen=obj["chosen"],
        rejected=obj["rejected"],
        split=split,
    )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class EncodedPairs:
    """P pairs as 2P right-padded rows: rows 0..P-1 chosen, P..2P-1 rejected.

    tokens:    int32 [2P, T] (padding = 0, never attended to).
    valid:     bool [2P, T], True on real tokens.
    response:  bool [2P, T], True on response tokens (the assistant content).
    """

    ids: tuple[str, ...]
    tokens: np.ndarray
    valid: np.ndarray
    response: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


def encode_pairs(
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    max_tokens: int = 256,
    length: int | None = None,
) -> EncodedPairs:
    """Tokenize every pair with the chat template; see `EncodedPairs`.

    max_tokens: a longer conversation is an error (naming the pair), never truncated, since a
      cut response would change what is compared. length: pad to exactly this many tokens
      (default: the longest, rounded up to a multiple of LENGTH_MULTIPLE).
    """
    from mup.text import ROLE_ASSISTANT, encode_chats

    if not pairs:
        raise ValueError("encode_pairs: no pairs")
    conversations = [[*p.prompt, {"role": "assistant", "content": p.chosen}] for p in pairs]
    conversations += [[*p.prompt, {"role": "assistant", "content": p.rejected}] for p in pairs]
    enc = encode_chats(tokenizer, conversations)
    lengths = enc.lengths  # [2P]
    n = len(pairs)
    for r in range(2 * n):
        pair = pairs[r % n]
        kind = "chosen" if r < n else "rejected"
        if lengths[r] > max_tokens:
            raise ValueError(
                f"pair {pair.id!r} ({kind}): {lengths[r]} tokens, more than max_tokens={max_tokens}"
            )
        _, roles = enc.row(r)
        n_resp = int(np.count_nonzero(roles == ROLE_ASSISTANT))
        if n_resp == 0:
            raise ValueError(f"pair {pair.id!r} ({kind}): the response has no tokens")
        if roles[0] == ROLE_ASSISTANT:
            raise ValueError(f"pair {pair.id!r} ({kind}): the response starts the sequence")
    longest = int(lengths.max())
    if length is None:
        length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    elif length < longest:
        raise ValueError(f"encode_pairs: length={length} is shorter than the longest {longest}")
    tokens = np.zeros((2 * n, length), np.int32)  # [2P, T]
    valid = np.zeros((2 * n, length), bool)  # [2P, T]
    response = np.zeros((2 * n, length), bool)  # [2P, T]
    for r in range(2 * n):
        ids, roles = enc.row(r)
        tokens[r, : len(ids)] = ids
        valid[r, : len(ids)] = True
        response[r, : len(ids)] = roles == ROLE_ASSISTANT
    return EncodedPairs(
        ids=tuple(p.id for p in pairs), tokens=tokens, valid=valid, response=response
    )
