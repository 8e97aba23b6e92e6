"""Preference / contrast pairs: a prompt (chat messages) with a chosen and a rejected response.

Axis letters: P pairs, R rows (2 per pair: chosen then rejected), T padded tokens.

File formats (`load_pairs` tells them apart by content, not by name):

1. mup jsonl, one pair per line:
     {"id": "...", "prompt": [{"role": "user", "content": "..."}], "chosen": "...",
      "rejected": "...", "split": "train" | "test"}
   `prompt` may also be a plain string (one user message); `id` and `split` are optional
   (default: "line-N" and "train").
2. The BiPO steering study's jsonl (one file per split, e.g. train.jsonl / test.jsonl), one pair
   per line: {"prompt_arr": [messages...], "chosen_arr": [{"role": "assistant", "content":
   "..."}], "rejected_arr": [...], "entry_id": 0, ...}. `prompt_arr` is the whole conversation
   before the response (it may hold earlier assistant turns); `chosen_arr` / `rejected_arr`
   hold exactly one assistant message (a plain string is accepted too). The id is `entry_id`
   (or `id`) when present; other keys are ignored; `split` is optional as in format 1.
3. One JSON object of parallel arrays, {"prompt_arr": [...], "chosen_arr": [...],
   "rejected_arr": [...]} (optional "split_arr" / "id_arr"): element i of every array is pair i,
   in the per-pair forms of format 2 (a prompt is a message list or a string). The arrays must
   have the same length; errors name the array and the row. A JSON list of format-2 rows is
   read too.

A file that declares no split can be split with ``test_fraction`` (seeded, reproducible).

Encoding: each response is rendered as the assistant turn after the prompt with the model's
chat template; the RESPONSE tokens are the tokens of that final assistant message's content
(role assistant in `mup.text.encode_chats`, last run only: assistant turns inside the prompt are
context), the template's end-of-turn marker excluded.

Truncation (`encode_pairs(..., truncate=True)`, what BiPO's ``max_tokens`` does): a row over
``max_tokens`` first loses the template tokens after the response (they are never scored and,
the model being causal, change nothing). If it is still too long, the PROMPT loses tokens from
its START (the end of the prompt, nearest the response, is kept, as TRL's DPO default
``truncation_mode="keep_end"``) down to ``max(max_tokens - longer_response, min(prompt,
max_tokens // 2))`` tokens, where longer_response is the longer of the pair's two responses, so
chosen and rejected keep the same context. Whatever still does not fit is cut from the END of
the response (its start is kept). The prompt is cut before the response because the response
is what is compared; the first tokens of the prompt (BOS, system prompt) can go.
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
_STUDY_KEYS = ("prompt_arr", "chosen_arr", "rejected_arr")


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


def load_pairs(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
) -> list[PreferencePair]:
    """Read a pairs file (any format in the module docstring); `split` keeps only that split.

    test_fraction: for a file that declares no split (no row has a "split" field), put this
      share of the pairs (at least one, at most all but one) in "test", chosen by a
      permutation from `seed`; a file that does declare splits is an error (its split wins).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    data = path.read_bytes()
    rows = _whole_file_rows(data, path)
    if rows is None:
        rows = _jsonl_rows(data, path)
    pairs: list[PreferencePair] = []
    seen: dict[str, str] = {}
    declared_split = False
    for where, default_id, obj in rows:
        pair, explicit = _parse(obj, where, default_id)
        declared_split |= explicit
        if pair.id in seen:
            raise PairsError(f"{where}: duplicate id {pair.id!r} (first at {seen[pair.id]})")
        seen[pair.id] = where
        pairs.append(pair)
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    if test_fraction is not None:
        if declared_split:
            raise PairsError(
                f"{path}: the file declares its own train/test split; drop the test fraction "
                "(--test-fraction) or the file's 'split' fields"
            )
        pairs = split_pairs(pairs, test_fraction, seed=seed, where=str(path))
    return [p for p in pairs if split is None or p.split == split]


def split_pairs(
    pairs: Sequence[PreferencePair], test_fraction: float, *, seed: int = 0, where: str = "pairs"
) -> list[PreferencePair]:
    """The same pairs, in order, with round(test_fraction * P) of them (seeded) in "test"."""
    n = len(pairs)
    n_test = int(round(test_fraction * n))
    if not 1 <= n_test <= n - 1:
        raise PairsError(
            f"{where}: test fraction {test_fraction} of {n} pairs leaves {n_test} test and "
            f"{n - n_test} train pairs; each split needs at least one"
        )
    test = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())
    return [
        dataclasses.replace(p, split="test" if i in test else "train") for i, p in enumerate(pairs)
    ]


def with_system_prompt(pairs: Sequence[PreferencePair], text: str) -> list[PreferencePair]:
    """Every pair with a system message `text` put before its prompt.

    A pair whose prompt already starts with a system message is an error (two system messages
    would render differently per chat template, and silently replacing one hides data).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("system prompt must be a non-empty string")
    out = []
    for p in pairs:
        if p.prompt and p.prompt[0]["role"] == "system":
            raise ValueError(
                f"pair {p.id!r} already starts with a system message; drop it or the system "
                "prompt option"
            )
        out.append(dataclasses.replace(p, prompt=({"role": "system", "content": text}, *p.prompt)))
    return out


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PairsError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise PairsError(f"{where}: not valid JSON: nested too deeply to parse") from None
    except ValueError as e:  # an int literal over Python's digit limit
        raise PairsError(f"{where}: not valid JSON: {str(e).split(';')[0]}") from None


def _whole_file_rows(data: bytes, path: Path):
    """Rows of a file that is ONE JSON value (format 3, or a list of rows); None for jsonl."""
    head = data.lstrip()[:1]
    if head not in (b"{", b"["):
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # jsonl (several values) or broken: the line reader names the line
    if isinstance(obj, list):
        return [(f"{path}: row {i}", f"row-{i}", row) for i, row in enumerate(obj)]
    if not isinstance(obj, dict) or not _is_columns(obj):
        return None
    lengths = {}
    for key in (*_STUDY_KEYS, "split_arr", "id_arr"):
        if key in obj:
            if not isinstance(obj[key], list):
                raise PairsError(f"{path}: field {key!r} must be an array")
            lengths[key] = len(obj[key])
    missing = [k for k in _STUDY_KEYS if k not in obj]
    if missing:
        raise PairsError(f"{path}: missing field {missing[0]!r} (parallel arrays {_STUDY_KEYS})")
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise PairsError(f"{path}: the parallel arrays differ in length: {desc}")
    rows = []
    for i in range(lengths["prompt_arr"]):
        row = {k: obj[k][i] for k in _STUDY_KEYS}
        if "split_arr" in obj:
            row["split"] = obj["split_arr"][i]
        if "id_arr" in obj:
            row["id"] = obj["id_arr"][i]
        rows.append((f"{path}: row {i}", f"row-{i}", row))
    return rows


def _is_columns(obj: dict) -> bool:
    """A format-3 object: prompt_arr is a list of prompts, not one prompt's messages."""
    prompts = obj.get("prompt_arr")
    if not isinstance(prompts, list) or not any(k in obj for k in _STUDY_KEYS):
        return False
    return not (prompts and all(isinstance(m, dict) for m in prompts))


def _jsonl_rows(data: bytes, path: Path):
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PairsError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
        if line.strip():
            rows.append((f"{path}:{lineno}", f"line-{lineno}", _loads(line, f"{path}:{lineno}")))
    return rows


def _parse(obj, where: str, default_id: str) -> tuple[PreferencePair, bool]:
    """One row -> (pair, whether the row declared its split)."""
    if not isinstance(obj, dict):
        raise PairsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    study = any(k in obj for k in _STUDY_KEYS)
    keys = _STUDY_KEYS if study else ("prompt", "chosen", "rejected")
    for key in keys:
        if key not in obj:
            raise PairsError(f"{where}: missing field {key!r}")
    messages = _messages(obj[keys[0]], where, keys[0])
    chosen = _response(obj[keys[1]], where, keys[1])
    rejected = _response(obj[keys[2]], where, keys[2])
    split = obj.get("split", "train")
    if split not in SPLITS:
        raise PairsError(f"{where}: field 'split' is {split!r}, expected one of {SPLITS}")
    pair_id = obj.get("entry_id", obj.get("id")) if study else obj.get("id")
    if pair_id is None:
        pair_id = default_id
    if study and isinstance(pair_id, int) and not isinstance(pair_id, bool):
        pair_id = str(pair_id)
    if not isinstance(pair_id, str):
        raise PairsError(f"{where}: field 'id' must be a string")
    pair = PreferencePair(
        id=pair_id, prompt=tuple(messages), chosen=chosen, rejected=rejected, split=split
    )
    return pair, "split" in obj


def _messages(prompt, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise PairsError(f"{where}: field {field!r} must be a non-empty list of messages or text")
    messages = []
    for m, msg in enumerate(prompt):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise PairsError(f"{where}: {field}[{m}] must be {{'role': str, 'content': str}}")
        if msg["role"] not in ("system", "user", "assistant", "tool"):
            raise PairsError(f"{where}: {field}[{m}] has unknown role {msg['role']!r}")
        messages.append({"role": msg["role"], "content": msg["content"]})
    return messages


def _response(value, where: str, field: str) -> str:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):  # the study's [{"role": "assistant", "content": ...}]
        if len(value) != 1:
            raise PairsError(
                f"{where}: field {field!r} must hold exactly one assistant message, "
                f"got {len(value)}"
            )
        msg = value[0]
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            raise PairsError(f"{where}: {field}[0] must be {{'role': 'assistant', 'content': str}}")
        value = msg.get("content")
    if not isinstance(value, str) or not value.strip():
        raise PairsError(f"{where}: field {field!r} must be a non-empty string")
    return value


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class EncodedPairs:
    """P pairs as 2P right-padded rows: rows 0..P-1 chosen, P..2P-1 rejected.

    tokens:      int32 [2P, T] (padding = 0, never attended to).
    valid:       bool [2P, T], True on real tokens.
    response:    bool [2P, T], True on response tokens (the final assistant content).
    n_truncated: pairs whose prompt or response lost tokens to `max_tokens` (truncate=True).
    """

    ids: tuple[str, ...]
    tokens: np.ndarray
    valid: np.ndarray
    response: np.ndarray
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def take(self, index: Sequence[int]) -> EncodedPairs:
        """The pairs at `index` (same padded length)."""
        idx = np.asarray(index, np.int64)
        rows = np.concatenate([idx, idx + len(self)])
        return EncodedPairs(
            ids=tuple(self.ids[i] for i in idx),
            tokens=self.tokens[rows],
            valid=self.valid[rows],
            response=self.response[rows],
            n_truncated=self.n_truncated,
        )


def encode_pairs(
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    max_tokens: int = 256,
    truncate: bool = False,
    score_end_of_turn: bool = False,
    length: int | None = None,
) -> EncodedPairs:
    """Tokenize every pair with the chat template; see `EncodedPairs`.

    max_tokens: with truncate=False a longer conversation is an error (naming the pair), since
      a cut response changes what is compared; with truncate=True it is cut as the module
      docstring says. score_end_of_turn: count the template token right after the response
      (its end-of-turn marker, e.g. <|im_end|>) as a response token, as TRL's DPO recipe scores
      the EOS it appends (the response then also "learns to stop"). length: pad to exactly
      this many tokens (default: the longest, rounded up to a multiple of LENGTH_MULTIPLE).
    """
    from mup.text import encode_chats

    if not pairs:
        raise ValueError("encode_pairs: no pairs")
    if max_tokens < 2:
        raise ValueError(f"encode_pairs: max_tokens must be >= 2, got {max_tokens}")
    conversations = [[*p.prompt, {"role": "assistant", "content": p.chosen}] for p in pairs]
    conversations += [[*p.prompt, {"role": "assistant", "content": p.rejected}] for p in pairs]
    enc = encode_chats(tokenizer, conversations)
    n = len(pairs)
    rows = [enc.row(r)[0] for r in range(2 * n)]
    spans = [_response_span(enc.row(r)[1], pairs[r % n], r < n) for r in range(2 * n)]
    if score_end_of_turn:
        spans = [(s, min(e + 1, len(rows[r]))) for r, (s, e) in enumerate(spans)]
    kept: list[tuple[np.ndarray, int, int]] = []  # per row: ids, response start, response end
    n_truncated = 0
    for i in range(n):
        pair_rows = (i, i + n)
        if not truncate:
            for r in pair_rows:
                if len(rows[r]) > max_tokens:
                    kind = "chosen" if r < n else "rejected"
                    raise ValueError(
                        f"pair {pairs[i].id!r} ({kind}): {len(rows[r])} tokens, more than "
                        f"max_tokens={max_tokens}"
                    )
        longer = max(spans[r][1] - spans[r][0] for r in pair_rows)
        # Both rows are cut alike (decided on the longer response) so they keep one context.
        cut = any(spans[r][0] + longer > max_tokens for r in pair_rows)
        n_truncated += cut
        for r in pair_rows:
            ids, (s, e) = rows[r], spans[r]
            if cut:
                keep_prompt = max(max_tokens - longer, min(s, max_tokens // 2))
                keep_resp = min(e - s, max_tokens - keep_prompt)
                ids = np.concatenate([ids[s - keep_prompt : s], ids[s : s + keep_resp]])
                s, e = keep_prompt, keep_prompt + keep_resp
            else:
                ids = ids[:max_tokens]  # at most the unscored suffix goes
            kept.append((ids, s, e))
    # `kept` is in pair order (chosen, rejected, chosen, ...): back to chosen rows then rejected.
    order = [*range(0, 2 * n, 2), *range(1, 2 * n, 2)]
    kept = [kept[k] for k in order]
    longest = max(len(ids) for ids, _, _ in kept)
    if length is None:
        length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    elif length < longest:
        raise ValueError(f"encode_pairs: length={length} is shorter than the longest {longest}")
    tokens = np.zeros((2 * n, length), np.int32)  # [2P, T]
    valid = np.zeros((2 * n, length), bool)  # [2P, T]
    response = np.zeros((2 * n, length), bool)  # [2P, T]
    for r, (ids, s, e) in enumerate(kept):
        tokens[r, : len(ids)] = ids
        valid[r, : len(ids)] = True
        response[r, s:e] = True
    return EncodedPairs(
        ids=tuple(p.id for p in pairs),
        tokens=tokens,
        valid=valid,
        response=response,
        n_truncated=n_truncated,
    )


def _response_span(roles: np.ndarray, pair: PreferencePair, chosen: bool) -> tuple[int, int]:
    """[start, end) of the last run of assistant tokens: the response, not earlier turns."""
    from mup.text import ROLE_ASSISTANT

    kind = "chosen" if chosen else "rejected"
    where = np.flatnonzero(roles == ROLE_ASSISTANT)
    if where.size == 0:
        raise ValueError(f"pair {pair.id!r} ({kind}): the response has no tokens")
    end = int(where[-1]) + 1
    other = np.flatnonzero(roles[:end] != ROLE_ASSISTANT)
    start = int(other[-1]) + 1 if other.size else 0
    if start == 0:
        raise ValueError(f"pair {pair.id!r} ({kind}): the response starts the sequence")
    return start, end
