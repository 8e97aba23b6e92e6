"""LLM judges of steered answers: rubric ratings 1-10 and pairwise comparisons against the
unsteered answer, through any OpenAI-compatible endpoint (`mup.datagen`'s client).

rows = load_sweep("runs/sweep/sweep.jsonl")
with open_endpoint(EndpointConfig(serve="smollm2-135m", concurrency=16)) as endpoint:
    summary = judge_sweep(endpoint, rows, "runs/sweep/judge.jsonl",
                          JudgeConfig(rubrics=(load_rubric("coherence"),), pairwise=True))

Ratings: the judge reads the rubric (a built-in name, see `BUNDLED_RUBRICS`, or a markdown
file) as its system prompt and answers ``{"score": 1-10, "reason"}`` for one answer. With
``top_logprobs`` the score is the expectation over 1..10 at the token where the score is
written (`mup.datagen.score_distribution`), the parsed score recorded beside it; otherwise the
parsed score. ``valid`` says whether the answer parsed; an answer with neither a parse nor
logprobs to read is a reject (kept, with the raw text, in ``<out>.rejects.jsonl``).

Pairwise: for every answer at multiplier m != 0 the judge sees it beside the answer at 0 for
the same prompt (vector, block, epoch), in both orders (A/B and B/A), and says which deserves
the higher rating by the rubric. The m answer's win is P(its letter) normalised over A and B
when logprobs are returned, the parsed choice otherwise; it is a win above 1/2, a tie at 1/2.
Per multiplier: the win rate with a Wilson 95% interval, and a Bradley-Terry score with the
unsteered answer fixed at 0 (`bradley_terry`, MM algorithm) and a 95% bootstrap interval over
prompts. Both orders averaged cancel a judge's position bias; its size is reported
(``a_rate``: how often the first answer was chosen).

Resumable: every finished rating is one line of the output, keyed by ``key`` (the sweep row's
vector, block, epoch, multiplier, prompt and sample, plus the rubric, and for pairs the order);
a rerun never asks for a finished key again, and an output written by another judge model,
prompt or settings is refused (`mup.datagen.JsonlLog`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from mup._renamed import renamed_field
from mup.datagen import (
    FORMAT_CHAIN,
    JsonlLog,
    LabelError,
    Negotiator,
    Refused,
    ResponseFormat,
    choice_logprobs,
    first_valid,
    messages_text,
    rejects_path,
    request_options,
    score_distribution,
    send,
    usage_line,
    value_token,
)

logger = logging.getLogger(__name__)

BUNDLED_RUBRICS_DIR = Path(__file__).parent / "rubrics"
BUNDLED_RUBRICS = tuple(sorted(p.stem for p in BUNDLED_RUBRICS_DIR.glob("*.md")))
WRITER = "mup steering judge"
# Two-sided 95%: the normal quantile behind the Wilson interval.
Z95 = 1.959963984540054


class JudgeError(LabelError):
    """Judging cannot start or go on; one line that says why. What is done stays done (a run
    that stopped carries its `JudgeSummary` as ``summary``)."""


class SweepError(ValueError):
    """The sweep file is not usable; the message names the file, line and field."""


# -- inputs ------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class SweepRow(BaseModel):
    """One generated answer of `mup steering sweep` (other fields are kept, unread)."""

    model_config = ConfigDict(extra="allow")
    vector: str
    # the steered block; sweeps written before the rename call it "layer"
    block: int = Field(validation_alias=AliasChoices("block", "layer"))
    epoch: int | None = None
    multiplier: float
    prompt_id: str
    prompt: list[ChatMessage] = Field(min_length=1)
    answer: str
    sample: int = 0  # several answers per prompt and multiplier: their index

    @field_validator("prompt_id", mode="before")
    @classmethod
    def _id_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("multiplier")
    @classmethod
    def _finite(cls, value):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def group(self) -> tuple[str, int, int | None]:
        """What one curve of multipliers shares: the vector file, its block and epoch."""
        return (self.vector, self.block, self.epoch)

    @property
    def key(self) -> str:
        """The sweep row's identity in judge outputs (multipliers written exactly). It still
        says ``layer=`` for the block: judge outputs written before the rename stay resumable."""
        return (
            f"{self.vector}|layer={self.block}|epoch={self.epoch}|m={self.multiplier!r}|"
            f"prompt={self.prompt_id}|sample={self.sample}"
        )


def load_sweep(path: str | os.PathLike) -> list[SweepRow]:
    """The rows of a sweep jsonl; `SweepError` naming file, line and field otherwise, and for a
    row that repeats another's key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"the sweep file {path} does not exist")
    rows: list[SweepRow] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as error:
                raise SweepError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(value, dict):
                raise SweepError(f"{path}:{number}: a row must be a JSON object")
            try:
                row = SweepRow.model_validate(value)
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(map(str, first["loc"])) or "row"
                raise SweepError(f"{path}:{number}: field {field}: {first['msg']}") from None
            if row.key in seen:
                raise SweepError(
                    f"{path}:{number}: the same answer as line {seen[row.key]} ({row.key}); "
                    "give repeated answers distinct 'sample' numbers"
                )
            seen[row.key] = number
            rows.append(row)
    if not rows:
        raise SweepError(f"{path}: no rows")
    return rows


@dataclasses.dataclass(frozen=True)
class Rubric:
    """A rubric: its name (a bundled name or the file's stem) and its markdown text."""

    name: str
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def load_rubric(spec: str | os.PathLike) -> Rubric:
    """A bundled rubric by name (`BUNDLED_RUBRICS`) or a markdown file; `JudgeError` otherwise."""
    spec_text = str(spec)
    if spec_text in BUNDLED_RUBRICS:
        path = BUNDLED_RUBRICS_DIR / f"{spec_text}.md"
        return Rubric(spec_text, path.read_text(encoding="utf-8").strip(), f"bundled:{spec_text}")
    path = Path(spec_text).expanduser()
    if not path.is_file():
        raise JudgeError(
            f"unknown rubric {spec_text!r}: expected one of {', '.join(BUNDLED_RUBRICS)} or a "
            "markdown file"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise JudgeError(f"cannot read the rubric {path}: {error}") from None
    if not text:
        raise JudgeError(f"the rubric {path} is empty")
    if path.stem in BUNDLED_RUBRICS:
        raise JudgeError(
            f"the rubric file {path} has the name of a bundled rubric; rename it so that its "
            "ratings are not mistaken for the bundled one's"
        )
    return Rubric(path.stem, text, str(path))


# -- prompts -----------------------------------------------------------------------------------

RATING_INTRO = (
    "You are a careful judge of an AI assistant's answers. You read a conversation and the "
    "answer the assistant gave to it, and rate the answer from 1 to 10 by the rubric below."
)
# The score is asked first: its token is then the answer's first number (see mup.datagen).
RATING_FORMAT = """Respond with only a JSON object with these keys, in this order:
- "score": an integer from 1 to 10, the answer's rating by the rubric.
- "reason": one sentence that explains the rating.
For example: {"score": <1-10>, "reason": "<why>"}"""
RATING_TEMPLATE = (
    "Here is the conversation:\n\n<conversation>\n{conversation}\n</conversation>\n\n"
    "Here is the assistant's answer to rate:\n\n<answer>\n{answer}\n</answer>\n\n"
    "Rate the answer by the rubric and respond with the JSON object only."
)
PAIR_INTRO = (
    "You are a careful judge of an AI assistant's answers. You read a conversation and two "
    "answers the assistant could give to it, answer A and answer B, and decide which of them "
    "deserves the higher rating by the rubric below. The order of the answers means nothing."
)
PAIR_FORMAT = """Respond with only a JSON object with these keys, in this order:
- "better": "A" or "B", the answer that deserves the higher rating by the rubric.
- "reason": one sentence that explains the choice.
For example: {"better": "<A or B>", "reason": "<why>"}"""
PAIR_TEMPLATE = (
    "Here is the conversation:\n\n<conversation>\n{conversation}\n</conversation>\n\n"
    "<answer_A>\n{a}\n</answer_A>\n\n<answer_B>\n{b}\n</answer_B>\n\n"
    "Which answer deserves the higher rating by the rubric? Respond with the JSON object only."
)
RATING_SCHEMA = {
    "name": "rating",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            # bounded as the labeller's scores are: a constrained endpoint writes only 1..10
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "reason": {"type": "string"},
        },
        "required": ["score", "reason"],
        "additionalProperties": False,
    },
}
PAIR_SCHEMA = {
    "name": "comparison",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "better": {"type": "string", "enum": ["A", "B"]},
            "reason": {"type": "string"},
        },
        "required": ["better", "reason"],
        "additionalProperties": False,
    },
}


def rating_system_prompt(rubric: Rubric) -> str:
    return f"{RATING_INTRO}\n\n{rubric.text}\n\n{RATING_FORMAT}"


def pair_system_prompt(rubric: Rubric) -> str:
    return f"{PAIR_INTRO}\n\n{rubric.text}\n\n{PAIR_FORMAT}"


def _conversation(row: SweepRow, max_chars: int | None) -> str:
    return messages_text([(m.role, m.content) for m in row.prompt], max_chars)


def rating_messages(rubric: Rubric, row: SweepRow, max_chars: int | None = None) -> list[dict]:
    user = RATING_TEMPLATE.format(conversation=_conversation(row, max_chars), answer=row.answer)
    return [
        {"role": "system", "content": rating_system_prompt(rubric)},
        {"role": "user", "content": user},
    ]


def pair_messages(
    rubric: Rubric, a: SweepRow, b: SweepRow, max_chars: int | None = None
) -> list[dict]:
    user = PAIR_TEMPLATE.format(conversation=_conversation(a, max_chars), a=a.answer, b=b.answer)
    return [
        {"role": "system", "content": pair_system_prompt(rubric)},
        {"role": "user", "content": user},
    ]


# -- answers -----------------------------------------------------------------------------------


class Rating(BaseModel):
    """The judge's rating answer ("7" and 7.0 are read as 7; extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    score: int = Field(ge=1, le=10)
    reason: str = ""


class Choice(BaseModel):
    """The judge's pairwise answer ("a" is read as "A")."""

    model_config = ConfigDict(extra="ignore")
    better: Literal["A", "B"]
    reason: str = ""

    @field_validator("better", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.strip().upper() if isinstance(value, str) else value


@dataclasses.dataclass(frozen=True)
class OptionDistribution:
    """P(A) and P(B) at the token where the choice is written.

    p_a: P(A) / (P(A) + P(B)); mass: P(A) + P(B) among the returned alternatives.
    from_key: whether that token is the value of the answer's "better" key (else: the first
      token that is a lone A or B, else the first token).
    """

    p_a: float
    mass: float
    position: int
    from_key: bool


_BETTER_KEY = re.compile(r'"better"\s*:\s*"?\s*(?=[ABab])')
_LONE_LETTER = re.compile(r"(?<![A-Za-z])[AB](?![A-Za-z])")
_LETTER = re.compile(r"([ABab])(?![A-Za-z])")


def option_distribution(
    tokens: Sequence[str], top: Sequence[Sequence[tuple[str, float]]]
) -> OptionDistribution | None:
    """The choice between A and B from a chat answer's logprobs (as `score_distribution` reads
    scores): at the token where the "better" value starts, each alternative that continues the
    text before the value within that token with a lone A or B counts for it. None for an
    empty answer or when no alternative there is A or B."""
    if not tokens:
        return None
    i, prefix, from_key = value_token(tokens, _BETTER_KEY, _LONE_LETTER)
    prefix = prefix.lstrip()
    p = {"A": 0.0, "B": 0.0}
    for alt, logprob in top[i] if i < len(top) else ():
        a = alt.lstrip()
        if not a.startswith(prefix):
            continue
        match = _LETTER.match(a[len(prefix) :].lstrip())
        if match is not None:
            p[match.group(1).upper()] += math.exp(logprob)
    mass = p["A"] + p["B"]
    if mass <= 0:
        return None
    return OptionDistribution(p_a=p["A"] / mass, mass=min(mass, 1.0), position=i, from_key=from_key)


def read_rating(text: str, logprobs) -> dict[str, Any] | None:
    """A rating answer's fields (score, score_expected, score_parsed, score_mass, valid, reason,
    parse_error); None when neither the text nor the logprobs give a score."""
    try:
        parsed, error = first_valid(text, Rating), None
    except ValueError as problem:
        parsed, error = None, str(problem)
    dist = score_distribution(*logprobs) if logprobs else None
    if parsed is None and dist is None:
        return None
    return {
        "score": round(dist.expected, 4) if dist is not None else float(parsed.score),
        "score_expected": round(dist.expected, 4) if dist is not None else None,
        "score_parsed": parsed.score if parsed is not None else None,
        "score_mass": round(dist.mass, 6) if dist is not None else None,
        "valid": parsed is not None,
        "reason": parsed.reason if parsed is not None else None,
        "parse_error": error,
    }


def read_choice(text: str, logprobs) -> dict[str, Any] | None:
    """A pairwise answer's fields (p_a: P(answer A is better), choice_parsed, choice_mass, valid,
    reason, parse_error); None when neither the text nor the logprobs give a choice."""
    try:
        parsed, error = first_valid(text, Choice), None
    except ValueError as problem:
        parsed, error = None, str(problem)
    dist = option_distribution(*logprobs) if logprobs else None
    if parsed is None and dist is None:
        return None
    return {
        "p_a": round(dist.p_a, 6) if dist is not None else float(parsed.better == "A"),
        "choice_parsed": parsed.better if parsed is not None else None,
        "choice_mass": round(dist.mass, 6) if dist is not None else None,
        "valid": parsed is not None,
        "reason": parsed.reason if parsed is not None else None,
        "parse_error": error,
    }


# -- statistics --------------------------------------------------------------------------------


def wilson_interval(wins: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion wins / n (ties may count 1/2); (nan, nan) for
    n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = wins / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return (max(0.0, centre - half), min(1.0, centre + half))


def bradley_terry(
    wins: np.ndarray,
    *,
    reference: int = 0,
    prior: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> np.ndarray:
    """Bradley-Terry log-strengths s from a win matrix, P(i beats j) = sigmoid(s_i - s_j), with
    s[reference] = 0; wins[..., i, j] counts i's wins over j (ties as 1/2 each way). Leading
    axes are independent problems (bootstrap replicates).

    The maximum-likelihood fit by Hunter's (2004) MM iteration, p_i <- W_i / sum_j n_ij /
    (p_i + p_j), which increases the likelihood every step. The MLE exists when every item
    reaches every other along "beat" edges (Zermelo's condition); a problem where it does not
    (e.g. a multiplier that never lost) is all nan. `prior` adds that many wins each way to
    every pair that was compared, which makes it exist whenever the comparisons connect the
    items. An item never compared is nan.
    """
    w = np.asarray(wins, dtype=np.float64)
    if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"wins must be [..., K, K], got shape {w.shape}")
    k = w.shape[-1]
    w = w * (1 - np.eye(k))
    n = w + np.swapaxes(w, -1, -2)
    if prior:
        w = w + prior * (n > 0)
        n = w + np.swapaxes(w, -1, -2)
    total = w.sum(-1)  # [..., K]: each item's wins
    compared = n.sum(-1) > 0
    reach = (w > 0) | np.eye(k, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(k)))):  # transitive closure by squaring
        reach = reach | (np.einsum("...ij,...jk->...ik", reach, reach) > 0)
    pair_compared = compared[..., :, None] & compared[..., None, :]
    exists = np.all(reach | ~pair_compared, axis=(-1, -2))  # [...]
    compared = compared & exists[..., None]
    p = np.where(compared, 1.0, np.nan)
    for _ in range(max_iter):
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = np.nansum(n / (p[..., :, None] + p[..., None, :]), axis=-1)
            new = np.where(compared, total / denom, np.nan)
            new = new / new[..., reference : reference + 1]
            change = np.nanmax(np.abs(np.log(new) - np.log(p)), initial=0.0)
        p = new
        if not change > tol:  # also stops on nan (nothing left to fit)
            break
    with np.errstate(divide="ignore"):
        return np.log(p)


# -- judging -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """What the judge is asked and how.

    rubrics: rated one by one (each answer once per rubric, each pair once per rubric and order).
    pairwise: also compare each answer at m != 0 with the answer at 0 (both orders).
    top_logprobs: alternatives per answer token (0: parse only); response_format as in
      `mup.datagen.LabelConfig`.
    max_input_chars: keep only the end of longer conversations (the answers are kept whole).
    bootstrap: resamples of prompts for the Bradley-Terry intervals; bt_prior: its pseudo-wins.
    retry_rejects: ask again for the ratings in the rejects file.
    """

    rubrics: tuple[Rubric, ...]
    pairwise: bool = False
    max_tokens: int = 96
    temperature: float = 0.0
    seed: int = 0
    top_logprobs: int = 20
    response_format: ResponseFormat = "auto"
    max_input_chars: int | None = None
    bootstrap: int = 1000
    bt_prior: float = 0.5
    retry_rejects: bool = False

    def __post_init__(self):
        if not self.rubrics:
            raise ValueError("give at least one rubric")
        names = [r.name for r in self.rubrics]
        if len(set(names)) != len(names):
            raise ValueError(f"two rubrics share a name: {names}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 0..20, got {self.top_logprobs}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.bootstrap < 0 or self.bt_prior < 0:
            raise ValueError("bootstrap and bt_prior must not be negative")

    @property
    def settings(self) -> str:
        """The request settings an output's rows must share."""
        return (
            f"max_tokens={self.max_tokens} temperature={self.temperature:g} seed={self.seed} "
            f"top_logprobs={self.top_logprobs} max_input_chars={self.max_input_chars}"
        )

    def prompt_sha256(self, rubric: Rubric, kind: str) -> str:
        """Of everything the judge reads besides the sweep row, for one rubric and kind."""
        if kind == "rating":
            text = f"{rating_system_prompt(rubric)}\n\n{RATING_TEMPLATE}"
        else:
            text = f"{pair_system_prompt(rubric)}\n\n{PAIR_TEMPLATE}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Task:
    """One request: a rating of `row`, or a comparison of `row` (at m) with `base` (at 0)."""

    key: str
    kind: Literal["rating", "pair"]
    rubric: Rubric
    row: SweepRow
    base: SweepRow | None = None
    order: Literal["m_first", "zero_first"] | None = None

    def head(self) -> dict[str, Any]:
        r = self.row
        out = {
            "key": self.key,
            "kind": self.kind,
            "rubric": self.rubric.name,
            "vector": r.vector,
            "block": r.block,
            "epoch": r.epoch,
            "multiplier": r.multiplier,
            "prompt_id": r.prompt_id,
            "sample": r.sample,
        }
        if self.kind == "pair":
            out["order"] = self.order
        return out


def plan(rows: Sequence[SweepRow], config: JudgeConfig) -> list[Task]:
    """Every request a sweep needs, ratings first; `SweepError` when pairwise comparisons lack
    the multiplier-0 answer of some prompt (before any request)."""
    tasks = [
        Task(f"rating|{rubric.name}|{row.key}", "rating", rubric, row)
        for rubric in config.rubrics
        for row in rows
    ]
    if not config.pairwise:
        return tasks
    # The unsteered answer of the same curve, else any unsteered answer to the prompt (all
    # vectors share it at multiplier 0).
    base_exact = {(*r.group, r.prompt_id, r.sample): r for r in rows if r.multiplier == 0}
    base_any = {(r.prompt_id, r.sample): r for r in rows if r.multiplier == 0}
    steered = [r for r in rows if r.multiplier != 0]
    for row in steered:
        base = base_exact.get((*row.group, row.prompt_id, row.sample)) or base_any.get(
            (row.prompt_id, row.sample)
        )
        if base is None:
            raise SweepError(
                f"pairwise: no answer at multiplier 0 for prompt {row.prompt_id!r} (sample "
                f"{row.sample}) to compare {row.key} with; the sweep must include multiplier 0"
            )
        for rubric in config.rubrics:
            for order in ("m_first", "zero_first"):
                key = f"pair|{rubric.name}|{order}|{row.key}"
                tasks.append(Task(key, "pair", rubric, row, base, order))
    return tasks


@dataclasses.dataclass(frozen=True)
class Judged:
    row: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Rejected:
    row: dict[str, Any]  # key, kind, error, raw


class Judge:
    """Requests one task's judgement; thread-safe (the endpoint's pool calls `__call__`)."""

    def __init__(self, endpoint, config: JudgeConfig):
        self.endpoint = endpoint
        self.config = config
        # a 1-10 rating or an A/B choice is not a string to continue: no prefix format
        self.options = {
            kind: Negotiator(
                FORMAT_CHAIN,
                config.response_format,
                top_logprobs=config.top_logprobs,
                error=JudgeError,
            )
            for kind in ("rating", "pair")
        }
        self._schemas = {"rating": RATING_SCHEMA, "pair": PAIR_SCHEMA}

    @property
    def notes(self) -> list[str]:
        return [n for options in self.options.values() for n in options.notes]

    def provenance(self, task: Task) -> dict[str, str]:
        return {
            "judge_model": self.endpoint.model,
            "judge_prompt_sha256": self.config.prompt_sha256(task.rubric, task.kind),
            "judge_settings": self.config.settings,
        }

    def __call__(self, task: Task) -> Judged | Rejected:
        cfg = self.config
        if task.kind == "rating":
            messages = rating_messages(task.rubric, task.row, cfg.max_input_chars)
        else:
            a, b = (task.row, task.base) if task.order == "m_first" else (task.base, task.row)
            messages = pair_messages(task.rubric, a, b, cfg.max_input_chars)
        schema = self._schemas[task.kind]

        def build(fmt: str, top: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
            kwargs: dict[str, Any] = {
                "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature,
                "seed": cfg.seed,
            }
            if top:
                kwargs.update(logprobs=True, top_logprobs=top)
            extra, _ = request_options(fmt, schema)
            return messages, {**kwargs, **extra}

        try:
            response, _ = send(
                self.endpoint, self.options[task.kind], build, error=JudgeError, what=task.key
            )
        except Refused as refused:
            return self._rejected(task, "request", str(refused), None)
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        logprobs = choice_logprobs(choice) if choice is not None else None
        read = (read_rating if task.kind == "rating" else read_choice)(text, logprobs)
        if read is None:
            problem = "empty answer"
            try:
                first_valid(text, Rating if task.kind == "rating" else Choice)
            except ValueError as error:
                problem = str(error) if text.strip() else problem
            return self._rejected(task, "parse", problem, text)
        row = task.head()
        if task.kind == "pair":
            p_m = read["p_a"] if task.order == "m_first" else 1 - read["p_a"]
            row["p_m_better"] = round(p_m, 6)
            row["m_wins"] = 1.0 if p_m > 0.5 else 0.0 if p_m < 0.5 else 0.5
        row.update(read)
        if read["parse_error"] is None:
            del row["parse_error"]
        else:
            row["raw"] = text  # the answer behind a judgement read from logprobs alone
        if choice is not None and choice.finish_reason == "length":
            row["cut"] = True
        row.update(self.provenance(task))
        return Judged(row)

    def _rejected(self, task: Task, kind: str, error: str, text: str | None) -> Rejected:
        return Rejected(
            {**task.head(), "reject": kind, "error": error, "raw": text, **self.provenance(task)}
        )


@dataclasses.dataclass
class JudgeSummary:
    """What a judging run did, and what its output holds for this sweep."""

    out: Path
    rejects: Path
    n_tasks: int
    n_before: int
    n_judged: int = 0  # this run
    n_rejected: int = 0  # this run
    n_invalid: int = 0  # this run: answers that did not parse (read from logprobs)
    n_judged_total: int = 0
    n_rejected_total: int = 0
    usage: dict[str, int] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # summary rows
    files: list[Path] = dataclasses.field(default_factory=list)

    @property
    def per_s(self) -> float:
        done = self.n_judged + self.n_rejected
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"{self.out}: {self.n_judged_total} of {self.n_tasks} judgements done, "
            f"{self.n_rejected_total} rejected",
            f"this run: {self.n_judged} judged ({self.n_invalid} answers that did not parse, "
            f"read from logprobs), {self.n_rejected} rejected in {self.elapsed_s:.1f}s "
            f"({self.per_s:.2f}/s); {self.n_before} were done before",
        ]
        if self.n_rejected_total:
            out.append(f"rejected judgements (with the raw answers): {self.rejects}")
        if self.usage:
            out.append(usage_line(self.usage))
        out += [f"wrote {path}" for path in self.files]
        return out + self.notes


def output_paths(out: Path) -> dict[str, Path]:
    """``judge.jsonl`` -> its rejects, summary csv and json, and figure beside it."""
    stem = out.stem if out.suffix == ".jsonl" else out.name
    return {
        "rejects": rejects_path(out),
        "csv": out.with_name(f"{stem}.summary.csv"),
        "json": out.with_name(f"{stem}.summary.json"),
        "png": out.with_name(f"{stem}.png"),
    }


def judge_sweep(
    endpoint,
    rows: Sequence[SweepRow],
    out: str | os.PathLike,
    config: JudgeConfig,
    *,
    limit: int | None = None,
    progress: bool = True,
    plot: bool = True,
) -> JudgeSummary:
    """Judge the sweep `rows` (the first `limit` tasks) into the jsonl `out`, resuming what an
    earlier run with the same judge model, prompts and settings finished; then write the
    summary files and figure from every finished judgement of these rows. Raises `JudgeError`
    when the endpoint fails for good; what was finished stays on disk."""
    out = Path(out)
    tasks = plan(rows, config)[:limit]
    paths = output_paths(out)
    judged_log = JsonlLog(out, key="key", writer=WRITER)
    rejects_log = JsonlLog(paths["rejects"], unique=False, key="key", writer=WRITER)
    summary = JudgeSummary(out=out, rejects=paths["rejects"], n_tasks=len(tasks), n_before=0)
    judge = Judge(endpoint, config)
    by_key = {t.key: t for t in tasks}
    with contextlib.ExitStack() as stack:
        done = judged_log.open(lock=True)
        stack.callback(judged_log.close)
        rejected = rejects_log.open(create=False)
        stack.callback(rejects_log.close)
        for path, log_rows in ((out, done), (paths["rejects"], rejected)):
            _check_provenance(log_rows, by_key, judge, path)
        skip = set(done) | (set() if config.retry_rejects else set(rejected))
        todo = [t for t in tasks if t.key not in skip]
        summary.n_before = len(tasks) - len(todo)
        stop = threading.Event()
        failure: JudgeError | None = None
        started = time.monotonic()
        usage_before = endpoint.usage.as_dict()
        try:
            for _, future in endpoint.map(
                judge, todo, total=len(todo), desc="judging", progress=progress, stop=stop
            ):
                try:
                    outcome = future.result()
                except LabelError as error:  # JudgeError, or a refused format named by the user
                    failure = failure or JudgeError(str(error))
                    stop.set()
                    continue
                if isinstance(outcome, Judged):
                    judged_log.append(outcome.row)
                    done[outcome.row["key"]] = outcome.row
                    summary.n_judged += 1
                    summary.n_invalid += not outcome.row["valid"]
                else:
                    rejects_log.append(outcome.row)
                    rejected[outcome.row["key"]] = outcome.row
                    summary.n_rejected += 1
        finally:
            summary.elapsed_s = time.monotonic() - started
            summary.notes = judge.notes
            summary.usage = {k: v - usage_before[k] for k, v in endpoint.usage.as_dict().items()}
            mine = [done[k] for k in by_key if k in done]
            summary.n_judged_total = len(mine)
            summary.n_rejected_total = sum(1 for k in by_key if k in rejected and k not in done)
        if failure is not None:
            failure.summary = summary
            raise failure
    refused = [rejected[k] for k in by_key if k in rejected and k not in done]
    summary.rows = summarize(mine, refused, config)
    summary.files = write_summary(summary.rows, paths, plot=plot)
    return summary


def _check_provenance(log_rows: Mapping[str, dict], tasks: Mapping[str, Task], judge, path):
    for key, row in log_rows.items():
        task = tasks.get(key)
        if task is None:
            continue  # another part of the sweep (a larger --limit, another rubric): kept
        for field, value in judge.provenance(task).items():
            if row.get(field) != value:
                raise JudgeError(
                    f"{path} holds {key!r} with {field} {row.get(field)!r}, this run has "
                    f"{value!r}; judge into another --out (or delete it)"
                )


# -- summaries ---------------------------------------------------------------------------------

SUMMARY_FIELDS = (
    "vector", "block", "epoch", "multiplier", "rubric",
    "n", "n_valid", "n_rejected", "mean", "ci_low", "ci_high", "std", "mean_mass",
    "n_pairs", "n_pairs_rejected", "win_rate", "win_low", "win_high", "a_rate",
    "bt", "bt_low", "bt_high",
)  # fmt: skip


def summarize(
    judged: Iterable[dict[str, Any]], rejected: Iterable[dict[str, Any]], config: JudgeConfig
) -> list[dict[str, Any]]:
    """One row per (vector, block, epoch, multiplier, rubric): the mean rating with a 95%
    t interval over answers, and with pairwise comparisons the win rate against multiplier 0
    (Wilson 95%), how often the first-shown answer was chosen, and the Bradley-Terry score
    (0 at multiplier 0) with a 95% bootstrap interval over prompts. Judge rows written before
    the rename name the block ``layer``; they are read as ``block``."""
    from scipy import stats  # a dependency of jax

    judged = [renamed_field(r, "layer", "block") for r in judged]
    rejected = [renamed_field(r, "layer", "block") for r in rejected]

    def cell(r):
        return (r["vector"], r["block"], r["epoch"], r["multiplier"], r["rubric"])

    cells: dict[tuple, dict[str, Any]] = {}
    for r in judged + rejected:
        cells.setdefault(cell(r), {"scores": [], "masses": [], "valid": 0, "rejected": 0,
                                   "pairs": [], "pairs_rejected": 0})  # fmt: skip
    for r in rejected:
        c = cells[cell(r)]
        c["rejected" if r["kind"] == "rating" else "pairs_rejected"] += 1
    for r in judged:
        c = cells[cell(r)]
        if r["kind"] == "rating":
            c["scores"].append(r["score"])
            c["valid"] += bool(r["valid"])
            if r["score_mass"] is not None:
                c["masses"].append(r["score_mass"])
        else:
            c["pairs"].append(r)
    out = []
    for key in sorted(cells, key=lambda k: (str(k[0]), k[1], k[2] or -1, k[4], k[3])):
        c = cells[key]
        scores = np.asarray(c["scores"], dtype=np.float64)
        n = len(scores)
        row = dict(zip(("vector", "block", "epoch", "multiplier", "rubric"), key, strict=True))
        row.update(n=n, n_valid=c["valid"], n_rejected=c["rejected"])
        mean = float(scores.mean()) if n else math.nan
        std = float(scores.std(ddof=1)) if n > 1 else math.nan
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
        row.update(
            mean=mean,
            ci_low=mean - half,
            ci_high=mean + half,
            std=std,
            mean_mass=float(np.mean(c["masses"])) if c["masses"] else math.nan,
        )
        pairs = c["pairs"]
        wins = sum(p["m_wins"] for p in pairs)
        lo, hi = wilson_interval(wins, len(pairs))
        shown_first = [p["p_m_better"] if p["order"] == "m_first" else 1 - p["p_m_better"]
                       for p in pairs]  # fmt: skip
        row.update(
            n_pairs=len(pairs),
            n_pairs_rejected=c["pairs_rejected"],
            win_rate=wins / len(pairs) if pairs else math.nan,
            win_low=lo,
            win_high=hi,
            a_rate=float(np.mean([s > 0.5 for s in shown_first])) if pairs else math.nan,
            bt=math.nan,
            bt_low=math.nan,
            bt_high=math.nan,
        )
        out.append(row)
    if config.pairwise:
        _add_bradley_terry(out, [r for r in judged if r["kind"] == "pair"], config)
    return out


def _add_bradley_terry(rows: list[dict], pairs: list[dict], config: JudgeConfig) -> None:
    """Fill bt, bt_low, bt_high of `rows`: one fit per (vector, block, epoch, rubric) over its
    multipliers, multiplier 0 the reference; bootstrap replicates resample prompts (with their
    samples and both orders together: a prompt's comparisons are not independent)."""
    groups: dict[tuple, list[dict]] = {}
    for p in pairs:
        groups.setdefault((p["vector"], p["block"], p["epoch"], p["rubric"]), []).append(p)
    rng = np.random.default_rng(config.seed)
    for group, items in groups.items():
        # The unsteered answer first: index 0 is the reference of the fit and of the wins.
        multipliers = [0.0, *sorted({float(p["multiplier"]) for p in items} - {0.0})]
        index = {m: i for i, m in enumerate(multipliers)}
        prompts = sorted({(p["prompt_id"], p["sample"]) for p in items})
        pindex = {q: i for i, q in enumerate(prompts)}
        k = len(multipliers)
        per_prompt = np.zeros((len(prompts), k, k))  # [P, K, K]: wins by prompt
        for p in items:
            i, q = index[float(p["multiplier"])], pindex[(p["prompt_id"], p["sample"])]
            per_prompt[q, i, 0] += p["m_wins"]
            per_prompt[q, 0, i] += 1 - p["m_wins"]
        strengths = bradley_terry(per_prompt.sum(0), prior=config.bt_prior)
        low = high = np.full(k, np.nan)
        if config.bootstrap:
            draws = rng.integers(0, len(prompts), size=(config.bootstrap, len(prompts)))
            counts = np.zeros((config.bootstrap, len(prompts)))  # [B, P]
            np.add.at(counts, (np.arange(config.bootstrap)[:, None], draws), 1)
            replicates = bradley_terry(
                np.einsum("bp,pij->bij", counts, per_prompt), prior=config.bt_prior
            )  # [B, K]
            with warnings.catch_warnings():  # a multiplier with no finite replicate: nan
                warnings.simplefilter("ignore", RuntimeWarning)
                low, high = np.nanpercentile(replicates, [2.5, 97.5], axis=0)
        for row in rows:
            if (row["vector"], row["block"], row["epoch"], row["rubric"]) != group:
                continue
            i = index.get(float(row["multiplier"]))
            if i is not None:
                row.update(bt=float(strengths[i]), bt_low=float(low[i]), bt_high=float(high[i]))


def write_summary(rows: list[dict], paths: Mapping[str, Path], *, plot: bool = True) -> list[Path]:
    """The summary as csv and json (each written atomically), and the figure."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row[k]) for k in SUMMARY_FIELDS})
    _atomic_write(paths["csv"], buffer.getvalue())
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in row.items()} for row in rows]  # fmt: skip
    _atomic_write(paths["json"], json.dumps(clean, indent=1) + "\n")
    files = [paths["csv"], paths["json"]]
    if plot and rows:
        files.append(plot_summary(rows, paths["png"]))
    return files


def _csv_value(value):
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Mean rating (95% interval) vs multiplier, one panel per rubric and one line per vector;
    with pairwise comparisons a second column of win rates against multiplier 0."""
    from mup._plots import new_figure, save_figure

    rubrics = sorted({r["rubric"] for r in rows})
    pairwise = any(r["n_pairs"] for r in rows)
    ncols = 2 if pairwise else 1
    fig, axes = new_figure(
        len(rubrics), ncols, figsize=(5.5 * ncols, 3.2 * len(rubrics)), squeeze=False
    )
    for i, rubric in enumerate(rubrics):
        mine = [r for r in rows if r["rubric"] == rubric]
        curves = sorted({(r["vector"], r["block"], r["epoch"]) for r in mine}, key=str)
        for curve in curves:
            pts = sorted((r for r in mine if (r["vector"], r["block"], r["epoch"]) == curve),
                         key=lambda r: r["multiplier"])  # fmt: skip
            label = f"{curve[0]} B{curve[1]}" + (f" e{curve[2]}" if curve[2] is not None else "")
            x = [r["multiplier"] for r in pts]
            ax = axes[i][0]
            mean = np.array([r["mean"] for r in pts])
            err = np.array([[r["mean"] - r["ci_low"], r["ci_high"] - r["mean"]] for r in pts]).T
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), marker="o", capsize=3, label=label)
            if pairwise:
                # m=0 against itself is 1/2 by definition: drawn so the curve passes through it
                steered = [r for r in pts if r["n_pairs"]]
                steered += [{"multiplier": 0.0, "win_rate": 0.5, "win_low": 0.5, "win_high": 0.5}]
                steered.sort(key=lambda r: r["multiplier"])
                rate = np.array([r["win_rate"] for r in steered])
                werr = np.array(
                    [[r["win_rate"] - r["win_low"], r["win_high"] - r["win_rate"]] for r in steered]
                ).T
                axes[i][1].errorbar(
                    [r["multiplier"] for r in steered], rate, yerr=werr, marker="o", capsize=3,
                    label=label,
                )  # fmt: skip
        axes[i][0].set(xlabel="multiplier", ylabel=f"{rubric} rating (1-10)", ylim=(0.5, 10.5))
        axes[i][0].axvline(0, color="0.8", lw=0.8, zorder=0)
        axes[i][0].legend(fontsize=7)
        if pairwise:
            ax = axes[i][1]
            ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
            ax.set(xlabel="multiplier", ylabel=f"{rubric}: win rate vs m=0", ylim=(-0.02, 1.02))
    return save_figure(fig, path)
