"""JSON answers from any chat endpoint: the request options that ask for them, stepped down one
at a time as an endpoint refuses them, and parsing that validates every answer with pydantic.

Formats, strongest first (`Negotiator` walks a chain of them):

  json_schema  ``response_format: {"type": "json_schema", ...}``: decoding constrained to the
               schema (OpenAI, vLLM's guided decoding).
  json_object  ``response_format: {"type": "json_object"}``: some JSON object.
  prefix       the answer is started for the model: a final assistant message holding the JSON
               up to its string value (``{"prompt": "``), continued with vLLM's
               ``continue_final_message`` (mup serve has it); the answer is the prefix plus
               the continuation, up to the string's closing quote.
  none         the JSON is asked for in the prompt only.

Whatever the format, every answer is parsed and validated: an endpoint that accepts a format
may still return something else (a server that ignores it, a model cut at max_tokens).

An answer's token probabilities are read here too: `choice_logprobs` takes them out of a chat
choice, `value_token` finds the token where a JSON value is written, whose alternatives the
labeller (a score) and the judge (a rating, a choice of A or B) then weigh.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mup._cli_args import positive_int

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

FORMATS = ("json_schema", "json_object", "prefix", "none")
# What a 400 mentions when it refuses each option (its `param` or its message).
_FORMAT_WORDS = ("response_format", "json_schema", "json_object")
_PREFIX_WORDS = ("continue_final_message", "add_generation_prompt")


class Refused(Exception):
    """The endpoint refused this one request for good (a 400 that no step-down fixes, 413, 422,
    409); the item is rejected, the run goes on. The message is "STATUS: what it said"."""


class Negotiator:
    """The request options in use for one endpoint, shared by the threads of a run: a format
    from `chain` (the first, with ``requested="auto"``; else the one requested, never replaced)
    and the ``top_logprobs`` asked for (0: none). Thread-safe."""

    def __init__(
        self,
        chain: Sequence[str],
        requested: str = "auto",
        *,
        top_logprobs: int = 0,
        error: type[Exception] = RuntimeError,
    ):
        if requested != "auto" and requested not in chain:
            raise ValueError(f"response format {requested!r} is not one of {', '.join(chain)}")
        self.chain = tuple(chain)
        self.auto = requested == "auto"
        self.format = self.chain[0] if self.auto else requested
        self.top = top_logprobs
        self.error = error
        self.notes: list[str] = []
        self._lock = threading.Lock()

    def current(self) -> tuple[str, int]:
        with self._lock:
            return self.format, self.top

    def downgrade(self, error, used: tuple[str, int]) -> bool:
        """Drop what a 400 says the endpoint refuses; False if it names nothing we sent. `used`
        is what the refused request sent: requests in flight together are refused together,
        and only the first of them steps down. Raises `self.error` when the format refused was
        asked for by name."""
        from mup.datagen._endpoint import error_message

        text = f"{getattr(error, 'param', '') or ''} {error_message(error)}".lower()
        with self._lock:
            if (self.format, self.top) != used:
                return True  # another thread already stepped down: just ask again
            words = {"json_schema": _FORMAT_WORDS, "json_object": _FORMAT_WORDS}.get(
                self.format, _PREFIX_WORDS if self.format == "prefix" else ()
            )
            if any(word in text for word in words):
                refused = _describe(self.format)
                if not self.auto:
                    raise self.error(
                        f"the endpoint refuses {refused}: {error_message(error)} "
                        "(try --response-format auto)"
                    )
                following = self.chain[self.chain.index(self.format) + 1 :]
                if following:
                    self.format = following[0]
                    self.note(f"the endpoint refuses {refused}; using {self.format}")
                    return True
            if "logprobs" in text and self.top:
                self.top = 0
                self.note("the endpoint refuses logprobs; scores are parsed only")
                return True
        return False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            logger.warning(text)


def add_answer_args(group, *, max_tokens: int, expected: str, seed_help: str | None = None) -> None:
    """The flags of a structured answer, shared by the labeller and the judge: its length,
    sampling, how many alternatives per token score it (`expected`: what their expectation is,
    for the help) and the response format to ask for."""
    group.add_argument(
        "--max-tokens", type=positive_int, default=max_tokens, help=f"answer length ({max_tokens})"
    )
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument(
        "--top-logprobs",
        type=int,
        default=20,
        choices=range(21),
        metavar="K",
        help=f"alternatives per answer token for {expected} (0: parse only; 20)",
    )
    group.add_argument(
        "--response-format",
        default="auto",
        choices=("auto", "json_schema", "json_object", "none"),
        help="auto: json_schema, falling back to json_object and none when refused",
    )


def _describe(fmt: str) -> str:
    if fmt == "prefix":
        return "the prefix format (continue_final_message)"
    return f"response_format {fmt}"


def request_options(
    fmt: str, schema: dict[str, Any], prefix: str | None = None
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(request kwargs, messages to append) that ask for `fmt`; `schema` is an OpenAI
    ``json_schema`` object ({name, strict, schema}); `prefix` the start of the answer that the
    prefix format continues."""
    if fmt == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": schema}}, []
    if fmt == "json_object":
        return {"response_format": {"type": "json_object"}}, []
    if fmt == "prefix":
        if prefix is None:
            raise ValueError("the prefix format needs a prefix")
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        return {"extra_body": extra}, [{"role": "assistant", "content": prefix}]
    return {}, []


def send(
    endpoint,
    negotiator: Negotiator,
    build: Callable[[str, int], tuple[list[dict[str, str]], dict[str, Any]]],
    *,
    error: type[Exception],
    what: str,
) -> tuple[Any, tuple[str, int]]:
    """One chat completion for the messages and kwargs ``build(format, top_logprobs)`` makes,
    stepping the options down when a 400 refuses them: (response, the (format, top) it used).
    Raises `Refused` for a request refused for good, and `error` (one line naming `what`, the
    item) when the endpoint fails after the client's retries."""
    import openai

    from mup.datagen._endpoint import connection_reason

    for _ in range(len(negotiator.chain) + 2):  # each pass drops one refused option
        used = negotiator.current()
        messages, kwargs = build(*used)
        try:
            return endpoint.chat(messages, **kwargs), used
        except openai.BadRequestError as e:
            if negotiator.downgrade(e, used):
                continue
            raise Refused(f"400: {short_message(e)}") from None
        except (openai.UnprocessableEntityError, openai.ConflictError) as e:
            raise Refused(f"{e.status_code}: {short_message(e)}") from None
        except openai.APIStatusError as e:
            if e.status_code == 413:
                raise Refused(f"413: {short_message(e)}") from None
            raise error(
                f"the endpoint {endpoint.where} answered {e.status_code} for {what}: "
                f"{short_message(e)}"
            ) from None
        except openai.APIConnectionError as e:  # after the client's retries
            raise error(
                f"lost the endpoint {endpoint.where} at {what}: {connection_reason(e)}"
            ) from None
    raise error("the endpoint refused every request format")


def short_message(error) -> str:
    from mup.datagen._endpoint import error_message

    text = error_message(error)
    return text if len(text) <= 300 else text[:280] + "..."


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in error.errors()
    )


def first_valid(text: str, model: type[M]) -> M:
    """The first JSON object in `text` that `model` validates (models wrap JSON in prose and
    code fences); ValueError with a short reason otherwise."""
    decoder = json.JSONDecoder()
    problem = "no JSON object in the answer"
    start = text.find("{")
    tries = 0
    while start >= 0 and tries < 16:
        tries += 1
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            problem = f"invalid JSON: {error.msg} at character {error.pos}"
        except RecursionError:
            problem = "JSON nested too deeply"
        else:
            if isinstance(value, dict):
                try:
                    return model.model_validate(value)
                except ValidationError as error:
                    problem = _problems(error)
        start = text.find("{", start + 1)
    raise ValueError(problem)


def continued(prefix: str, text: str, model: type[M], field: str) -> M:
    """The answer of the prefix format: `prefix` (ending inside the string value of `field`)
    plus `text`, the continuation, read as a JSON string up to its closing quote (what follows
    it is not read: a model told to continue a value may go on with anything). When `text` is
    itself a JSON object the endpoint answered afresh instead of continuing, and it is read
    as a whole answer. ValueError with a short reason when the string is invalid or unclosed, or
    `model` refuses it."""
    if text.lstrip().startswith("{"):
        return first_valid(text, model)
    whole = prefix + text
    try:
        value, _ = json.decoder.scanstring(whole, len(prefix))  # strict: no raw control chars
    except json.JSONDecodeError as error:
        if error.msg.startswith("Unterminated string"):
            raise ValueError(f"the {field!r} string is never closed") from None
        raise ValueError(
            f"invalid JSON string: {error.msg} at character {error.pos - len(prefix)}"
        ) from None
    try:
        return model.model_validate({field: value})
    except ValidationError as error:
        raise ValueError(_problems(error)) from None


def choice_logprobs(choice: Any) -> tuple[list[str], list[list[tuple[str, float]]]] | None:
    """(tokens, alternatives) of an openai chat choice, or None when it carries no logprobs."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    tokens, top = [], []
    for entry in content:
        alternatives = [(t.token, float(t.logprob)) for t in (entry.top_logprobs or [])]
        if all(t != entry.token for t, _ in alternatives):
            alternatives.append((entry.token, float(entry.logprob)))
        tokens.append(entry.token)
        top.append(alternatives)
    return tokens, top


def value_token(
    tokens: Sequence[str], key: re.Pattern[str], fallback: re.Pattern[str]
) -> tuple[int, str, bool]:
    """Where an answer (its token strings) writes a value: (i, prefix, from_key).

    i is the token in which the value starts: where `key` (a pattern that ends just before the
    value, e.g. ``"score":``) ends, else where `fallback` first matches, else the first token.
    prefix is the text of token i before the value (``":`` in a token ``":8``), which each
    alternative at i must also start with; from_key says whether `key` matched.
    """
    text = "".join(tokens)
    starts = [0]
    for token in tokens[:-1]:
        starts.append(starts[-1] + len(token))
    keyed = key.search(text)
    if keyed is not None:
        char = keyed.end()
    else:
        found = fallback.search(text)
        char = found.start() if found else 0
    i = max(bisect.bisect_right(starts, char) - 1, 0)
    return i, text[starts[i] : char], keyed is not None
