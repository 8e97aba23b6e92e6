"""Synthetic stakes data in the paper's way, through any OpenAI-compatible endpoint: situations
written from sampled situation factors, then user prompts in sampled prompt variations.

1. Pairs: pair k gets a topic, a role of the user and an impact factor drawn with (seed, k), so
   the same seed gives the same pairs whatever ``n_situations`` (a larger run extends a smaller
   one).
2. Situations: the pair's high-stakes situation is written from its factors; the low-stakes one
   is a rewrite of it that keeps the setting, the people and the topic and lowers only what is
   at stake, so that the two differ in stakes and not in topic.
3. Prompts: K user prompts per situation; prompt j of a pair's two situations shares one
   variation (prompt style, tone, language, length) drawn with (seed, pair, j).

Each answer is one JSON string field (``{"situation": ...}``, ``{"prompt": ...}``) validated by
pydantic; an invalid answer is asked again with another seed up to ``max_retries`` times, then
the item is rejected (its pair's later steps are skipped). Formats step down as the endpoint
refuses them (mup.datagen._structured): json_schema, json_object, prefix (mup serve), none.

Files, all append-only jsonl (one complete flushed line per finished item): ``out`` holds the
prompts in the stakes schema (``inputs``, ``ids``, ``labels`` = the intended stakes,
``pair_id``, the variation and factor fields, the ``situation``), which `mup.data.load_records`,
`mup extract` and the probes read; ``<stem>.situations.jsonl`` the situations;
``<stem>.rejects.jsonl`` every invalid answer with its raw text (``final`` on the one that
rejected its item). A rerun reads the three files and continues: a finished or rejected item is
never requested again, and an item killed between attempts resumes at its next attempt (each
attempt has its own seed), so a killed run loses only the requests in flight.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mup.datagen._endpoint import usage_line
from mup.datagen._label import JsonlLog, _check_provenance, find_input
from mup.datagen._structured import (
    FORMATS,
    Negotiator,
    Refused,
    continued,
    first_valid,
    request_options,
    send,
)

logger = logging.getLogger(__name__)

FACTORS_PATH = "mup/situation_factors.json"  # under a data root (see mup.data._locate)
VARIATIONS_PATH = "mup/prompt_variations.json"
STAGES = ("high", "low", "prompt")
MAX_SITUATION_CHARS = 3000
ResponseFormat = Literal["auto", "json_schema", "json_object", "prefix", "none"]


class GenerateError(RuntimeError):
    """Generation cannot start or go on; one line that says why. What is done stays done (a
    run that stopped carries its `GenerateSummary` as ``summary``)."""

    summary: GenerateSummary | None = None


# -- inputs ------------------------------------------------------------------------------------

Choices = list[str]


class Factors(BaseModel):
    """situation_factors.json: the values each factor is drawn from."""

    model_config = ConfigDict(extra="forbid")
    role_of_user: Choices = Field(min_length=1)
    impact_factor: Choices = Field(min_length=1)
    topic: Choices = Field(min_length=1)

    @field_validator("role_of_user", "impact_factor", "topic")
    @classmethod
    def _non_empty(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values) or len(set(values)) != len(values):
            raise ValueError("values must be non-empty and distinct")
        return values


class Variations(BaseModel):
    """prompt_variations.json: each variation's values, name -> instruction (``length``: name ->
    the number of words)."""

    model_config = ConfigDict(extra="forbid")
    prompt_style: dict[str, str] = Field(min_length=1)
    tone: dict[str, str] = Field(min_length=1)
    language: dict[str, str] = Field(min_length=1)
    length: dict[str, str] = Field(min_length=1)

    @field_validator("length")
    @classmethod
    def _words(cls, values: dict[str, str]) -> dict[str, str]:
        for name, words in values.items():
            if not (words.isdigit() and int(words) > 0):
                raise ValueError(f"{name!r}: a number of words, got {words!r}")
        return values


def _read_json_model(path: Path, model: type[BaseModel], flag: str):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise GenerateError(f"cannot read {flag} {path}: {error}") from None
    except ValueError as error:
        raise GenerateError(f"{path}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise GenerateError(f"{path}: expected a JSON object of {', '.join(model.model_fields)}")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(map(str, first["loc"]))
        if first["type"] == "extra_forbidden":
            problem = f"unknown field (expected {', '.join(model.model_fields)})"
        elif first["type"] == "missing":
            problem = "missing"
        else:
            problem = first["msg"]
        raise GenerateError(f"{path}: field {field!r}: {problem}") from None


def load_factors(path: str | os.PathLike | None = None) -> tuple[Path, Factors]:
    """(path, factors) of `path`, else of the data roots' ``mup/situation_factors.json``."""
    found = find_input(FACTORS_PATH, path, "situation factors", "--factors", GenerateError)
    return found, _read_json_model(found, Factors, "--factors")


def load_variations(path: str | os.PathLike | None = None) -> tuple[Path, Variations]:
    """(path, variations) of `path`, else of the data roots' ``mup/prompt_variations.json``."""
    found = find_input(VARIATIONS_PATH, path, "prompt variations", "--variations", GenerateError)
    return found, _read_json_model(found, Variations, "--variations")


# -- what is asked ----------------------------------------------------------------------------


def _draw(seed: int, *key: object) -> random.Random:
    """A generator of its own for each item: draws do not depend on what else is drawn."""
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclasses.dataclass(frozen=True)
class PairSpec:
    index: int
    pair_id: str
    topic: str
    role_of_user: str
    impact_factor: str

    @property
    def factors(self) -> dict[str, str]:
        return {
            "topic": self.topic,
            "role_of_user": self.role_of_user,
            "impact_factor": self.impact_factor,
        }


def pair_specs(factors: Factors, n_pairs: int, seed: int) -> list[PairSpec]:
    """The first `n_pairs` pairs of a seed (pair k does not depend on n_pairs)."""
    out = []
    for k in range(n_pairs):
        rng = _draw(seed, "pair", k)
        topic = rng.choice(factors.topic)
        role = rng.choice(factors.role_of_user)
        impact = rng.choice(factors.impact_factor)
        digest = hashlib.sha256(f"{seed}:{k}:{topic}:{role}:{impact}".encode()).hexdigest()
        out.append(PairSpec(k, digest[:10], topic, role, impact))
    return out


def variation(variations: Variations, seed: int, pair_id: str, j: int) -> dict[str, str]:
    """Prompt j's variation, shared by the two situations of the pair."""
    rng = _draw(seed, "prompt", pair_id, j)
    return {name: rng.choice(sorted(getattr(variations, name))) for name in Variations.model_fields}


SYSTEM = (
    "You write realistic material for a data set that teaches monitors to tell high-stakes "
    "from low-stakes interactions between people and an AI assistant. A situation is "
    "high-stakes when mistakes or wrong advice could cause serious, lasting or irreversible "
    "harm (to health, safety, money, rights, reputation or many people); it is low-stakes when "
    "little depends on the outcome and mistakes are easy to undo."
)
HIGH_TEMPLATE = (
    "Write a high-stakes situation.\nTopic: {topic}\nThe people involved: {role_of_user}\n"
    "What makes it high-stakes: {impact_factor}\n\n"
    "Describe it in three to five sentences: who is involved, what they face, and what depends "
    'on the outcome. Answer with only a JSON object: {{"situation": "<the situation>"}}'
)
LOW_TEMPLATE = (
    "Here is a high-stakes situation:\n\n<situation>\n{high}\n</situation>\n\n"
    "Rewrite it as a low-stakes situation: keep the setting, the people and the topic, and "
    "change only what is at stake, so that little depends on the outcome. Three to five "
    'sentences. Answer with only a JSON object: {{"situation": "<the situation>"}}'
)
PROMPT_TEMPLATE = (
    "Here is a situation:\n\n<situation>\n{situation}\n</situation>\n\n"
    "Write the message that someone in this situation sends to an AI assistant, as a "
    "{style}. {tone} {language} About {words} words. Do not say whether the situation is high- "
    'or low-stakes. Answer with only a JSON object: {{"prompt": "<the message>"}}'
)


MIN_WORDS = {"situation": 5, "prompt": 3}  # fewer is not a situation / a prompt


def _words(text: str, least: int, field: str) -> str:
    text = text.strip()
    if len(text.split()) < least:
        raise ValueError(f"the {field} needs at least {least} words")
    return text


class SituationAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    situation: str = Field(max_length=MAX_SITUATION_CHARS)

    @field_validator("situation")
    @classmethod
    def _long_enough(cls, text: str) -> str:
        return _words(text, MIN_WORDS["situation"], "situation")


class PromptAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(max_length=MAX_SITUATION_CHARS)

    @field_validator("prompt")
    @classmethod
    def _long_enough(cls, text: str) -> str:
        return _words(text, MIN_WORDS["prompt"], "prompt")


def words_pattern(least: int) -> str:
    """A JSON Schema `pattern` of at least `least` whitespace-separated words: the validator's
    rule, so that an endpoint that constrains decoding (mup serve, vLLM) cannot close the
    string early (small models often stop after two or three words). Anchored: JSON Schema
    searches a pattern, grammar engines match it whole, and both read this one the same way."""
    return rf"^\s*\S+(\s+\S+){{{least - 1},}}\s*$"


def _schema(name: str, field: str) -> dict[str, Any]:
    return {
        "name": name,
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {field: {"type": "string", "pattern": words_pattern(MIN_WORDS[field])}},
            "required": [field],
            "additionalProperties": False,
        },
    }


@dataclasses.dataclass(frozen=True)
class Ask:
    """One kind of answer: its pydantic model, the JSON field, the schema and the prefix."""

    model: type[BaseModel]
    field: str

    @property
    def schema(self) -> dict[str, Any]:
        return _schema(f"synthetic_{self.field}", self.field)

    @property
    def prefix(self) -> str:
        return f'{{"{self.field}": "'

    def parse(self, fmt: str, text: str) -> str:
        if fmt == "prefix":
            answer = continued(self.prefix, text, self.model, self.field)
        else:
            answer = first_valid(text, self.model)
        return getattr(answer, self.field)


SITUATION, PROMPT = Ask(SituationAnswer, "situation"), Ask(PromptAnswer, "prompt")


# -- the run -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """What to generate and how it is asked.

    n_situations: situations in all (even: they come in high/low pairs).
    prompts_per_situation: K prompts per situation.
    max_retries: invalid answers asked again before the item is rejected.
    max_tokens: a situation answer's bound; a prompt's is 4 tokens a word of its length + 64
      (enough for languages that take several tokens a word), unless prompt_max_tokens is set.
    response_format: auto walks json_schema, json_object, prefix, none as the endpoint refuses
      each; a named one is used or the run stops.
    retry_rejects: ask again (with more attempts) for the rejected items.
    factors_sha256 / variations_sha256: of the input files, for provenance.
    """

    factors: Factors
    variations: Variations
    n_situations: int
    prompts_per_situation: int = 2
    seed: int = 0
    max_retries: int = 3
    temperature: float = 1.0
    max_tokens: int = 320
    prompt_max_tokens: int | None = None
    response_format: ResponseFormat = "auto"
    retry_rejects: bool = False
    factors_sha256: str = ""
    variations_sha256: str = ""

    def __post_init__(self):
        if self.n_situations < 2 or self.n_situations % 2:
            raise ValueError(
                f"--n-situations must be even and at least 2 (situations come in high/low "
                f"pairs), got {self.n_situations}"
            )
        if self.prompts_per_situation < 1 or self.max_retries < 0 or self.max_tokens < 1:
            raise ValueError("prompts per situation and max_tokens must be positive, retries >= 0")

    @property
    def n_pairs(self) -> int:
        return self.n_situations // 2

    def prompt_tokens(self, words: int) -> int:
        return self.prompt_max_tokens or 4 * words + 64

    @property
    def prompt_sha256(self) -> str:
        text = "\n\n".join((SYSTEM, HIGH_TEMPLATE, LOW_TEMPLATE, PROMPT_TEMPLATE))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def settings(self) -> str:
        """What a file's items must share: the draws, the inputs and the sampling."""
        return (
            f"seed={self.seed} temperature={self.temperature:g} max_tokens={self.max_tokens} "
            f"prompt_max_tokens={self.prompt_max_tokens} factors={self.factors_sha256} "
            f"variations={self.variations_sha256}"
        )


def sidecar(out: Path, kind: str) -> Path:
    """``data.jsonl`` -> ``data.<kind>.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.jsonl' else out.name}.{kind}.jsonl")


@dataclasses.dataclass
class GenerateSummary:
    """What a generation run did, and what its files hold."""

    out: Path
    situations: Path
    rejects: Path
    n_pairs: int
    n_prompts_wanted: int
    done: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    invalid: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_prompts: int = 0  # prompts not asked: their situation was rejected
    n_situations_total: int = 0
    n_prompts_total: int = 0
    n_rejected_total: int = 0
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    usage: dict[str, int] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    response_format: str = ""  # the format the run ended on (after any step-downs)
    notes: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())) or "none"
        by = ", ".join
        out = [
            f"{self.out}: {self.n_prompts_total} of {self.n_prompts_wanted} prompts ({labels}); "
            f"{self.n_situations_total} of {2 * self.n_pairs} situations in {self.situations}",
            f"this run: done {by(f'{s} {self.done[s]}' for s in STAGES)}; invalid answers "
            f"{by(f'{s} {self.invalid[s]}' for s in STAGES)}; rejected items "
            f"{by(f'{s} {self.rejected[s]}' for s in STAGES)}; in {self.elapsed_s:.1f}s",
        ]
        if self.skipped_prompts:
            out.append(f"{self.skipped_prompts} prompts not asked: their situation was rejected")
        if self.n_rejected_total:
            out.append(
                f"{self.n_rejected_total} rejected items in all (raw answers): {self.rejects}"
            )
        if self.usage:
            out.append(usage_line(self.usage))
        if self.response_format:
            out.append(f"response format: {self.response_format}")
        return out + self.notes


@dataclasses.dataclass(frozen=True)
class Item:
    """One answer to get: an id, its stage, the user message and the row it completes."""

    id: str
    stage: str
    user: str
    ask: Ask
    max_tokens: int
    row: dict[str, Any]
    first_attempt: int


class Generator:
    """Gets one item's valid answer, retrying invalid ones; thread-safe."""

    def __init__(self, endpoint, config: GenerateConfig, record_invalid: Callable[[dict], None]):
        self.endpoint = endpoint
        self.config = config
        self.options = Negotiator(FORMATS, config.response_format, error=GenerateError)
        self.record_invalid = record_invalid
        self.provenance = {
            "gen_model": endpoint.model,
            "gen_prompt_sha256": config.prompt_sha256,
            "gen_settings": config.settings,
        }

    def _build(self, item: Item, seed: int, fmt: str, _top: int):
        kwargs, extra = request_options(fmt, item.ask.schema, item.ask.prefix)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item.user}]
        kwargs.update(max_tokens=item.max_tokens, temperature=self.config.temperature, seed=seed)
        return messages + extra, kwargs

    def __call__(self, item: Item) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(row, None) for a valid answer; (None, reject row) for a rejected item."""
        last = item.first_attempt + self.config.max_retries
        for attempt in range(item.first_attempt, last + 1):
            seed = int(hashlib.sha256(f"{self.config.seed}:{item.id}:{attempt}".encode())
                       .hexdigest()[:8], 16) % (1 << 31)  # fmt: skip
            try:
                response, (fmt, _) = send(
                    self.endpoint,
                    self.options,
                    lambda f, t, s=seed: self._build(item, s, f, t),
                    error=GenerateError,
                    what=f"{item.stage} {item.id!r}",
                )
            except Refused as refused:
                return None, self._reject(item, attempt, "request", str(refused), None, True)
            choice = response.choices[0] if response.choices else None
            text = (choice.message.content or "") if choice is not None else ""
            try:
                value = item.ask.parse(fmt, text)
                if item.stage == "low" and value == item.row.get("high_situation"):
                    raise ValueError("the low-stakes situation repeats the high-stakes one")
            except ValueError as error:
                problem = str(error)
                if choice is not None and choice.finish_reason == "length":
                    problem += " (cut at max_tokens)"
                final = attempt == last
                reject = self._reject(item, attempt, "parse", problem, text, final)
                if final:
                    return None, reject
                self.record_invalid(reject)
                continue
            if item.stage == "prompt":
                row = {"inputs": value, **item.row}
            else:
                row = {**item.row, "situation": value}
                row.pop("high_situation", None)
            row.update(self.provenance, gen_format=fmt, gen_attempts=attempt + 1)
            return row, None
        raise AssertionError("unreachable")

    def _reject(self, item, attempt, kind, error, raw, final) -> dict[str, Any]:
        return {
            "ids": item.id,
            "stage": item.stage,
            "attempt": attempt,
            "final": final,
            "kind": kind,
            "error": error,
            "raw": raw,
            **self.provenance,
        }


def _next_attempt(rejects: dict[str, dict], key: str) -> int:
    row = rejects.get(key)
    return 0 if row is None else int(row["attempt"]) + 1


def generate_dataset(
    endpoint,
    config: GenerateConfig,
    out: str | os.PathLike,
    *,
    progress: bool = True,
) -> GenerateSummary:
    """Generate (or continue generating) the data set of `config` into `out` and its two side
    files. Raises `GenerateError` when the endpoint fails for good; what was finished stays."""
    out = Path(out)
    logs = {
        "prompt": JsonlLog(out),
        "situation": JsonlLog(sidecar(out, "situations")),
        "rejects": JsonlLog(sidecar(out, "rejects"), unique=False),
    }
    pairs = pair_specs(config.factors, config.n_pairs, config.seed)
    summary = GenerateSummary(
        out=out,
        situations=logs["situation"].path,
        rejects=logs["rejects"].path,
        n_pairs=len(pairs),
        n_prompts_wanted=config.n_situations * config.prompts_per_situation,
    )
    generator = Generator(endpoint, config, lambda row: None)
    lock = threading.Lock()
    started = time.monotonic()
    usage_before = endpoint.usage.as_dict()
    with contextlib.ExitStack() as stack:
        prompts = logs["prompt"].open(lock=True)
        for log in logs.values():
            stack.callback(log.close)
        situations = logs["situation"].open()
        rejects = logs["rejects"].open(create=False)
        for log, rows in zip(logs.values(), (prompts, situations, rejects), strict=True):
            _check_provenance(rows, log.path, generator.provenance)

        def record_invalid(row: dict) -> None:
            with lock:
                logs["rejects"].append(row)
                rejects[row["ids"]] = row
                summary.invalid[row["stage"]] += 1

        generator.record_invalid = record_invalid

        def todo(key: str) -> bool:
            row = rejects.get(key)
            return not (row is not None and row["final"] and not config.retry_rejects)

        def run(stage: str, items: list[Item], done: dict[str, dict], log: JsonlLog) -> None:
            stop = threading.Event()
            failure = None
            for item, future in endpoint.map(
                generator, items, total=len(items), desc=f"{stage}", progress=progress, stop=stop
            ):
                try:
                    row, reject = future.result()
                except GenerateError as error:
                    failure = failure or error
                    stop.set()  # start nothing more; keep what is running
                    continue
                with lock:
                    if row is not None:
                        log.append(row)
                        done[item.id] = row
                        summary.done[stage] += 1
                    else:
                        logs["rejects"].append(reject)
                        rejects[item.id] = reject
                        summary.invalid[stage] += reject["kind"] == "parse"
                        summary.rejected[stage] += 1
            if failure is not None:
                raise failure

        try:
            for stage in ("high", "low"):
                items = []
                for pair in pairs:
                    key = f"{pair.pair_id}-{stage}"
                    high = situations.get(f"{pair.pair_id}-high")
                    if key in situations or not todo(key) or (stage == "low" and high is None):
                        continue
                    row = {
                        "ids": key,
                        "pair_id": pair.pair_id,
                        "labels": f"{stage}-stakes",
                        **pair.factors,
                    }
                    if stage == "high":
                        user = HIGH_TEMPLATE.format(**pair.factors)
                    else:
                        user = LOW_TEMPLATE.format(high=high["situation"])
                        row["high_situation"] = high["situation"]
                    first = _next_attempt(rejects, key)
                    items.append(Item(key, stage, user, SITUATION, config.max_tokens, row, first))
                run(stage, items, situations, logs["situation"])
            items = []
            for pair in pairs:
                for stage in ("high", "low"):
                    situation = situations.get(f"{pair.pair_id}-{stage}")
                    for j in range(config.prompts_per_situation):
                        key = f"{pair.pair_id}-{stage}-{j}"
                        if key in prompts or not todo(key):
                            continue
                        if situation is None:
                            summary.skipped_prompts += 1
                            continue
                        items.append(_prompt_item(config, pair, stage, j, key, situation, rejects))
            run("prompt", items, prompts, logs["prompt"])
        except GenerateError as error:
            error.summary = summary
            raise
        finally:
            summary.elapsed_s = time.monotonic() - started
            summary.notes = list(generator.options.notes)
            summary.usage = {k: v - usage_before[k] for k, v in endpoint.usage.as_dict().items()}
            if summary.usage.get("requests"):
                summary.response_format = generator.options.current()[0]
            wanted_pairs = {p.pair_id for p in pairs}
            mine = [r for r in prompts.values() if r["pair_id"] in wanted_pairs]
            summary.n_prompts_total = len(mine)
            summary.labels = collections.Counter(r["labels"] for r in mine)
            summary.n_situations_total = sum(
                r["pair_id"] in wanted_pairs for r in situations.values()
            )
            summary.n_rejected_total = sum(
                bool(r["final"]) and key not in prompts and key not in situations
                for key, r in rejects.items()
            )
    return summary


def _prompt_item(config, pair, stage, j, key, situation, rejects) -> Item:
    var = variation(config.variations, config.seed, pair.pair_id, j)
    v = config.variations
    words = int(v.length[var["length"]])
    user = PROMPT_TEMPLATE.format(
        situation=situation["situation"],
        style=v.prompt_style[var["prompt_style"]],
        tone=v.tone[var["tone"]],
        language=v.language[var["language"]],
        words=words,
    )
    row = {
        "ids": key,
        "pair_id": pair.pair_id,
        "labels": f"{stage}-stakes",
        **var,
        **pair.factors,
        "situation_id": situation["ids"],
        "situation": situation["situation"],
    }
    first = _next_attempt(rejects, key)
    return Item(key, "prompt", user, PROMPT, config.prompt_tokens(words), row, first)
