"""What a stakes data set holds: labels, lengths, and the label balance of each variation field.

`dataset_stats` returns plain data (the ``--json`` output of ``mup data stats``);
`format_stats` renders it as text. Lengths are summarised as min / median / p95 / max, the
median and p95 by numpy's default (linear) interpolation, per label as well as over all
records: a length that differs by label is a shortcut a probe can learn instead of stakes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mup.data._records import AMBIGUOUS, HIGH_STAKES, LOW_STAKES, Dataset, Record

# The fields the upstream generator varies (and the training set's split): always reported.
VARIATION_FIELDS = ("prompt_style", "tone", "language", "length", "topic", "split")
# Any other field is reported when it has 2..MAX_LEVELS distinct scalar values: enough for
# categories such as tone (4) or an eval set's source category, while ids, timestamps and
# free-text explanations (hundreds of values) stay out.
MAX_LEVELS = 12
# Label columns of the per-value tables, in order.
_LABELS = (("high-stakes", HIGH_STAKES), ("low-stakes", LOW_STAKES), ("ambiguous", AMBIGUOUS))
MISSING = "(missing)"
# Values longer than this are cut in the text report (the JSON keeps them whole).
_MAX_SHOWN = 60


def dataset_stats(
    dataset: Dataset,
    *,
    token_lengths: Sequence[int] | np.ndarray | None = None,
    token_model: str | None = None,
) -> dict[str, Any]:
    """Counts and lengths of `dataset` as a JSON-ready dict.

    `token_lengths` (int [N], one per record, e.g. ``encode_chats(...).lengths``) adds token
    statistics; `token_model` names the tokenizer they came from.
    """
    labels = [r.label for r in dataset]
    label_counts = {name: labels.count(code) for name, code in _LABELS}
    label_counts["unlabelled"] = labels.count(None)
    chars = np.array([len(r.text) for r in dataset], dtype=np.int64)  # [N]
    lengths = {"characters": _by_label(chars, labels)}
    if token_lengths is not None:
        tokens = np.asarray(token_lengths, dtype=np.int64)  # [N]
        if tokens.shape != (len(dataset),):
            raise ValueError(f"token_lengths has shape {tokens.shape}, expected ({len(dataset)},)")
        lengths["tokens"] = _by_label(tokens, labels)
    return {
        "path": str(dataset.path),
        "sha256": dataset.sha256,
        "records": len(dataset),
        "labels": label_counts,
        "lengths": lengths,
        "tokens_model": token_model if token_lengths is not None else None,
        "fields": {name: _field_table(dataset, name) for name in variation_fields(dataset)},
    }


def variation_fields(records: Sequence[Record]) -> list[str]:
    """The fields to tabulate: `VARIATION_FIELDS` that occur, then any other field with
    2..MAX_LEVELS distinct scalar values, in order of first appearance."""
    seen = dict.fromkeys(name for r in records for name in r.fields)
    out = [name for name in VARIATION_FIELDS if name in seen]
    for name in seen:
        if name in out:
            continue
        values = [r.fields[name] for r in records if name in r.fields]
        if (
            all(_scalar(v) for v in values)
            and 2 <= len({_value_key(v) for v in values}) <= MAX_LEVELS
        ):
            out.append(name)
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _value_key(value: Any) -> str:
    # Strings as they are; true/1/null etc. in their JSON spelling, so the keys stay distinct
    # from the strings "True" or "1" and the table survives a JSON round trip.
    return value if isinstance(value, str) else json.dumps(value)


def _summary(values: np.ndarray) -> dict[str, float | int] | None:
    if not len(values):
        return None
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def _by_label(values: np.ndarray, labels: list[int | None]) -> dict[str, Any]:
    codes = np.array([-1 if label is None else label for label in labels])  # [N]
    out = {"all": _summary(values)}
    for name, code in _LABELS[:2]:
        summary = _summary(values[codes == code])
        if summary is not None:
            out[name] = summary
    return out


def _field_table(records: Sequence[Record], name: str) -> dict[str, dict[str, int]]:
    """value -> {"n", "high-stakes", "low-stakes", "ambiguous"}, the most common value first."""
    counts: Counter = Counter()
    per_label: dict[str, Counter] = {}
    for record in records:
        key = _value_key(record.fields[name]) if name in record.fields else MISSING
        counts[key] += 1
        per_label.setdefault(key, Counter())[record.label] += 1
    return {
        key: {"n": n, **{label: per_label[key][code] for label, code in _LABELS}}
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    }


def format_stats(stats: Mapping[str, Any]) -> str:
    """`dataset_stats` as a text report."""
    labels = stats["labels"]
    binary = labels["high-stakes"] + labels["low-stakes"]
    lines = [f"{stats['path']}: {stats['records']} records (sha256 {stats['sha256'][:12]})"]
    parts = [f"{name} {labels[name]}" for name in ("high-stakes", "low-stakes")]
    if binary:
        parts[0] += f" ({labels['high-stakes'] / binary:.1%} of binary)"
    parts += [f"{name} {labels[name]}" for name in ("ambiguous", "unlabelled") if labels[name]]
    lines += ["labels: " + ", ".join(parts), ""]

    lines.append(f"{'length':<24}{'min':>8}{'median':>10}{'p95':>10}{'max':>8}")
    for unit, rows in stats["lengths"].items():
        title = unit if unit != "tokens" else f"tokens ({stats['tokens_model']}, chat template)"
        lines.append(title)
        for label, s in rows.items():
            if s is not None:
                lines.append(
                    f"  {label:<22}{s['min']:>8}{s['median']:>10.1f}{s['p95']:>10.1f}{s['max']:>8}"
                )
    for name, table in stats["fields"].items():
        width = min(_MAX_SHOWN, max(22, *(len(v) for v in table))) + 2
        lines += ["", f"{name} ({len(table)} value{'s' if len(table) != 1 else ''})"]
        lines.append(f"  {'value':<{width}}{'n':>6}{'high':>7}{'low':>7}{'amb':>6}{'high%':>8}")
        for value, row in table.items():
            pair = row["high-stakes"] + row["low-stakes"]
            share = f"{row['high-stakes'] / pair:.1%}" if pair else "-"
            counts = f"{row['n']:>6}{row['high-stakes']:>7}{row['low-stakes']:>7}"
            lines.append(f"  {_shown(value):<{width}}{counts}{row['ambiguous']:>6}{share:>8}")
    return "\n".join(lines)


def _shown(value: str) -> str:
    value = " ".join(value.split())  # a newline inside a value would break the table
    return value if len(value) <= _MAX_SHOWN else value[: _MAX_SHOWN - 3] + "..."
