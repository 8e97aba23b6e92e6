"""Derive data sets from data sets: a label-balanced subsample and a train/test split, both of
which keep the records of one pair together.

A *group* is the records that share a ``pair_id`` (in the synthetic training set a pair id names
one pair of high- and low-stakes situations, with every prompt written for either; a group holds
2 to 24 records). A record without a ``pair_id`` is a group of its own. Groups are kept or
dropped whole, so no situation is seen on both sides of a split or half of it in a sample.

Choosing whole groups that add up to an exact count is a subset-sum problem. Groups with the same
composition (the same numbers of high- and low-stakes records, or the same size) are
interchangeable, so `_SubsetSums` searches over compositions with a multiplicity, not over
groups; the seeded generator then decides which groups of each composition are taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from types import MappingProxyType

import numpy as np

from mup.data._records import AMBIGUOUS, HIGH_STAKES, LOW_STAKES, Dataset, Record

# The most bits the reachability sets of one `_SubsetSums` may hold together: 2**31 bits is
# 256 MiB, enough to balance about 5,000 records of each label in pairs; far above the sets this
# project handles, and a clear error instead of swapping beyond it.
MAX_SEARCH_BITS = 1 << 31


class SampleError(ValueError):
    """The data cannot give the sample asked for; the message says why and what is possible."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Balanced:
    """The result of `balance`."""

    records: tuple[Record, ...]  # in file order
    n_high: int  # == n_low
    n_low: int
    n_groups: int  # groups kept (whole)
    n_groups_total: int  # groups with a binary label in the input
    n_ambiguous_dropped: int
    largest: int  # the largest balanced sample that keeps every group whole


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
    """The result of `split_by_pair`: every record of the input on exactly one side."""

    train: tuple[Record, ...]  # in file order, each with ``split = "train"``
    test: tuple[Record, ...]  # in file order, each with ``split = "test"``
    n_groups_train: int
    n_groups_test: int
    largest_group: int  # the test share can miss the fraction by less than this


def group_key(record: Record) -> tuple[str, ...]:
    """The group a record belongs to: its ``pair_id``, or the record alone when it has none."""
    value = record.fields.get("pair_id")
    if value is None or value == "":
        return ("id", record.id)
    if isinstance(value, str):
        return ("pair", value)
    # A list or dict is not hashable; the type name keeps the int 1 apart from the string "1".
    return ("pair", type(value).__name__, json.dumps(value, sort_keys=True))


def groups(records: Sequence[Record]) -> dict[tuple[str, ...], list[Record]]:
    """The records of each group, groups in order of first appearance."""
    out: dict[tuple[str, ...], list[Record]] = {}
    for record in records:
        out.setdefault(group_key(record), []).append(record)
    return out


def balance(dataset: Dataset, *, n: int | None = None, seed: int = 0) -> Balanced:
    """A subsample with as many high- as low-stakes records that keeps every pair whole.

    `n` records in all (even), or the largest such sample when `n` is None. Ambiguous records
    are dropped first (counted in the result); the other records of their pair stay. The same
    seed gives the same sample. Raises `SampleError` when no such sample exists, saying why.
    """
    labelled = [r for r in dataset if r.label is not None]
    if not labelled:
        raise SampleError(f"{dataset.path}: the file has no labels; nothing to balance")
    binary = [r for r in labelled if r.label != AMBIGUOUS]
    n_ambiguous = len(labelled) - len(binary)
    if n is not None and (n < 2 or n % 2):
        raise SampleError(
            f"n must be an even number >= 2 (as many high- as low-stakes records), got {n}"
        )
    by_group = groups(binary)
    composition = {
        key: (
            sum(r.label == HIGH_STAKES for r in members),
            sum(r.label == LOW_STAKES for r in members),
        )
        for key, members in by_group.items()
    }
    n_high = sum(h for h, _ in composition.values())
    n_low = sum(low for _, low in composition.values())
    cap = min(n_high, n_low)
    if cap == 0:
        raise SampleError(
            f"{dataset.path}: {n_high} high-stakes and {n_low} low-stakes records "
            f"(after dropping {n_ambiguous} ambiguous): no balanced sample exists"
        )
    # A total (high, low) is one integer high * width + low: low never exceeds n_low < width,
    # so the two counts never carry into each other.
    width = n_low + 1
    rng = np.random.default_rng(seed)
    sums = _SubsetSums(
        Counter(composition.values()),
        weight=lambda c: c[0] * width + c[1],
        limit=(cap + 1) * width,
        rng=rng,
    )
    largest = 2 * next((k for k in range(cap, 0, -1) if sums.reachable(k * width + k)), 0)
    if n is None:
        if not largest:
            raise SampleError(
                f"{dataset.path}: no set of whole pairs holds as many high- as low-stakes records"
            )
        k = largest // 2
    else:
        k = n // 2
        if not sums.reachable(k * width + k):
            raise SampleError(_why_not(dataset, n, n_high, n_low, largest, sums, width))
    counts = sums.choose(k * width + k)
    chosen = _take(by_group, composition, counts, rng)
    kept = tuple(r for r in binary if group_key(r) in chosen)
    return Balanced(
        records=kept,
        n_high=sum(r.label == HIGH_STAKES for r in kept),
        n_low=sum(r.label == LOW_STAKES for r in kept),
        n_groups=len(chosen),
        n_groups_total=len(by_group),
        n_ambiguous_dropped=n_ambiguous,
        largest=largest,
    )


def _why_not(dataset, n, n_high, n_low, largest, sums, width) -> str:
    if n > largest:
        return (
            f"n={n} is more than possible: {dataset.path} has {n_high} high-stakes and {n_low} "
            f"low-stakes records, and the largest balanced sample of whole pairs has {largest}"
        )
    # Below the largest: some sizes are unreachable with whole pairs (e.g. only pairs of 4).
    k = n // 2
    below = next((j for j in range(k - 1, 0, -1) if sums.reachable(j * width + j)), None)
    above = next(j for j in range(k + 1, largest // 2 + 1) if sums.reachable(j * width + j))
    nearest = " or ".join(str(2 * j) for j in (below, above) if j is not None)
    return (
        f"no balanced sample of exactly {n} records keeps every pair of {dataset.path} whole; "
        f"the nearest sizes that do are {nearest}"
    )


def split_by_pair(dataset: Dataset, *, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Split every record into train and test by group: no pair on both sides.

    The test side gets the whole groups whose sizes add up closest to ``test_fraction`` of the
    records (so within one group of the fraction); which groups, the seed decides. Both sides
    carry a ``split`` field ("train" / "test"), replacing any the input had. Ambiguous and
    unlabelled records are split like the others.
    """
    if not 0 < test_fraction < 1:
        raise SampleError(
            f"the test fraction must lie strictly between 0 and 1, got {test_fraction}"
        )
    by_group = groups(dataset)
    size = {key: len(members) for key, members in by_group.items()}
    total = len(dataset)
    if len(by_group) < 2:
        raise SampleError(
            f"{dataset.path}: all {total} records share one pair_id; nothing to split by pair"
        )
    rng = np.random.default_rng(seed)
    sums = _SubsetSums(Counter(size.values()), weight=lambda s: s, limit=total + 1, rng=rng)
    target = test_fraction * total
    # Both sides non-empty; among equally close sizes the smaller test side (the fraction is
    # usually a budget for held-out data).
    n_test = min(
        (s for s in range(1, total) if sums.reachable(s)), key=lambda s: (abs(s - target), s)
    )
    chosen = _take(by_group, size, sums.choose(n_test), rng)
    train = tuple(_with_split(r, "train") for r in dataset if group_key(r) not in chosen)
    test = tuple(_with_split(r, "test") for r in dataset if group_key(r) in chosen)
    return Split(
        train=train,
        test=test,
        n_groups_train=len(by_group) - len(chosen),
        n_groups_test=len(chosen),
        largest_group=max(size.values()),
    )


def _with_split(record: Record, name: str) -> Record:
    return dataclasses.replace(record, fields=MappingProxyType({**record.fields, "split": name}))


def _take(by_group, composition, counts: Counter, rng: np.random.Generator) -> set:
    """`counts[c]` groups of each composition `c`, drawn at random from the groups that have it."""
    by_composition: dict[Hashable, list] = {}
    for key in by_group:  # file order, so that the seed alone decides the draw
        by_composition.setdefault(composition[key], []).append(key)
    chosen: set = set()
    for c, keys in by_composition.items():
        if counts[c]:
            picks = rng.choice(len(keys), size=counts[c], replace=False)
            chosen.update(keys[i] for i in picks)
    return chosen


class _SubsetSums:
    """Which totals a choice of groups can reach, and one choice for a reachable total.

    `kinds` maps a composition to how many groups have it; `weight` turns a composition into an
    integer (its size, or a packed (high, low) pair). A composition with c groups becomes items
    of 1, 2, 4, ..., and the remainder copies (binary splitting: every count 0..c is a sum of
    distinct items), so the search has ~sum(log2 c) items. Reachable totals are the set bits of
    a Python int (one shift-or per item), cut at `limit` bits. Walking back needs the set before
    each item; the sets are kept every `block` items and the rest recomputed, so memory grows as
    the square root of the number of items.
    """

    def __init__(
        self,
        kinds: Counter,
        *,
        weight: Callable[[Hashable], int],
        limit: int,
        rng: np.random.Generator,
    ):
        self._items: list[tuple[Hashable, int, int]] = []  # (composition, copies, weight)
        for composition in sorted(kinds):  # sorted: the search must not depend on dict order
            count, copies = kinds[composition], 1
            while count > 0:
                take = min(copies, count)
                self._items.append((composition, take, take * weight(composition)))
                count -= take
                copies *= 2
        self._mask = (1 << limit) - 1
        self._block = max(1, math.isqrt(len(self._items)))
        if limit * (len(self._items) // self._block + self._block + 2) > MAX_SEARCH_BITS:
            raise SampleError(
                f"too many records for an exact search over whole pairs ({limit:,} totals x "
                f"{len(self._items)} group kinds); sample the file down first"
            )
        self._rng = rng
        self._checkpoints = []  # the set before items 0, block, 2 * block, ...
        reach = 1  # the empty choice reaches total 0
        for i, (_, _, w) in enumerate(self._items):
            if i % self._block == 0:
                self._checkpoints.append(reach)
            reach = (reach | (reach << w)) & self._mask
        self._final = reach

    def reachable(self, total: int) -> bool:
        return total >= 0 and bool((self._final >> total) & 1)

    def choose(self, total: int) -> Counter:
        """How many groups of each composition make `total` (which must be reachable). Where an
        item can be taken or left, a coin flip of the generator decides."""
        if not self.reachable(total):
            raise ValueError(f"total {total} is not reachable")
        counts: Counter = Counter()
        for start in reversed(range(0, len(self._items), self._block)):
            before = [self._checkpoints[start // self._block]]  # before[j]: set before item start+j
            stop = min(start + self._block, len(self._items))
            for i in range(start, stop - 1):
                r = before[-1]
                before.append((r | (r << self._items[i][2])) & self._mask)
            for i in reversed(range(start, stop)):
                composition, copies, w = self._items[i]
                reach = before[i - start]
                leave = bool((reach >> total) & 1)
                take = total >= w and bool((reach >> (total - w)) & 1)
                if take and (not leave or self._rng.random() < 0.5):
                    counts[composition] += copies
                    total -= w
        assert total == 0, "walked back to a nonzero total: the sets are inconsistent"
        return counts
