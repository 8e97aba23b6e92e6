"""OpenAI request validation and response bodies.

Requests are parsed by hand rather than by a schema library so that every refusal is an
OpenAI-style error naming the offending field (`param`) with a message that says what was
expected; fields the server does not implement are refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from mup.models import Greedy, Sampler, Temperature, TopP
from mup.serve._config import ServeConfig

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_CHOICES = 16
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An OpenAI-style error: HTTP status plus {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """The per-request generation settings shared by the chat and completions routes."""

    multiplier: float
    max_tokens: int
    sampler: Sampler
    seeds: tuple[int, ...]  # one per choice
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {v!r}", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return float(v)


def parse_multiplier(body: dict, config: ServeConfig) -> float:
    """The request's steering multiplier: `steer_multiplier` or `custom.steer_multiplier`."""
    found: list[tuple[str, Any]] = []
    if body.get("steer_multiplier") is not None:
        found.append(("steer_multiplier", body["steer_multiplier"]))
    custom = body.get("custom")
    if custom is not None:
        if not isinstance(custom, dict):
            raise bad(f"'custom' must be an object, got {type(custom).__name__}", "custom")
        if custom.get("steer_multiplier") is not None:
            found.append(("custom.steer_multiplier", custom["steer_multiplier"]))
    for param, v in found:
        if not _is_number(v):
            raise bad(f"'{param}' must be a number, got {v!r}", param)
        if not math.isfinite(v):
            raise bad(f"'{param}' must be finite, got {v!r}", param)
        if abs(v) > config.max_multiplier:
            raise bad(
                f"'{param}' {v} is out of range: |multiplier| must be <= "
                f"{config.max_multiplier} (--max-multiplier)",
                param,
            )
    if len(found) == 2 and float(found[0][1]) != float(found[1][1]):
        raise bad(
            f"steer_multiplier {found[0][1]} and custom.steer_multiplier {found[1][1]} disagree",
            "steer_multiplier",
        )
    return float(found[0][1]) if found else float(config.default_multiplier)


def parse_sampling(body: dict, config: ServeConfig) -> Sampling:
    """Validate the generation fields common to both routes."""
    for name, allowed in (
        ("logprobs", (None, False)),
        ("tools", (None, [])),
        ("echo", (None, False)),
    ):
        if body.get(name) not in allowed:
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"'{name}' is not supported (only 0)", name, "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' is not supported (only 1)", "best_of", "unsupported_parameter")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", "suffix", "unsupported_parameter")

    multiplier = parse_multiplier(body, config)
    max_param = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    max_tokens = body.get(max_param)
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"'{max_param}' must be a positive integer, got {max_tokens!r}", max_param)
    elif max_tokens > config.max_tokens_per_request:
        raise bad(
            f"'{max_param}' {max_tokens} exceeds this server's limit of "
            f"{config.max_tokens_per_request} tokens per request",
            max_param,
            "max_tokens_exceeded",
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if temperature == 0.0 or top_p == 0.0:
        sampler: Sampler = Greedy()
    elif top_p < 1.0:
        sampler = TopP(p=top_p, t=temperature)
    else:
        sampler = Temperature(t=temperature)

    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad(f"'n' must be an integer in 1..{MAX_CHOICES}, got {n!r}", "n")
    seed = body.get("seed")
    if seed is None:
        base = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise bad(f"'seed' must be an integer, got {seed!r}", "seed")
    else:
        base = seed
    # Choice j of a seeded request uses seed + j: the same seed gives the same choices,
    # whatever else shares the batch.
    seeds = tuple((base + j) % (1 << 31) for j in range(n))

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise bad(f"'stop' takes 1..{MAX_STOP_STRINGS} non-empty strings, got {stops!r}", "stop")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return Sampling(
        multiplier=multiplier,
        max_tokens=max_tokens,
        sampler=sampler,
        seeds=seeds,
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as {role, content} strings; `developer` is treated as `system`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object, got {type(m).__name__}", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role must be one of {list(CHAT_ROLES)}, got {role!r}", where)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(
                        f"{where}.content[{j}]: only text parts are supported, got "
                        f"{part.get('type') if isinstance(part, dict) else part!r}",
                        where,
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}].text must be a string", where)
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", where)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt` of /v1/completions: a string, a list of strings, token ids, or lists of ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            return [list(prompt)]
        if all(isinstance(x, str) for x in prompt):
            return list(prompt)
        if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in prompt):
            return [list(x) for x in prompt]
    raise bad(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
        "lists (none empty)",
        "prompt",
    )


def fingerprint(multiplier: float, layer: int) -> str:
    """`system_fingerprint` value: says which steering produced the response."""
    return f"mup-steer-l{layer}-m{multiplier:+g}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
