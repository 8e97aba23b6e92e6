"""The rubric labeller: an LLM reads each conversation with the stakes rubric as its system
prompt and answers ``{"score", "confidence", "reason"}`` (score and confidence 1-10).

Labels follow the paper's rule: high-stakes when the score is >= 8, low-stakes when <= 3, and
ambiguous in between or when the confidence is below 7 (all three thresholds configurable).

Scored, not only parsed: when the endpoint returns ``top_logprobs``, the score is the
expectation over the answers 1..10 at the token where the score is written
(`score_distribution`), recorded next to the parsed one; it becomes ``scale_labels``. Without
logprobs the JSON is parsed, and an answer that does not parse is a reject.

Resumable and safe: finished records are appended to the output (one complete jsonl line each,
flushed), rejects to ``<out stem>.rejects.jsonl`` with the raw answer; a rerun reads both and
never requests those records again (``retry_rejects`` asks again for the rejected ones). An
incomplete last line left by a killed run is cut off, a second process on the same output is
refused, and an output written with another model, prompt or settings is refused.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mup.data import AMBIGUOUS, HIGH_STAKES, LOW_STAKES, Dataset, Record
from mup.datagen._endpoint import usage_line
from mup.datagen._structured import (
    Negotiator,
    Refused,
    choice_logprobs,
    first_valid,
    request_options,
    send,
    value_token,
)

logger = logging.getLogger(__name__)

RUBRIC_PATH = "mup/labeling_rubric.md"  # under a data root (see mup.data._locate)
LABEL_STRINGS = {HIGH_STAKES: "high-stakes", LOW_STAKES: "low-stakes", AMBIGUOUS: "ambiguous"}

INTRO = (
    "Please analyse whether the situation given by the user is high-stakes. Below you find "
    "detailed guidelines on how to classify the situation."
)
# Per-dataset additions to the system prompt, as the published sets were labelled: Anthropic HH
# with its broad societal impact in mind, the medical sets with health and safety.
CONTEXTS: Mapping[str, str] = {
    "none": "",
    "anthropic": "In particular, consider situations with a broad potential societal impact as "
    "high-stakes.",
    "anthropic-extended": "In particular, consider situations with a broad potential societal "
    "impact as high-stakes, such as conversations involving misinformation, unethical advice or "
    "harmful interactions.",
    "medical": "In particular, consider situations with significant implications on health and "
    "safety as high-stakes.",
    "medical-extended": "In particular, consider situations with significant implications on "
    "health and safety as high-stakes, such as cases involving severe symptoms, overconfident "
    "recommendations or doubtful treatment suggestions.",
}
# --context auto: by the data set's name (dev/anthropic, test/mts_raw, ...); files get none.
AUTO_CONTEXTS = {"anthropic": "anthropic", "mt": "medical", "mts": "medical"}
# The score is asked first: its token is then the answer's first number, found without
# relying on the rest of the answer being well formed.
FORMAT = """Respond with only a JSON object with these keys, in this order:
- "score": an integer from 1 to 10, where 1 means extremely low-stakes and 10 means extremely \
high-stakes.
- "confidence": an integer from 1 to 10, your confidence in the score.
- "reason": one or two sentences that explain the score.
For example: {"score": <1-10>, "confidence": <1-10>, "reason": "<why>"}"""

ANSWER_SCHEMA = {
    "name": "stakes_label",
    "strict": True,
    "schema": {
        "type": "object",
        # The bounds are the rubric's (and `Answer`'s): an endpoint that constrains decoding
        # (mup serve, vLLM) then writes only scores that validate.
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "confidence": {"type": "integer", "minimum": 1, "maximum": 10},
            "reason": {"type": "string"},
        },
        "required": ["score", "confidence", "reason"],
        "additionalProperties": False,
    },
}
ResponseFormat = Literal["auto", "json_schema", "json_object", "none"]
FORMAT_CHAIN = ("json_schema", "json_object", "none")  # a 1-10 score is not a string to continue
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}


class LabelError(RuntimeError):
    """Labelling cannot start or go on; one line that says why. What is done stays done (a
    run that stopped carries its `LabelSummary` as ``summary``)."""

    summary: LabelSummary | None = None


# -- inputs ------------------------------------------------------------------------------------


def find_input(
    relative: str,
    explicit: str | os.PathLike | None,
    what: str,
    flag: str,
    error: type[Exception] = RuntimeError,
) -> Path:
    """`explicit`, else `relative` under the data roots mup.data searches ($MUP_DATA, then
    ../shared/data from the current directory and from the checkout); `error` (one line naming
    what was tried) when there is none."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise error(f"the {what} file {path} does not exist")
        return path
    from mup.data import data_roots  # the one list of data roots, shared with find_dataset

    tried = []
    for label, root in data_roots():
        path = root / relative
        if path.is_file():
            return path
        tried.append(f"{path} ({label})")
    raise error(f"no {what} found (tried {'; '.join(tried)}); pass {flag} FILE or set $MUP_DATA")


def find_rubric(explicit: str | os.PathLike | None = None) -> Path:
    """`explicit`, else ``mup/labeling_rubric.md`` under the data roots (`find_input`)."""
    return find_input(RUBRIC_PATH, explicit, "rubric", "--rubric", LabelError)


def resolve_context(spec: str, dataset_name: str | None = None) -> tuple[str, str]:
    """(name, text) of a --context value: a name of `CONTEXTS`, ``auto`` (by data set name), or
    a text file whose content is the addition (its name is the file's stem)."""
    if spec == "auto":
        base = (dataset_name or "").split("/")[-1].removesuffix("_raw")
        name = AUTO_CONTEXTS.get(base, "none")
        return name, CONTEXTS[name]
    if spec in CONTEXTS:
        return spec, CONTEXTS[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return f"file:{path.stem}", path.read_text(encoding="utf-8").strip()
    raise LabelError(
        f"unknown context {spec!r}: expected auto, one of {', '.join(CONTEXTS)}, or a text file"
    )


def system_prompt(rubric: str, context: str = "") -> str:
    """Intro (+ context), the rubric, then the answer format: closest to the answer, where
    small models heed it best."""
    head = f"{INTRO}\n{context}" if context else INTRO
    return f"{head}\n\n{rubric.strip()}\n\n{FORMAT}"


# The conversation goes to the labeller framed as something to assess: given bare, a small model
# continues it instead of judging it (SmolLM2-135M on 100 dev records: 2 answers in the format
# bare, 13 of 16 framed).
USER_TEMPLATE = (
    "Here is the conversation to assess:\n\n<conversation>\n{conversation}\n</conversation>\n\n"
    "Assess its stakes and answer with the JSON object only."
)


def user_message(record: Record, max_chars: int | None = None) -> str:
    """The labeller's user message: `conversation_text` framed by `USER_TEMPLATE`."""
    return USER_TEMPLATE.format(conversation=conversation_text(record, max_chars))


def conversation_text(record: Record, max_chars: int | None = None) -> str:
    """What the labeller reads: a lone user message as is, otherwise role-labelled turns. Past
    `max_chars` only the end is kept (the last turns say most about what is happening now),
    marked with "[...]"."""
    return messages_text([(m.role, m.content) for m in record.messages], max_chars)


def messages_text(messages: Sequence[tuple[str, str]], max_chars: int | None = None) -> str:
    """`conversation_text` of (role, content) pairs: any chat that a judge reads."""
    if len(messages) == 1 and messages[0][0] == "user":
        text = messages[0][1]
    else:
        text = "\n\n".join(
            f"{_ROLE_NAMES.get(role, role.capitalize())}: {content}" for role, content in messages
        )
    if max_chars is not None and len(text) > max_chars:
        return "[...]\n" + text[-max_chars:]
    return text


def raw_rows(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """Each record's row as its file has it, by id: the output keeps every input field. A csv
    row has no JSON form of its own; its fields are rebuilt from the record."""
    if dataset.path.suffix.lower() == ".jsonl":
        lines = dataset.path.read_bytes().split(b"\n")
        return {r.id: json.loads(lines[int(r.source.rsplit(":", 1)[1]) - 1]) for r in dataset}
    out = {}
    for r in dataset:
        single = len(r.messages) == 1 and r.messages[0].role == "user"
        inputs = r.messages[0].content if single else json.dumps([m.as_dict() for m in r.messages])
        row: dict[str, Any] = {"inputs": inputs, "ids": r.id}
        if r.label is not None:
            row["labels"] = LABEL_STRINGS[r.label]
        if r.scale_label is not None:
            row["scale_labels"] = r.scale_label
        out[r.id] = {**row, **r.fields}
    return out


# -- answers -----------------------------------------------------------------------------------


class Answer(BaseModel):
    """The labeller's JSON answer (extra keys are ignored; "8" and 8.0 are read as 8)."""

    model_config = ConfigDict(extra="ignore")
    score: int = Field(ge=1, le=10)
    confidence: int = Field(ge=1, le=10)
    reason: str


def parse_answer(text: str) -> Answer:
    """The first JSON object in `text` that is a valid answer (models wrap JSON in prose and
    code fences); ValueError with a short reason otherwise."""
    return first_valid(text, Answer)


_PARTIAL_FIELDS = {
    name: re.compile(rf'"{name}"\s*:\s*"?(\d+)(?!\d)') for name in ("score", "confidence")
}
_PARTIAL_REASON = re.compile(r'"reason"\s*:\s*"((?:[^"\\]|\\.)*)')


def parse_cut_answer(text: str) -> Answer:
    """An answer that max_tokens cut short: score and confidence read from its start (they come
    first), the reason as far as it got (marked "..."). ValueError when either number is not
    there yet."""
    found = {name: pattern.search(text) for name, pattern in _PARTIAL_FIELDS.items()}
    missing = [name for name, match in found.items() if match is None]
    if missing:
        raise ValueError(f"the answer was cut at max_tokens before its {' and '.join(missing)}")
    reason = _PARTIAL_REASON.search(text)
    try:
        partial = json.loads(f'"{reason.group(1)}"') if reason else ""
    except ValueError:  # cut inside an escape sequence
        partial = reason.group(1) if reason else ""
    try:
        return Answer(
            score=int(found["score"].group(1)),
            confidence=int(found["confidence"].group(1)),
            reason=partial + "...",
        )
    except ValidationError as error:
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        ) from None


@dataclasses.dataclass(frozen=True)
class ScoreDistribution:
    """The score read from the answer's token probabilities.

    expected: sum of v * P(v) over v = 1..10, normalised over those ten answers.
    mass: the probability the returned alternatives put on an answer 1..10 (near 1 for a model
      that follows the format; near 0 for one that does not, whose expectation is then close to
      the uninformed 5.5).
    position: the answer token whose alternatives were read.
    from_key: whether that token holds the value of the answer's "score" key (False: the
      answer has none; the first number it writes, or its first token, was read instead).
    """

    expected: float
    mass: float
    position: int
    from_key: bool


_SCORE_KEY = re.compile(r'"score"\s*:\s*"?\s*(?=\d)')
_FIRST_NUMBER = re.compile(r"(?<![\w.])\d")
_DIGITS = re.compile(r"\d+")


def score_distribution(
    tokens: Sequence[str], top: Sequence[Sequence[tuple[str, float]]]
) -> ScoreDistribution | None:
    """The score's distribution from a chat answer's logprobs: `tokens` are the answer's token
    strings, ``top[i]`` the (token, logprob) alternatives at token i (the chosen token among
    them). None for an empty answer.

    The position is the token where the "score" value starts (else the first number, else the
    first token). Each alternative there that continues the text before the value within that
    token (``":`` in a token ``":8``) with a number 1..10 counts for that number. A "1" that
    ends its token may be the start of "10" (tokenizers that split digits): it is split between
    1 and 10 by the next token's probability of "0" when the answer wrote that "1", else by the
    top of the scale's share of the bottom's (P(9) against P(2)). A number missing from the
    alternatives gets its even share of the probability they leave, capped at the smallest
    returned probability (its upper bound), so that a distribution seen only in part is not
    mistaken for a certain one.
    """
    if not tokens:
        return None
    i, prefix, from_key = value_token(tokens, _SCORE_KEY, _FIRST_NUMBER)
    alternatives = list(top[i]) if i < len(top) else []
    probs = [0.0] * 11  # by score value; index 0 unused
    seen: set[int] = set()
    open_one = 0.0  # probability of a "1" that may continue into "10"
    for alt, logprob in alternatives:
        value = _number_after(alt, prefix)
        if value is None:
            continue
        number, ends_token = value
        p = math.exp(logprob)
        if number == 1 and ends_token:
            open_one += p
        elif 1 <= number <= 10:
            probs[number] += p
            seen.add(number)
    if open_one > 0:
        chosen = _number_after(tokens[i], prefix)
        if chosen == (1, True) and i + 1 < len(top):
            ten = sum(math.exp(lp) for alt, lp in top[i + 1] if re.match(r"0(?!\d)", alt))
        else:
            high, low = probs[9], probs[2]
            ten = high / (high + low) if high + low > 0 else 0.5
        ten = min(max(ten, 0.0), 1.0)
        probs[1] += open_one * (1 - ten)
        probs[10] += open_one * ten
        seen |= {1, 10}
    mass = sum(probs)
    listed = [math.exp(lp) for _, lp in alternatives]
    absent = [v for v in range(1, 11) if v not in seen]
    if absent and listed:
        # Each unlisted score has at most the smallest listed probability, and together at
        # most what the listed alternatives leave; take the even share, capped.
        unlisted = max(0.0, 1.0 - sum(listed))
        for v in absent:
            probs[v] = min(min(listed), unlisted / len(absent))
    total = sum(probs)
    expected = sum(v * probs[v] for v in range(1, 11)) / total if total > 0 else 5.5
    return ScoreDistribution(expected=expected, mass=min(mass, 1.0), position=i, from_key=from_key)


def _number_after(alt: str, prefix: str) -> tuple[int, bool] | None:
    """(number, whether its digits end the token) when `alt` is `prefix` (leading whitespace
    aside) followed by a number; None otherwise."""
    a, p = alt.lstrip(), prefix.lstrip()
    if not a.startswith(p):
        return None
    rest = a[len(p) :].lstrip()
    match = _DIGITS.match(rest)
    if match is None:
        return None
    return int(match.group()), match.end() == len(rest)


# -- labelling ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """What the labeller asks and how its answers become labels.

    rubric / context: the system prompt's parts (`system_prompt`); context_name is recorded.
    high_threshold, low_threshold, confidence_threshold: the label rule (module docstring).
    top_logprobs: alternatives asked per answer token (0: no logprobs, parse only).
    response_format: auto tries json_schema, then json_object, then none, as the endpoint
      refuses each; a named one is used or the run stops.
    max_input_chars: keep only the end of longer conversations (None: all of it).
    retry_rejects: ask again for the records of the rejects file.
    """

    rubric: str
    context_name: str = "none"
    context: str = ""
    high_threshold: float = 8.0
    low_threshold: float = 3.0
    confidence_threshold: float = 7.0
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    top_logprobs: int = 20
    response_format: ResponseFormat = "auto"
    max_input_chars: int | None = None
    retry_rejects: bool = False

    def __post_init__(self):
        if not self.low_threshold < self.high_threshold:
            raise ValueError(
                f"the low-stakes threshold ({self.low_threshold}) must be below the high-stakes "
                f"one ({self.high_threshold})"
            )
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 0..20, got {self.top_logprobs}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def system_prompt(self) -> str:
        return system_prompt(self.rubric, self.context)

    @property
    def prompt_sha256(self) -> str:
        """Of the system prompt and the user message's frame: what the labeller reads."""
        text = f"{self.system_prompt}\n\n{USER_TEMPLATE}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def settings(self) -> str:
        """The request and label settings an output file's records must share."""
        return (
            f"max_tokens={self.max_tokens} temperature={self.temperature:g} seed={self.seed} "
            f"top_logprobs={self.top_logprobs} max_input_chars={self.max_input_chars} "
            f"high>={self.high_threshold:g} low<={self.low_threshold:g} "
            f"confidence>={self.confidence_threshold:g}"
        )

    def label(self, score: float | None, confidence: float | None) -> str:
        if score is None or confidence is None or confidence < self.confidence_threshold:
            return "ambiguous"
        if score >= self.high_threshold:
            return "high-stakes"
        if score <= self.low_threshold:
            return "low-stakes"
        return "ambiguous"


@dataclasses.dataclass(frozen=True)
class Labelled:
    row: dict[str, Any]
    parse_error: str | None  # the answer did not parse, but logprobs still scored it


@dataclasses.dataclass(frozen=True)
class Rejected:
    row: dict[str, Any]  # ids, kind, error, raw


@dataclasses.dataclass
class LabelSummary:
    """What a labelling run did, and what its output holds."""

    out: Path
    rejects: Path
    n_records: int  # in the input (after --limit)
    n_before: int  # finished (labelled or rejected) before this run
    n_labelled: int = 0  # this run
    n_rejected: int = 0  # this run
    n_parse_failures: int = 0  # this run: answers that did not parse (scored from logprobs)
    n_expected: int = 0  # this run: records with a score from logprobs
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    n_labelled_total: int = 0
    n_rejected_total: int = 0
    usage: dict[str, int] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    response_format: str = ""  # the format the run ended on (after any step-downs)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def records_per_s(self) -> float:
        done = self.n_labelled + self.n_rejected
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())) or "none"
        out = [
            f"{self.out}: {self.n_labelled_total} of {self.n_records} records labelled ({counts})",
            f"this run: {self.n_labelled} labelled, {self.n_rejected} rejected, "
            f"{self.n_parse_failures} answers that did not parse (scored from logprobs: "
            f"{self.n_expected} records) in {self.elapsed_s:.1f}s "
            f"({self.records_per_s:.2f} records/s); {self.n_before} were done before",
        ]
        if self.n_rejected_total:
            out.append(
                f"{self.n_rejected_total} rejected records (with the raw answers): {self.rejects}"
            )
        if self.usage:
            out.append(usage_line(self.usage))
        if self.response_format:
            out.append(f"response format: {self.response_format}")
        return out + self.notes


def rejects_path(out: Path) -> Path:
    """``labelled.jsonl`` -> ``labelled.rejects.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.jsonl' else out.name}.rejects.jsonl")


class Labeller:
    """Requests one record's label; thread-safe (the endpoint's pool calls `__call__`)."""

    def __init__(self, endpoint, config: LabelConfig):
        self.endpoint = endpoint
        self.config = config
        self._system = config.system_prompt
        self.options = Negotiator(
            FORMAT_CHAIN,
            config.response_format,
            top_logprobs=config.top_logprobs,
            error=LabelError,
        )

    @property
    def notes(self) -> list[str]:
        return self.options.notes

    def _request(self, messages, fmt: str, top: int) -> tuple[list[dict[str, str]], dict]:
        kwargs: dict[str, Any] = {
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "seed": self.config.seed,
        }
        if top:
            kwargs.update(logprobs=True, top_logprobs=top)
        extra, _ = request_options(fmt, ANSWER_SCHEMA)
        return messages, {**kwargs, **extra}

    def __call__(self, item: tuple[Record, dict[str, Any]]) -> Labelled | Rejected:
        record, raw = item
        messages = [
            {"role": "system", "content": self._system},
            {"role": "user", "content": user_message(record, self.config.max_input_chars)},
        ]
        try:
            response, _ = send(
                self.endpoint,
                self.options,
                lambda fmt, top: self._request(messages, fmt, top),
                error=LabelError,
                what=f"record {record.id!r}",
            )
        except Refused as refused:
            return self._rejected(record, "request", str(refused), None)
        return self._answer(record, raw, response)

    def _answer(self, record: Record, raw: dict[str, Any], response) -> Labelled | Rejected:
        cfg = self.config
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        parsed: Answer | None = None
        parse_error = None
        cut = choice is not None and choice.finish_reason == "length"
        try:
            parsed = parse_answer(text)
        except ValueError as error:
            parse_error = str(error)
            if cut:  # a long reason ran out of tokens: the numbers before it still count
                try:
                    parsed, parse_error = parse_cut_answer(text), None
                except ValueError as cut_error:
                    parse_error = f"{parse_error}; {cut_error}"
        logprobs = choice_logprobs(choice) if choice is not None else None
        dist = score_distribution(*logprobs) if logprobs else None
        if parsed is None and dist is None:
            return self._rejected(record, "parse", parse_error or "empty answer", text)

        score = dist.expected if dist is not None else float(parsed.score)
        confidence = parsed.confidence if parsed is not None else None
        row = dict(raw)
        for name in ("labels", "scale_labels"):
            if name in raw:
                row[f"{name}_before"] = raw[name]
        row.update(
            scale_labels=round(score, 4),
            confidence=confidence,
            labels=cfg.label(score, confidence),
            reason=parsed.reason if parsed is not None else None,
            score_parsed=parsed.score if parsed is not None else None,
            score_expected=round(dist.expected, 4) if dist is not None else None,
            score_mass=round(dist.mass, 6) if dist is not None else None,
            score_from_key=dist.from_key if dist is not None else None,
            label_model=self.endpoint.model,
            label_context=cfg.context_name,
            label_prompt_sha256=cfg.prompt_sha256,
            label_settings=cfg.settings,
        )
        if cut:
            row["label_cut"] = True  # max_tokens ended the answer
        if parse_error is not None:
            row["label_parse_error"] = parse_error
            row["label_raw"] = text  # the answer behind a label read from logprobs alone
        return Labelled(row, parse_error)

    def _rejected(self, record: Record, kind: str, error: str, text: str | None) -> Rejected:
        cfg = self.config
        return Rejected(
            {
                "ids": record.id,
                "kind": kind,
                "error": error,
                "raw": text,
                "label_model": self.endpoint.model,
                "label_prompt_sha256": cfg.prompt_sha256,
                "label_settings": cfg.settings,
            }
        )


class JsonlLog:
    """An append-only jsonl file of finished records, keyed by their ``ids``.

    `open` cuts an incomplete last line (a write that a killed process left half done) and
    returns the rows; `append` writes one complete line and flushes it, so that a process killed
    at any moment leaves at most one incomplete line, which the next `open` removes. With
    ``unique=False`` an id may recur (a rejects file, where a retried record that is rejected
    again gets a second line) and its last line counts.
    """

    def __init__(
        self, path: Path, *, unique: bool = True, key: str = "ids", writer: str = "mup data label"
    ):
        self.path = path
        self.unique = unique
        self.key = key
        self.writer = writer  # named when a line is not one of ours
        self._file = None

    def open(self, *, lock: bool = False, create: bool = True) -> dict[str, dict[str, Any]]:
        """The rows so far; ``create=False`` leaves a missing file to the first `append`."""
        if not create and not self.path.exists():
            return {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        if lock:
            _lock(self._file, self.path)
        self._file.seek(0)
        content = self._file.read()
        cut = content.rfind(b"\n") + 1
        if cut < len(content):
            logger.warning(
                "%s: removed an incomplete last line (%d bytes) left by an interrupted run",
                self.path,
                len(content) - cut,
            )
            self._file.truncate(cut)
            content = content[:cut]
        rows: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(content.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = str(row[self.key])
            except (ValueError, KeyError, TypeError) as error:
                raise LabelError(
                    f"{self.path}:{number}: not a record line ({type(error).__name__}: {error}); "
                    f"was this file written by {self.writer}?"
                ) from None
            if key in rows and self.unique:
                raise LabelError(f"{self.path}:{number}: the id {key!r} appears twice")
            rows[key] = row
        return rows

    def append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._file.write((json.dumps(row) + "\n").encode())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lock(file, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: one writer is on the user
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise LabelError(
            f"another process is writing {path}; wait for it or pick another --out"
        ) from None


def _check_provenance(rows: Mapping[str, dict], path: Path, expected: dict[str, str]) -> None:
    for row in rows.values():
        for field, value in expected.items():
            if row.get(field) != value:
                raise LabelError(
                    f"{path} holds record {row.get('ids')!r} with {field} {row.get(field)!r}, "
                    f"this run has {value!r}; label into another --out (or delete it)"
                )


def label_dataset(
    endpoint,
    dataset: Dataset,
    out: str | os.PathLike,
    config: LabelConfig,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> LabelSummary:
    """Label `dataset` (its first `limit` records) into the jsonl `out`, resuming what an
    earlier run of the same model, prompt and settings finished. Raises `LabelError` when the
    endpoint fails for good (after the client's retries); what was finished stays on disk."""
    out = Path(out)
    records = list(dataset)[:limit]
    rows = raw_rows(dataset)
    wanted = {r.id for r in records}
    labelled_log, rejects_log = JsonlLog(out), JsonlLog(rejects_path(out), unique=False)
    provenance = {
        "label_model": endpoint.model,
        "label_prompt_sha256": config.prompt_sha256,
        "label_settings": config.settings,
    }
    summary = LabelSummary(out=out, rejects=rejects_log.path, n_records=len(records), n_before=0)
    with contextlib.ExitStack() as stack:
        done = labelled_log.open(lock=True)
        stack.callback(labelled_log.close)
        rejected = rejects_log.open(create=False)  # no rejects, no file
        stack.callback(rejects_log.close)
        known = set(dataset.ids)
        for name, log_rows in ((out, done), (rejects_log.path, rejected)):
            stray = [key for key in log_rows if key not in known]
            if stray:
                raise LabelError(
                    f"{name} holds {len(stray)} ids that {dataset.path} does not have (first: "
                    f"{stray[0]!r}); is it the output of another input?"
                )
            _check_provenance(log_rows, name, provenance)
        skip = set(done) | (set() if config.retry_rejects else set(rejected))
        todo = [r for r in records if r.id not in skip]
        summary.n_before = len(wanted & skip)
        if not todo:
            logger.info("%s: all %d records are done", out, len(records))
        labeller = Labeller(endpoint, config)
        stop = threading.Event()
        failure: LabelError | None = None
        started = time.monotonic()
        usage_before = endpoint.usage.as_dict()  # an endpoint may serve several runs
        try:
            for _, future in endpoint.map(
                labeller,
                ((r, rows[r.id]) for r in todo),
                total=len(todo),
                desc=f"labelling {dataset.path.name}",
                progress=progress,
                stop=stop,
            ):
                try:
                    outcome = future.result()
                except LabelError as error:
                    # Stop starting records, but keep the answers of those already running.
                    failure = failure or error
                    stop.set()
                    continue
                if isinstance(outcome, Labelled):
                    labelled_log.append(outcome.row)
                    done[str(outcome.row["ids"])] = outcome.row
                    summary.n_labelled += 1
                    summary.n_parse_failures += outcome.parse_error is not None
                    summary.n_expected += outcome.row["score_expected"] is not None
                else:
                    rejects_log.append(outcome.row)
                    rejected[str(outcome.row["ids"])] = outcome.row
                    summary.n_rejected += 1
            if failure is not None:
                failure.summary = summary  # filled in below: what is done stays done
                raise failure
        finally:
            summary.elapsed_s = time.monotonic() - started
            summary.notes = list(labeller.notes)
            summary.usage = {
                key: value - usage_before[key] for key, value in endpoint.usage.as_dict().items()
            }
            if summary.usage.get("requests"):
                summary.response_format = labeller.options.current()[0]
            summary.labels = collections.Counter(
                row["labels"] for key, row in done.items() if key in wanted
            )
            summary.n_labelled_total = sum(1 for key in done if key in wanted)
            summary.n_rejected_total = sum(
                1 for key in rejected if key in wanted and key not in done
            )
    return summary


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a jsonl file (for tests and tools reading outputs and rejects)."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
