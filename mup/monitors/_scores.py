"""Score files: one per-record format that every monitor writes (probes, prompted and finetuned
LLMs, cascades), so any two can be compared, cascaded and plotted.

A score file is jsonl, one object per record:

  * ``id`` (str): the record id, unique within (``dataset``, ``monitor``);
  * ``dataset`` (str): the evaluation set, e.g. ``dev/anthropic``;
  * ``label`` (int): 1 high stakes, 0 low stakes, -1 unlabelled or ambiguous;
  * ``score`` (float in [0, 1]): the monitor's P(high stakes);
  * ``monitor`` (str): who scored it, ``kind:detail`` (``probe:attention@20``,
    ``prompted:smollm2-135m/single_word``, ``finetuned:smollm2-135m``);
  * ``flops`` (float >= 0): the estimated cost of scoring this record (`mup.monitors.flops`);
  * ``n_tokens`` (int >= 0): the tokens the monitor read;
  * anything else is kept as monitor-specific fields (the two log-likelihoods, the generated
    text, ``valid``: false for an answer that could not be parsed, which is scored 0.5 and
    counted, never dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from mup import metrics
from mup.data import jsonl_objects

__all__ = [
    "ScoreFileError",
    "Scores",
    "label_of",
    "read_scores",
    "score_row",
    "write_scores",
]


class ScoreFileError(ValueError):
    """A score file is malformed; the message names the file, the line and the field."""


class _Row(pydantic.BaseModel):
    """The schema of one line (monitor-specific extra fields are allowed and kept)."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)

    id: str = pydantic.Field(min_length=1)
    dataset: str = pydantic.Field(min_length=1)
    label: int = pydantic.Field(ge=-1, le=1)
    score: float = pydantic.Field(ge=0.0, le=1.0, allow_inf_nan=False)
    monitor: str = pydantic.Field(min_length=1)
    flops: float = pydantic.Field(ge=0.0, allow_inf_nan=False)
    n_tokens: int = pydantic.Field(ge=0)

    @pydantic.field_validator("score", "flops", mode="before")
    @classmethod
    def _int_is_a_float(cls, value):  # strict mode would refuse a JSON 1 for a float field
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def score_row(
    *,
    id: str,
    dataset: str,
    label: int,
    score: float,
    monitor: str,
    flops: float,
    n_tokens: int,
    **extra: Any,
) -> dict[str, Any]:
    """One validated score-file row (raises `ScoreFileError` naming the bad field)."""
    row = dict(
        id=id,
        dataset=dataset,
        label=int(label),
        score=float(score),
        monitor=monitor,
        flops=float(flops),
        n_tokens=int(n_tokens),
        **extra,
    )
    try:
        _Row.model_validate(row)
    except pydantic.ValidationError as err:
        raise ScoreFileError(f"score row for record {id!r}: {_describe(err)}") from None
    return row


def _describe(err: pydantic.ValidationError) -> str:
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(row)"
        problems.append(f"field {field!r}: {e['msg']} (got {e.get('input')!r:.60})")
    return "; ".join(problems)


@dataclasses.dataclass(frozen=True)
class Scores:
    """The rows of one or more score files, with column arrays (N rows)."""

    rows: tuple[Mapping[str, Any], ...]
    source: str = "<memory>"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r["id"] for r in self.rows)

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        """(dataset, id) per row: what identifies a record across monitors."""
        return tuple((r["dataset"], r["id"]) for r in self.rows)

    @property
    def datasets(self) -> tuple[str, ...]:
        """The evaluation sets, in order of first appearance."""
        return tuple(dict.fromkeys(r["dataset"] for r in self.rows))

    @property
    def monitors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r["monitor"] for r in self.rows))

    @property
    def monitor(self) -> str:
        """The one monitor of these rows (an error when they mix monitors)."""
        if len(self.monitors) != 1:
            raise ScoreFileError(f"{self.source}: expected one monitor, found {self.monitors}")
        return self.monitors[0]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.rows], np.int64)

    @property
    def scores(self) -> np.ndarray:
        return np.array([r["score"] for r in self.rows], np.float64)

    @property
    def flops(self) -> np.ndarray:
        return np.array([r["flops"] for r in self.rows], np.float64)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([r["n_tokens"] for r in self.rows], np.int64)

    @property
    def valid(self) -> np.ndarray:
        return np.array([bool(r.get("valid", True)) for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, *, dataset: str | None = None, monitor: str | None = None) -> Scores:
        rows = tuple(
            r
            for r in self.rows
            if (dataset is None or r["dataset"] == dataset)
            and (monitor is None or r["monitor"] == monitor)
        )
        return Scores(rows, self.source)

    def evaluate(self, *, fpr: float = 0.01) -> dict[str, dict[str, float]]:
        """`mup.metrics.evaluate` per (monitor, dataset), plus the mean FLOPs per record and the
        count of invalid answers. Keys: ``monitor`` -> ``dataset`` -> metrics."""
        out: dict[str, dict[str, float]] = {}
        for monitor in self.monitors:
            out[monitor] = {}
            for dataset in self.select(monitor=monitor).datasets:
                part = self.select(monitor=monitor, dataset=dataset)
                result = metrics.evaluate(part.scores, part.labels, fpr=fpr)
                result["mean_flops"] = float(part.flops.mean())
                result["mean_tokens"] = float(part.n_tokens.mean())
                result["n_invalid"] = int((~part.valid).sum())
                out[monitor][dataset] = result
        return out

    def aligned_with(self, other: Scores) -> tuple[Scores, Scores]:
        """Both restricted to the records they share, in this one's order (labels must agree)."""
        theirs = {key: row for key, row in zip(other.keys, other.rows, strict=True)}
        mine, matched = [], []
        for key, row in zip(self.keys, self.rows, strict=True):
            if key in theirs:
                if theirs[key]["label"] != row["label"]:
                    raise ScoreFileError(
                        f"record {key[1]!r} of {key[0]!r} is labelled {row['label']} in "
                        f"{self.source} but {theirs[key]['label']} in {other.source}"
                    )
                mine.append(row)
                matched.append(theirs[key])
        if not mine:
            raise ScoreFileError(
                f"{self.source} and {other.source} share no (dataset, id) record; were they "
                "scored on the same data sets?"
            )
        return Scores(tuple(mine), self.source), Scores(tuple(matched), other.source)


def read_scores(*paths: str | os.PathLike) -> Scores:
    """Read and validate score files (a folder means every ``*.jsonl`` in it). Raises
    `ScoreFileError` naming file, line and field; duplicate (monitor, dataset, id) is an error."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ScoreFileError(f"{p}: a folder with no *.jsonl score file in it")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ScoreFileError(f"{p}: no such score file or folder")
    rows: list[Mapping[str, Any]] = []
    seen: dict[tuple[str, str, str], str] = {}
    for path in files:
        for where, obj in validated_lines(path, _Row, ScoreFileError):
            key = (obj["monitor"], obj["dataset"], obj["id"])
            if key in seen:
                raise ScoreFileError(
                    f"{where}: duplicate record {obj['id']!r} of {obj['dataset']!r} for "
                    f"monitor {obj['monitor']!r}, first at {seen[key]}"
                )
            seen[key] = where
            rows.append(obj)
    if not rows:
        raise ScoreFileError(f"{', '.join(map(str, files))}: no score rows")
    return Scores(tuple(rows), ", ".join(map(str, files)))


def validated_lines(path: Path, schema: type[pydantic.BaseModel], error: type[Exception]):
    """(``file:line``, object) for every non-blank line of a jsonl file, each checked against
    `schema`; `error` names the file, the line and the field of the first bad one."""
    for where, obj in jsonl_objects(path, error):
        try:
            schema.model_validate(obj)
        except pydantic.ValidationError as err:
            raise error(f"{where}: {_describe(err)}") from None
        yield where, obj


def write_scores(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (from `score_row`) to a jsonl score file atomically: a crash leaves the old
    file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def label_of(record) -> int:
    """The score-file label of a `mup.data.Record`: 1 / 0, and -1 for ambiguous or missing."""
    return record.label if record.label in (0, 1) else -1
