"""Records that two data sets share, by exact and by normalised conversation text.

A record is compared by its *rendered* conversation: every message as ``role: content``,
joined by blank lines, so a plain-text record equals the same text given as one user message,
but a text that is a user turn in one set and an assistant turn in the other does not match.
The normalised form (`normalise`) folds Unicode compatibility forms (NFKC), case, punctuation
(every character of a Unicode P* category is removed) and runs of whitespace, which catches
copies that were re-cased, re-spaced or re-punctuated on their way into another set; anything
else (one changed word) is not a duplicate.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from mup.data._records import Record

# Example id pairs kept per kind of match: enough to look a few up by hand.
N_EXAMPLES = 5


def rendered(record: Record) -> str:
    """The conversation as one text: ``role: content`` per message, blank lines between."""
    return "\n\n".join(f"{m.role}: {m.content}" for m in record.messages)


def normalise(text: str) -> str:
    """`text` with compatibility forms, case, punctuation and whitespace folded."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Matches:
    """Records of A and B whose keys (exact or normalised text) are equal."""

    n_a: int  # records of A with a match in B
    n_b: int  # records of B with a match in A
    n_pairs: int  # (a, b) pairs with equal keys
    n_texts: int  # distinct shared keys
    n_label_mismatch: int  # pairs whose labels differ (both labelled)
    examples: tuple[tuple[str, str], ...]  # (id in A, id in B), the first N_EXAMPLES pairs

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "examples": [list(pair) for pair in self.examples]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Overlap:
    """What `overlap` found: exact matches, normalised matches (which include the exact ones),
    and the normalised matches that are not exact."""

    a: str
    b: str
    n_a_records: int
    n_b_records: int
    exact: Matches
    normalised: Matches
    normalised_only: Matches

    @property
    def any(self) -> bool:
        return self.normalised.n_pairs > 0

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("a", "b", "n_a_records", "n_b_records")}
        for kind in ("exact", "normalised", "normalised_only"):
            out[kind] = getattr(self, kind).as_dict()
        return out


def overlap(a: Sequence[Record], b: Sequence[Record], *, a_name: str = "A", b_name: str = "B"):
    """The records `a` and `b` share, by exact and by normalised rendered text."""
    exact_a = [rendered(r) for r in a]
    exact_b = [rendered(r) for r in b]
    norm_a = [normalise(t) for t in exact_a]
    norm_b = [normalise(t) for t in exact_b]

    def pairs(keys_a, keys_b, keep: Callable[[int, int], bool] = lambda i, j: True):
        index: dict[str, list[int]] = {}
        for j, key in enumerate(keys_b):
            index.setdefault(key, []).append(j)
        return [(i, j) for i, key in enumerate(keys_a) for j in index.get(key, ()) if keep(i, j)]

    exact = pairs(exact_a, exact_b)
    normalised = pairs(norm_a, norm_b)
    only = pairs(norm_a, norm_b, lambda i, j: exact_a[i] != exact_b[j])
    return Overlap(
        a=a_name,
        b=b_name,
        n_a_records=len(a),
        n_b_records=len(b),
        exact=_matches(exact, a, b, exact_a),
        normalised=_matches(normalised, a, b, norm_a),
        normalised_only=_matches(only, a, b, norm_a),
    )


def _matches(pairs: list[tuple[int, int]], a, b, keys_a: list[str]) -> Matches:
    return Matches(
        n_a=len({i for i, _ in pairs}),
        n_b=len({j for _, j in pairs}),
        n_pairs=len(pairs),
        n_texts=len({keys_a[i] for i, _ in pairs}),
        n_label_mismatch=sum(
            a[i].label is not None and b[j].label is not None and a[i].label != b[j].label
            for i, j in pairs
        ),
        examples=tuple((a[i].id, b[j].id) for i, j in pairs[:N_EXAMPLES]),
    )


def format_overlap(result: Overlap) -> str:
    """`overlap`'s result as a text report."""
    lines = [
        f"A: {result.a} ({result.n_a_records} records)",
        f"B: {result.b} ({result.n_b_records} records)",
    ]
    for title, m in (
        ("exact text", result.exact),
        ("normalised text", result.normalised),
        ("  of which not exact", result.normalised_only),
    ):
        line = (
            f"{title + ':':<22}{m.n_a:>6} records of A, {m.n_b:>6} of B, {m.n_pairs} pairs, "
            f"{m.n_texts} distinct texts, {m.n_label_mismatch} with different labels"
        )
        if m.examples:
            line += "; e.g. " + ", ".join(f"{x}={y}" for x, y in m.examples)
        lines.append(line)
    return "\n".join(lines)
