"""OpenAI request validation: the parsed request (`Sampling`, `Steer`), or an `APIError`.

Requests are parsed by hand rather than by a schema library so that every refusal is an
OpenAI-style error naming the offending field (`param`) with a message that says what was
expected; fields the server does not implement are refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import secrets
import sys
from typing import Any

import numpy as np

from mup.engine import Grammar, GrammarError, json_object_grammar, json_schema_grammar
from mup.serve._config import ServeConfig

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_CHOICES = 16
# A request body's bound: a full 2048-token context of text is ~10 KB; lists of token-id
# prompts and request vectors stay far below this too.
MAX_BODY_BYTES = 32 << 20
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
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers
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


def invalid_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    """The 400 `invalid_request_error` refusing the request field `param`."""
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Steer:
    """The steering a request asked for: a loaded vector by name, its own vector, or none."""

    vector: str | np.ndarray | None  # what the engine gets
    name: str | None  # the loaded vector's name, "custom" for an own vector, None for none
    block: int | None  # the steered block
    multiplier: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """The per-request generation settings shared by the chat and completions routes."""

    steer: Steer
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seeds: tuple[int, ...]  # one per choice
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    probe_token_scores: bool = False
    grammar: Grammar | None = None  # response_format json_object / json_schema

    @property
    def multiplier(self) -> float:
        return self.steer.multiplier


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or one 400: bad UTF-8 or JSON, numbers past Python's
    digit limit, nesting deep enough to exhaust the parser's recursion, and lone UTF-16
    surrogates (``"\\ud800"``: valid JSON, but no tokenizer can encode it) are all refused here,
    before any field is read."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise invalid_request(
            "the request body is nested too deeply", None, "invalid_json"
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise invalid_request(
            f"the request body is not valid JSON: {message}", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object", None, "invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_request(
            "the request body holds a lone UTF-16 surrogate (e.g. \\ud800) in a string: "
            "send valid Unicode text",
            None,
            "invalid_json",
        ) from None
    except (RecursionError, ValueError):
        raise invalid_request(
            "the request body is nested too deeply", None, "invalid_json"
        ) from None
    return body


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    """A JSON number a float can hold: ints of hundreds of digits overflow float()."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def show(v: Any, limit: int = 60) -> str:
    """`repr(v)` cut to `limit` characters: error messages echo what was sent, not all of it."""
    try:
        text = repr(v)
    except ValueError:  # an int past Python's digit limit for str()
        return f"<an integer of more than {sys.get_int_max_str_digits()} digits>"
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not _finite(v):
        raise invalid_request(f"'{name}' must be a finite number, got {show(v)}", name)
    if not lo <= v <= hi:
        raise invalid_request(f"'{name}' must be in [{lo}, {hi}], got {show(v)}", name)
    return float(v)


def _fields(body: dict, name: str) -> list[tuple[str, Any]]:
    """`name` given at the top level and/or inside `custom` (the vLLM-patch form)."""
    found: list[tuple[str, Any]] = []
    if body.get(name) is not None:
        found.append((name, body[name]))
    custom = body.get("custom")
    if custom is not None:
        if not isinstance(custom, dict):
            raise invalid_request(
                f"'custom' must be an object, got {type(custom).__name__}", "custom"
            )
        if custom.get(name) is not None:
            found.append((f"custom.{name}", custom[name]))
    return found


def parse_multiplier(body: dict, config: ServeConfig, default: float | None = None) -> float:
    """The request's steering multiplier: `steer_multiplier` or `custom.steer_multiplier`."""
    found = _fields(body, "steer_multiplier")
    for param, v in found:
        if not _is_number(v):
            raise invalid_request(f"'{param}' must be a number, got {show(v)}", param)
        if not _finite(v):
            raise invalid_request(f"'{param}' must be finite, got {show(v)}", param)
        if abs(v) > config.max_multiplier:
            raise invalid_request(
                f"'{param}' {show(v)} is out of range: |multiplier| must be <= "
                f"{config.max_multiplier} (--max-multiplier)",
                param,
            )
    if len(found) == 2 and float(found[0][1]) != float(found[1][1]):
        raise invalid_request(
            f"steer_multiplier {found[0][1]} and custom.steer_multiplier {found[1][1]} disagree",
            "steer_multiplier",
        )
    if found:
        return float(found[0][1])
    return float(config.default_multiplier if default is None else default)


def parse_steer(body: dict, config: ServeConfig, engine) -> Steer:
    """`steer_vector` (a loaded vector's name, or a list of d_model floats; also in `custom`)
    and `steer_multiplier`. Without `steer_vector` the server's first vector is used (none
    on a plain server)."""
    found = _fields(body, "steer_vector")
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise invalid_request("steer_vector and custom.steer_vector disagree", "steer_vector")
    names = engine.vector_names
    if not found:
        if not names:
            multiplier = parse_multiplier(body, config, default=0.0)
            if multiplier != 0.0:
                raise invalid_request(
                    "this server has no steering vector (started without --vector): send "
                    "steer_vector as a list of floats, or no steer_multiplier",
                    "steer_multiplier",
                )
            return Steer(vector=None, name=None, block=None, multiplier=0.0)
        name = names[0]
        return Steer(
            vector=name,
            name=name,
            block=engine.vector_blocks[name],
            multiplier=parse_multiplier(body, config),
        )
    param, value = found[0]
    if isinstance(value, str):
        if value not in engine.vector_blocks:
            raise invalid_request(
                f"'{param}': unknown steering vector {show(value)}; this server has "
                f"{names or 'none'}",
                param,
                "vector_not_found",
            )
        return Steer(
            vector=value,
            name=value,
            block=engine.vector_blocks[value],
            multiplier=parse_multiplier(body, config),
        )
    if not isinstance(value, list) or not all(_is_number(x) for x in value):
        raise invalid_request(f"'{param}' must be a vector name or a list of numbers", param)
    if engine.custom_block is None:
        raise invalid_request(
            "this server has no steered block for request-supplied vectors (start it with --block)",
            param,
        )
    d = engine.d_model
    if len(value) != d:
        raise invalid_request(
            f"'{param}' has {len(value)} numbers; the model's d_model is {d}", param
        )
    if not all(_finite(x) for x in value):
        raise invalid_request(f"'{param}' must be finite", param)
    vec = np.asarray(value, np.float64)
    if not np.all(np.isfinite(vec)):
        raise invalid_request(f"'{param}' must be finite", param)
    norm = float(np.linalg.norm(vec))
    if norm > config.max_vector_norm:
        raise invalid_request(
            f"'{param}' has norm {norm:.4g} > {config.max_vector_norm:g} (--max-vector-norm)",
            param,
        )
    return Steer(
        vector=vec.astype(np.float32),
        name="custom",
        block=engine.custom_block,
        multiplier=parse_multiplier(body, config, default=1.0),
    )


def _logprob_fields(body: dict, route: str) -> tuple[bool, int, bool]:
    """(logprobs, top_logprobs, echo) of a chat or completions request."""
    echo = body.get("echo")
    if route == "chat":
        if echo not in (None, False):
            raise invalid_request(
                "'echo' is a /v1/completions field", "echo", "unsupported_parameter"
            )
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise invalid_request(f"'logprobs' must be true or false, got {show(lp)}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
                raise invalid_request(
                    f"'top_logprobs' must be an integer in 0..20, got {show(top)}", "top_logprobs"
                )
            if top and not lp:
                raise invalid_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return bool(lp), int(top or 0), False
    if echo is not None and not isinstance(echo, bool):
        raise invalid_request(f"'echo' must be true or false, got {show(echo)}", "echo")
    lp = body.get("logprobs")
    if lp is None:
        return False, 0, bool(echo)
    if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20:
        raise invalid_request(
            f"'logprobs' must be an integer in 0..20 (or null), got {show(lp)}", "logprobs"
        )
    return True, int(lp), bool(echo)


def parse_sampling(body: dict, config: ServeConfig, engine, route: str = "chat") -> Sampling:
    """Validate the generation fields common to both routes."""
    if body.get("tools") not in (None, []):
        raise invalid_request(
            "'tools' is not supported by this server", "tools", "unsupported_parameter"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise invalid_request(
                f"'{name}' is not supported (only 0)", name, "unsupported_parameter"
            )
    if body.get("best_of") not in (None, 1):
        raise invalid_request(
            "'best_of' is not supported (only 1)", "best_of", "unsupported_parameter"
        )
    if body.get("suffix") is not None:
        raise invalid_request("'suffix' is not supported", "suffix", "unsupported_parameter")
    _refuse_guided_fields(body)
    grammar = parse_response_format(body)
    logprobs, top_logprobs, echo = _logprob_fields(body, route)
    pts = body.get("probe_token_scores", False)
    if not isinstance(pts, bool):
        raise invalid_request(
            f"'probe_token_scores' must be true or false, got {show(pts)}", "probe_token_scores"
        )
    if pts and engine.probe is None:
        raise invalid_request(
            "'probe_token_scores' needs a server started with --probe", "probe_token_scores"
        )

    steer = parse_steer(body, config, engine)
    max_param = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    max_tokens = body.get(max_param)
    least = 0 if echo else 1  # vLLM: echo with max_tokens 0 scores the prompt only
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < least:
        what = "a non-negative integer (0 only with echo)" if route != "chat" else ""
        raise invalid_request(
            f"'{max_param}' must be {what or 'a positive integer'}, got {show(max_tokens)}",
            max_param,
        )
    elif max_tokens > config.max_tokens_per_request:
        raise invalid_request(
            f"'{max_param}' {show(max_tokens)} exceeds this server's limit of "
            f"{config.max_tokens_per_request} tokens per request",
            max_param,
            "max_tokens_exceeded",
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0

    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise invalid_request(f"'n' must be an integer in 1..{MAX_CHOICES}, got {show(n)}", "n")
    seed = body.get("seed")
    if seed is None:
        base = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid_request(f"'seed' must be an integer, got {show(seed)}", "seed")
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
        raise invalid_request(
            f"'stop' must be a string or a list of strings, got {show(stop)}", "stop"
        )
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise invalid_request(
            f"'stop' takes 1..{MAX_STOP_STRINGS} non-empty strings, got {show(stops)}", "stop"
        )

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request(f"'stream' must be true or false, got {show(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid_request("'stream_options' must be an object", "stream_options")
    return Sampling(
        steer=steer,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seeds=seeds,
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
        probe_token_scores=pts,
        grammar=grammar,
    )


# What `response_format` may ask for: free text, any JSON object, or JSON that a schema
# validates. Both JSON modes constrain decoding (llguidance masks in the engine), so what comes
# back parses, unless max_tokens or a stop string cuts it (finish_reason says which).
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# vLLM's own request fields for constrained decoding: refused with a pointer to response_format
# rather than ignored, which would hand a client free text it believes constrained.
GUIDED_FIELDS = (
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs",
)  # fmt: skip
# Schemas are compiled once: clients such as `mup data` send one schema with every request.
_SCHEMA_CACHE = 256


def _refuse_guided_fields(body: dict) -> None:
    for name in GUIDED_FIELDS:
        if body.get(name) is not None:
            raise invalid_request(
                f"'{name}' is not supported; constrain the output with 'response_format' "
                "({'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}} or "
                "{'type': 'json_object'})",
                name,
                "unsupported_parameter",
            )


def parse_response_format(body: dict) -> Grammar | None:
    """The grammar that `response_format` asks for (None: free text), compiled before any model
    work; a schema llguidance cannot compile is a 400 naming
    ``response_format.json_schema.schema`` and saying why."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise invalid_request(
            f"'response_format' must be an object whose 'type' is one of "
            f"{list(RESPONSE_FORMATS)}, got {show(fmt)}",
            "response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_object()
    spec = fmt.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid_request(
            f"'{where}' must be an object {{'name': ..., 'schema': {{...}}, 'strict': ...}}, "
            f"got {show(spec)}",
            where,
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request(
            f"'{where}.name' must be a non-empty string, got {show(name)}", f"{where}.name"
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(
            f"'{where}.strict' must be true, false or null, got {show(strict)}", f"{where}.strict"
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid_request(
            f"'{where}.schema' must be a JSON Schema object, got {show(schema)} (for any JSON "
            "object use {'type': 'json_object'})",
            f"{where}.schema",
        )
    try:
        return _json_schema(json.dumps(schema))
    except GrammarError as e:
        raise invalid_request(
            f"'{where}.schema' cannot constrain decoding: {e}", f"{where}.schema"
        ) from None


@functools.cache
def _json_object() -> Grammar:
    return json_object_grammar()


@functools.lru_cache(maxsize=_SCHEMA_CACHE)
def _json_schema(text: str) -> Grammar:  # keyed by the schema's JSON: key order is meaningful
    return json_schema_grammar(json.loads(text))


def parse_continuation(body: dict, messages: list[dict[str, str]]) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message) of a chat request, as vLLM's fields:
    with continue_final_message the last message (the assistant's) is left open and the model
    continues it, so a client can start the answer (a JSON prefix) and get the rest."""
    cont = body.get("continue_final_message", False)
    if cont is None:
        cont = False
    if not isinstance(cont, bool):
        raise invalid_request(
            f"'continue_final_message' must be true or false, got {show(cont)}",
            "continue_final_message",
        )
    add = body.get("add_generation_prompt")
    if add is None:
        add = not cont
    if not isinstance(add, bool):
        raise invalid_request(
            f"'add_generation_prompt' must be true or false, got {show(add)}",
            "add_generation_prompt",
        )
    if cont and add:
        raise invalid_request(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            "continue_final_message",
        )
    if cont and messages[-1]["role"] != "assistant":
        raise invalid_request(
            "'continue_final_message' needs the last message to be the assistant's, got "
            f"{show(messages[-1]['role'])}",
            "continue_final_message",
        )
    return add, cont


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as {role, content} strings; `developer` is treated as `system`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request(
            "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid_request(f"{where} must be an object, got {type(m).__name__}", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid_request(
                f"{where}.role must be one of {list(CHAT_ROLES)}, got {show(role)}", where
            )
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise invalid_request(
                        f"{where}.content[{j}]: only text parts are supported, got "
                        f"{show(part.get('type') if isinstance(part, dict) else part)}",
                        where,
                    )
                if not isinstance(part.get("text"), str):
                    raise invalid_request(f"{where}.content[{j}].text must be a string", where)
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid_request(
                f"{where}.content must be a string or a list of text parts", where
            )
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
    raise invalid_request(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
        "lists (none empty)",
        "prompt",
    )


def fingerprint(steer: Steer) -> str:
    """`system_fingerprint` value: says which steering produced the response (its "l" is the
    steered block, the letter kept from before the rename so that fingerprints stay stable)."""
    if steer.vector is None:
        return "mup-plain"
    return f"mup-steer-l{steer.block}-m{steer.multiplier:+g}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
