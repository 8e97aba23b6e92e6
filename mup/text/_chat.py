"""Chat conversations -> ragged token ids with a role code per token.

Axis letters: N conversations (records), T tokens of all conversations together, M messages
of one conversation. Conversation i owns tokens ``offsets[i]:offsets[i + 1]``.

How roles are found: the conversation is rendered twice with the tokenizer's chat template,
once as is and once with every message content replaced by a unique placeholder. The second
rendering splits into the template's own text around each message, so the character span of
every message content in the first rendering is known exactly (a naive text search would
match a content such as "user" inside the role header). The text is then tokenized with
character offsets; a token gets the role of a message when all its characters lie inside that
message's content span, and role 0 (template) otherwise, including tokens that straddle a
content boundary. Text that the template inserts in place of a missing system message (the
SmolLM2 default system prompt) counts as system.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from mup.data import Message, Record

ROLE_TEMPLATE, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL = 0, 1, 2, 3, 4
ROLE_CODES: Mapping[str, int] = {
    "system": ROLE_SYSTEM,
    "user": ROLE_USER,
    "assistant": ROLE_ASSISTANT,
    "tool": ROLE_TOOL,
}
ROLE_NAMES: tuple[str, ...] = ("template", "system", "user", "assistant", "tool")

# Conversations rendered and tokenized per call of the fast tokenizer: large enough that the
# Rust tokenizer parallelises, small enough that the offset lists stay a few MB.
_CHUNK = 256
# Private-use code points: they never occur in the data sets and survive `| trim` in templates.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

Conversation = str | Record | Sequence[Message] | Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Encoded:
    """Ragged token ids of N conversations plus a role code per token."""

    input_ids: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int64 [N+1]
    roles: np.ndarray  # uint8 [T], codes ROLE_TEMPLATE ... ROLE_TOOL
    n_truncated: int  # how many conversations lost tokens to `max_tokens`
    lengths_before_truncation: np.ndarray  # int64 [N]
    ids: tuple[str, ...] | None  # record ids, when records were encoded

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: tokens kept per conversation."""
        return np.diff(self.offsets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and roles of conversation `i`."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.roles[start:end]


def encode_chats(
    tokenizer: PreTrainedTokenizerBase,
    records_or_message_lists: Sequence[Conversation],
    *,
    max_tokens: int | None = None,
    truncate: Literal["left", "right"] = "left",
) -> Encoded:
    """Apply the chat template (no generation prompt), tokenize, and assign a role per token.

    Each item is a `Record`, a sequence of `Message`s or ``{"role", "content"}`` dicts, or plain
    text (one user message). Conversations longer than `max_tokens` are truncated:
    ``truncate="left"`` drops tokens at the start and keeps the END of the conversation (the
    default: the last turn matters most for what the model is doing now), ``"right"`` keeps the
    start. `Encoded.n_truncated` counts the truncated conversations.
    The token ids equal ``tokenizer.apply_chat_template(messages, tokenize=True)`` (checked on
    the first conversation of every call).
    """
    if truncate not in ("left", "right"):
        raise ValueError(f"truncate must be 'left' or 'right', got {truncate!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    if not tokenizer.is_fast:
        raise ValueError("encode_chats needs a fast tokenizer (for character offsets)")
    items = list(records_or_message_lists)
    conversations = [_as_conversation(item, i) for i, item in enumerate(items)]
    all_records = bool(items) and all(isinstance(item, Record) for item in items)
    default_system = _default_system_prompt(tokenizer)

    ids_parts: list[np.ndarray] = []
    role_parts: list[np.ndarray] = []
    lengths_before = np.zeros(len(conversations), dtype=np.int64)  # [N]
    for chunk_start in range(0, len(conversations), _CHUNK):
        chunk = conversations[chunk_start : chunk_start + _CHUNK]
        texts, spans = _render_with_spans(tokenizer, chunk, chunk_start, items, default_system)
        encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for j, (token_ids, char_offsets) in enumerate(
            zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
        ):
            token_ids = np.asarray(token_ids, dtype=np.int32)  # [t]
            roles = _roles_from_spans(np.asarray(char_offsets, np.int64).reshape(-1, 2), spans[j])
            lengths_before[chunk_start + j] = len(token_ids)
            if max_tokens is not None and len(token_ids) > max_tokens:
                keep = slice(-max_tokens, None) if truncate == "left" else slice(0, max_tokens)
                token_ids, roles = token_ids[keep], roles[keep]
            ids_parts.append(token_ids)
            role_parts.append(roles)
        if chunk_start == 0 and chunk:
            _check_against_template(tokenizer, chunk[0], encoding["input_ids"][0], items[0])

    lengths = np.array([len(part) for part in ids_parts], dtype=np.int64)  # [N]
    offsets = np.zeros(len(conversations) + 1, dtype=np.int64)  # [N+1]
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        input_ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        offsets=offsets,
        roles=np.concatenate(role_parts) if role_parts else np.zeros(0, np.uint8),
        n_truncated=int(np.count_nonzero(lengths < lengths_before)),
        lengths_before_truncation=lengths_before,
        ids=tuple(item.id for item in items) if all_records else None,
    )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    message_lists: Sequence[Conversation],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[list[int]]:
    """Token ids of each conversation rendered for generation (no roles, no truncation).
    With `continue_final_message` the last message is left open (no end-of-turn after it), so
    that generation continues it; `add_generation_prompt` must then be False."""
    conversations = [_as_conversation(item, i) for i, item in enumerate(message_lists)]
    out: list[list[int]] = []
    for start in range(0, len(conversations), _CHUNK):
        chunk = conversations[start : start + _CHUNK]
        texts = _render(
            tokenizer,
            chunk,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        out.extend(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return out


def _as_conversation(item: Any, index: int) -> list[dict[str, str]]:
    where = f"conversation {index}"
    if isinstance(item, Record):
        messages: Sequence[Any] = item.messages
        where = f"record {item.id!r} ({item.source})"
    elif isinstance(item, str):
        return [{"role": "user", "content": item}]
    elif isinstance(item, Sequence):
        messages = item
    else:
        raise TypeError(
            f"{where}: expected a Record, text, or a list of messages, got {type(item).__name__}"
        )
    if not messages:
        raise ValueError(f"{where}: no messages")
    out = []
    for m, message in enumerate(messages):
        if isinstance(message, Message):
            role, content = message.role, message.content
        elif isinstance(message, Mapping) and "role" in message and "content" in message:
            role, content = message["role"], message["content"]
        else:
            raise TypeError(f"{where}, message {m}: expected a Message or {{role, content}} dict")
        if role not in ROLE_CODES:
            raise ValueError(f"{where}, message {m}: unknown role {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"{where}, message {m}: content must be a string")
        if _OPEN in content or _CLOSE in content:
            raise ValueError(f"{where}, message {m}: content holds reserved characters U+E000/1")
        out.append({"role": role, "content": content})
    return out


def _render(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
) -> list[str]:
    # One call for the whole chunk: most of apply_chat_template's cost is per call.
    extra = {"continue_final_message": True} if continue_final_message else {}
    texts = tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    return [texts] if isinstance(texts, str) else list(texts)


def _render_or_explain(
    tokenizer: PreTrainedTokenizerBase,
    chunk: list[list[dict[str, str]]],
    chunk_start: int,
    items: Sequence[Any],
) -> list[str]:
    """Render a chunk; if the template raises, name the conversation it refused."""
    try:
        return _render(tokenizer, chunk, add_generation_prompt=False)
    except Exception as chunk_error:  # noqa: BLE001 - jinja's errors carry no row
        for j, conversation in enumerate(chunk):
            try:
                _render(tokenizer, [conversation], add_generation_prompt=False)
            except Exception as error:  # noqa: BLE001
                where = _describe(items[chunk_start + j], chunk_start + j)
                roles = [m["role"] for m in conversation]
                raise ValueError(
                    f"{where}: the chat template refused this conversation (roles {roles}): {error}"
                ) from error
        raise chunk_error


def _default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """(text before it, the prompt) that the template inserts when no system message is given.

    Found by rendering one user placeholder with and without a system placeholder: the text
    that the system message replaces is the default prompt. None when there is none, or when
    the template refuses system messages.
    """
    user, system = f"{_OPEN}1{_CLOSE}", f"{_OPEN}0{_CLOSE}"
    try:
        without, with_system = _render(
            tokenizer,
            [
                [{"role": "user", "content": user}],
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
            ],
            add_generation_prompt=False,
        )
    except Exception:  # noqa: BLE001 - jinja raises plain exceptions for unsupported roles
        return None
    before_user = without.split(user)[0]
    if system not in with_system:
        return None
    before_system, _, rest = with_system.partition(system)
    between = rest.split(user)[0]
    n_default = len(before_user) - len(before_system) - len(between)
    if n_default <= 0 or not before_user.startswith(before_system):
        return None
    if not before_user.endswith(between):
        return None
    return before_system, before_user[len(before_system) : len(before_system) + n_default]


def _render_with_spans(
    tokenizer: PreTrainedTokenizerBase,
    chunk: list[list[dict[str, str]]],
    chunk_start: int,
    items: Sequence[Any],
    default_system: tuple[str, str] | None,
) -> tuple[list[str], list[np.ndarray]]:
    """Rendered texts and, per text, int64 [S, 3] (start, end, role) content spans."""
    masked = [
        [{"role": m["role"], "content": f"{_OPEN}{k}{_CLOSE}"} for k, m in enumerate(conv)]
        for conv in chunk
    ]
    texts = _render_or_explain(tokenizer, chunk, chunk_start, items)
    skeletons = _render(tokenizer, masked, add_generation_prompt=False)
    spans = []
    for j, (conv, text, skeleton) in enumerate(zip(chunk, texts, skeletons, strict=True)):
        where = _describe(items[chunk_start + j], chunk_start + j)
        pieces = _PLACEHOLDER.split(skeleton)
        order = [int(k) for k in pieces[1::2]]
        if order != list(range(len(conv))):
            raise ValueError(
                f"{where}: the chat template does not render each message once and in order "
                f"(message order {order}); roles cannot be assigned"
            )
        templates = pieces[0::2]  # [M+1] template text around the contents
        for strip in (False, True):
            contents = [m["content"].strip() if strip else m["content"] for m in conv]
            if "".join(_interleave(templates, contents)) == text:
                break
        else:
            raise ValueError(
                f"{where}: the chat template changes message contents beyond stripping "
                "whitespace; roles cannot be assigned"
            )
        rows = []
        if default_system is not None and all(m["role"] != "system" for m in conv):
            prefix, prompt = default_system
            if templates[0].startswith(prefix + prompt):
                rows.append((len(prefix), len(prefix) + len(prompt), ROLE_SYSTEM))
        position = 0
        for template, content, message in zip(templates, contents, conv, strict=False):
            position += len(template)
            rows.append((position, position + len(content), ROLE_CODES[message["role"]]))
            position += len(content)
        spans.append(np.array(rows, dtype=np.int64).reshape(-1, 3))
    return texts, spans


def _interleave(templates: list[str], contents: list[str]) -> list[str]:
    out = [templates[0]]
    for content, template in zip(contents, templates[1:], strict=True):
        out += [content, template]
    return out


def _roles_from_spans(char_offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """uint8 [t] role per token from int64 [t, 2] character offsets and [S, 3] spans."""
    starts, ends = char_offsets[:, 0], char_offsets[:, 1]  # [t]
    # Spans are sorted and disjoint: the only candidate is the last span starting at or before
    # the token's first character.
    k = np.searchsorted(spans[:, 0], starts, side="right") - 1  # [t]
    candidate = spans[np.clip(k, 0, None)]  # [t, 3]
    inside = (k >= 0) & (ends > starts) & (ends <= candidate[:, 1])
    return np.where(inside, candidate[:, 2], ROLE_TEMPLATE).astype(np.uint8)


def _check_against_template(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]], ids: list[int], item
) -> None:
    reference = tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=False
    )
    if isinstance(reference, Mapping):  # transformers >= 5 returns a BatchEncoding
        reference = reference["input_ids"]
    if list(reference) != list(ids):
        raise RuntimeError(
            f"{_describe(item, 0)}: token ids differ from apply_chat_template(tokenize=True); "
            "the tokenizer adds or merges tokens around the rendered template"
        )


def _describe(item: Any, index: int) -> str:
    if isinstance(item, Record):
        return f"record {item.id!r} ({item.source})"
    return f"conversation {index}"
