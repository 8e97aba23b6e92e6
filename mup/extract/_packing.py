"""Packing: several records per row, each its own segment, so that real tokens fill the batches.

Axis letters: N records, R records in a batch, B rows in a batch, P row length, D model width.

A batch is B rows of P tokens. Each record keeps its tokens whole and contiguous in one row,
starts its rope positions at 0 and is its own segment (`mup.models.forward(..., segments=)`:
attention stays within the segment), so it computes what it would alone, up to float32
rounding. Rows are `row_len` tokens long; a record longer than that opens a longer row of
`row_len * 2**k` tokens, whose free tail shorter records fill. Records go longest first into the
fullest row they fit in (best-fit decreasing), so the compiled shapes are (full batch, P) for
those few row lengths, plus the row counts of the final batches. `token_index` maps a batch's
outputs back to the records' ragged tokens: the stores see each record's own tokens, whatever
row it sat in.

`mup extract --packing auto` picks the row length per data set with a cost model of the forward
(`ForwardCost`, `choose_row_len`): a longer row packs better, but every token in it attends over
more keys (the causal blocks of `mup.models._layers.causal_attention` skip the future key
blocks only, not other records' keys).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from mup.extract._capture import BatchPlanner


@dataclasses.dataclass(frozen=True, eq=False)
class RowBatch:
    """Where each record of one batch sits: row `row[i]`, columns `start[i]` onwards."""

    records: np.ndarray  # int64 [R] record indices, row by row, left to right within a row
    row: np.ndarray  # int64 [R] batch row of each record
    start: np.ndarray  # int64 [R] first column of each record in its row
    n_rows: int  # rows holding records (the batch is rounded up to a row bucket)
    row_len: int  # P
    packed: bool  # rows may hold several records: the forward needs segment ids

    def __len__(self) -> int:
        return int(self.records.size)


def pack_rows(lengths: np.ndarray, row_len: int) -> list[tuple[int, list]]:
    """Rows over items of `lengths`: [(row length, item indices in placement order)].

    Longest item first, each goes to the fullest row with room for it (best fit); with none, a
    new row of `row_len` tokens, or, for an item longer than that, of the smallest
    `row_len * 2**k` that holds it (few long row lengths: each is a compiled shape, and a
    part-filled final batch). Deterministic: ties keep index order.
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (free tokens, row), ascending
    rows: list[tuple[int, list]] = []
    for item in order.tolist():
        size = int(lengths[item])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r][1].append(item)
            bisect.insort(free, (room - size, r))
            continue
        P = row_len
        while size > P:
            P *= 2
        rows.append((P, [item]))
        bisect.insort(free, (P - size, len(rows) - 1))
    return rows


class Packer:
    """Batches of one store's records, window by window (see `mup.extract._run`).

    `row_len` None packs nothing: one record per row, padded to its length bucket
    (`BatchPlanner.plan`; `mup extract --packing off`). A part-filled batch, and the least-filled
    rows of a row length, made only of the current window's records wait for the next window
    (carried once: the writer then holds at most two windows' shards); only the final batches
    can be part-filled.
    """

    def __init__(self, planner: BatchPlanner, row_len: int | None):
        self.planner = planner
        self.row_len = row_len

    def batches(self, lengths: np.ndarray, windows: Sequence[np.ndarray]) -> Iterator[RowBatch]:
        """Every record of `windows` exactly once. lengths [N] tokens per record."""
        carry = np.zeros(0, np.int64)
        for w, window in enumerate(windows):
            pool = np.concatenate([carry, window])
            carried = np.zeros(pool.size, bool)  # [pool]
            carried[: carry.size] = True
            last = w == len(windows) - 1
            plan = self._bucketed if self.row_len is None else self._packed
            waiting = []
            for batch, ready in plan(pool, carried, lengths, last):
                if ready:
                    yield batch
                else:
                    waiting.append(batch.records)
            carry = np.sort(np.concatenate([np.zeros(0, np.int64), *waiting]))

    def _packed(self, records, carried, lengths, last: bool):
        """(batch, ready) over `records` packed into rows, batches of one row length each."""
        rows = pack_rows(lengths[records], self.row_len)
        for P in sorted({P for P, _ in rows}):
            bins = [items for length, items in rows if length == P]
            fill = np.array([lengths[records[b]].sum() for b in bins])  # [rows]
            holds_carried = np.array([carried[b].any() for b in bins])
            # Rows that must go now first, then the fullest: the least-filled rows wait.
            order = np.lexsort((-fill, ~holds_carried))
            full = self.planner.rows_for(P)
            # Whole batches only, unless this is the end: those holding carried rows, and every
            # full one.
            forced = -(-int(holds_carried.sum()) // full) * full
            n_ready = len(bins) if last else min(len(bins), max(len(bins) // full * full, forced))
            for chosen in _deal(order[:n_ready], full):
                yield self._batch(records, [bins[j] for j in chosen], lengths, P, True), True
            if n_ready < len(bins):
                waiting = [bins[j] for j in order[n_ready:]]
                yield self._batch(records, waiting, lengths, P, True), False

    def _bucketed(self, records, carried, lengths, last: bool):
        """(batch, ready) over `records`, one record per row, rows padded to length buckets."""
        for plan in self.planner.plan(lengths[records]):
            ready = (
                last
                or plan.rows.size >= self.planner.rows_for(plan.padded_len)
                or carried[plan.rows].any()  # carried rows go now
            )
            rows = [[int(r)] for r in plan.rows]
            yield self._batch(records, rows, lengths, plan.padded_len, packed=False), ready

    @staticmethod
    def _batch(records, rows: list[list[int]], lengths, row_len: int, packed: bool) -> RowBatch:
        """rows: positions into `records`, per batch row, left to right."""
        per_row = [lengths[records[r]] for r in rows]  # token counts, row by row
        return RowBatch(
            records=np.array([records[i] for r in rows for i in r], np.int64),
            row=np.repeat(np.arange(len(rows)), [len(r) for r in rows]),
            start=np.concatenate([np.cumsum(n) - n for n in per_row]).astype(np.int64),
            n_rows=len(rows),
            row_len=row_len,
            packed=packed,
        )


def _deal(rows: np.ndarray, full: int) -> list[list[int]]:
    """`rows` (fullest first) into batches of `full` rows, the last one holding the rest, dealt
    in turn like cards: every batch gets its share of the emptier rows, none gets all of them."""
    n_batches = -(-len(rows) // full)
    sizes = [full] * (n_batches - 1) + [len(rows) - full * (n_batches - 1)]
    slots = [b for j in range(full) for b in range(n_batches) if j < sizes[b]]
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    for row, b in zip(rows.tolist(), slots, strict=True):
        batches[b].append(row)
    return batches


@dataclasses.dataclass(frozen=True)
class ForwardCost:
    """Relative cost of a capture forward over a batch: matrix products per token, plus
    attention per (query, key) pair that `causal_attention` computes."""

    per_token: float  # FLOPs of the blocks' matrix products per token
    per_pair: float  # FLOPs of both attention products per (query, key) pair, all blocks
    chunk: int  # query block of causal_attention

    @classmethod
    def of(cls, config, n_blocks: int) -> ForwardCost:
        from mup.models._layers import CAUSAL_CHUNK

        # The embedding lookup and the stores' copy cost a little per token even with no block.
        per_token = config.flops_per_token(n_blocks) + 2 * config.d_model
        per_pair = 4.0 * config.n_heads * config.head_dim * n_blocks
        return cls(per_token=per_token, per_pair=per_pair, chunk=CAUSAL_CHUNK)

    def pairs(self, row_len: int) -> int:
        """(query, key) pairs of one row: query block i sees keys [0, its end)."""
        ends = np.minimum(np.arange(self.chunk, row_len + self.chunk, self.chunk), row_len)
        return int((np.diff(np.r_[0, ends]) * ends).sum())

    def __call__(self, n_rows: int, row_len: int) -> float:
        return n_rows * (row_len * self.per_token + self.pairs(row_len) * self.per_pair)


def choose_row_len(
    planner: BatchPlanner,
    lengths: np.ndarray,
    windows: Sequence[np.ndarray],
    cost: Callable[[int, int], float],
    candidates: Sequence[int],
) -> int | None:
    """The row length (or None: no packing) whose batches of these windows cost least."""

    def total(row_len):
        batches = Packer(planner, row_len).batches(lengths, windows)
        return sum(cost(planner.padded_rows(b.n_rows, b.row_len), b.row_len) for b in batches)

    best, best_cost = None, total(None)
    for row_len in candidates:
        if row_len > planner.batch_tokens:
            continue
        c = total(row_len)
        if c < best_cost:
            best, best_cost = row_len, c
    return best


# Row lengths tried: multiples of the causal query block, so no block is ragged.
ROW_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)


def batch_inputs(batch: RowBatch, n_rows: int, offsets: np.ndarray, input_ids: np.ndarray):
    """tokens, valid, positions, segments, each [n_rows, P] (segments None when unpacked)."""
    P = batch.row_len
    tokens = np.zeros((n_rows, P), np.int32)
    valid = np.zeros((n_rows, P), bool)
    if not batch.packed:
        positions = np.broadcast_to(np.arange(P, dtype=np.int32), (n_rows, P))
        segments = None
    else:
        positions = np.zeros((n_rows, P), np.int32)
        segments = np.zeros((n_rows, P), np.int32)  # padding: segment 0, and never valid
    for k, (r, b, s) in enumerate(zip(batch.records, batch.row, batch.start, strict=True)):
        a, e = offsets[r], offsets[r + 1]
        tokens[b, s : s + e - a] = input_ids[a:e]
        valid[b, s : s + e - a] = True
        if segments is not None:
            positions[b, s : s + e - a] = np.arange(e - a, dtype=np.int32)
            segments[b, s : s + e - a] = k + 1
    return tokens, valid, positions, segments


def token_index(batch: RowBatch, lengths: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """int64 [sum of kept lengths]: flat [B * P] positions of the tokens of records
    `batch.records[keep]`, concatenated in that order (`np.take` of a [B * P, D] view)."""
    lens = lengths[batch.records[keep]]  # [R']
    first = batch.row[keep] * batch.row_len + batch.start[keep]  # [R']
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(first, lens) + within
