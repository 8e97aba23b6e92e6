"""Log-likelihoods of two competing completions per prompt, batched and jitted on mup.models.

This is what the prompted likelihood monitors compute: for each record, a prompt and the two
class completions (high, low). Tokens the two completions share at the start say nothing about
the class, so each completion is scored from the first token where they differ:

    LL_c = sum_{j >= d} log p(c_j | prompt, c_<j),   d = first index where high and low differ

and the monitor's score is softmax(LL_high, LL_low)[0] = sigmoid(LL_high - LL_low).

Work per record: the forward runs over prompt + shared prefix + the completion's tokens but its
last (which is only a target), and the LM head runs only at the positions whose next token is
scored: the run stops after the last needed position. When both completions differ in a single
last token ("high" / "low") the two share one input row. Rows are padded into length buckets
with a fixed row count per bucket (`mup.native.plan_batches`), so the compiled shapes stay few.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mup import native
from mup.models import ModelConfig, forward, lm_head

__all__ = ["PaddedBatch", "PairLogprobs", "padded_batches", "pair_logprobs", "pair_rows"]


@dataclasses.dataclass(frozen=True)
class PairLogprobs:
    """Per record (N): the two completions' log-likelihoods from their first differing token,
    and the tokens run through the model (inputs of every row) with the LM-head positions."""

    high: np.ndarray  # float64 [N]
    low: np.ndarray  # float64 [N]
    n_tokens: np.ndarray  # int64 [N]: tokens fed to the model
    n_scored: np.ndarray  # int64 [N]: positions the LM head ran at

    @property
    def p_high(self) -> np.ndarray:
        """softmax(LL_high, LL_low)[0], computed stably."""
        return 1.0 / (1.0 + np.exp(self.low - self.high))


@dataclasses.dataclass(frozen=True)
class _Row:
    record: int
    tokens: np.ndarray  # int32 [t]: the forward's input
    first: int  # position whose logits predict the first scored token
    targets: tuple[np.ndarray, np.ndarray]  # (high tail, low tail); an empty tail = not scored


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pair_rows(prompt: Sequence[int], high: Sequence[int], low: Sequence[int]) -> list[_Row]:
    """The input rows of one record (one when the tails are single tokens, else two)."""
    if not prompt:
        raise ValueError("the prompt must have at least one token")
    d = _first_difference(high, low)
    if d == len(high) or d == len(low):
        raise ValueError(
            f"the two completions must differ after their shared prefix; got {list(high)} and "
            f"{list(low)} (one is a prefix of the other)"
        )
    context = np.asarray([*prompt, *high[:d]], np.int32)
    h, lo = np.asarray(high[d:], np.int32), np.asarray(low[d:], np.int32)
    first = len(context) - 1
    none = np.zeros(0, np.int32)
    if len(h) == 1 and len(lo) == 1:
        return [_Row(-1, context, first, (h, lo))]
    return [
        _Row(-1, np.concatenate([context, h[:-1]]), first, (h, none)),
        _Row(-1, np.concatenate([context, lo[:-1]]), first, (none, lo)),
    ]


@functools.partial(jax.jit, static_argnames=("config",))
def _score_batch(params, tokens, valid, positions, targets, target_mask, *, config: ModelConfig):
    """tokens/valid [B, T]; positions [B, C]: where the scored logits are; targets and
    target_mask [B, 2, C]. Returns the summed log-probabilities [B, 2] (float32)."""
    B, T = tokens.shape
    rope = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    L = config.n_layers
    out = forward(
        params, tokens, rope, config=config, valid=valid, capture=(L,), logits=False
    )  # hidden[L] is the final-normed residual
    states = jnp.take_along_axis(out.hidden[L], positions[:, :, None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(lm_head(config, params, states), axis=-1)  # [B, C, V]
    picked = jnp.take_along_axis(logp[:, None], targets[..., None], axis=-1)[..., 0]  # [B,2,C]
    return jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """One padded batch of rows, as `_score_batch` takes it (B rows, fixed per bucket)."""

    rows: tuple[_Row, ...]  # the real rows; B - len(rows) padding rows follow
    tokens: np.ndarray  # int32 [B, P]
    valid: np.ndarray  # bool [B, P]
    positions: np.ndarray  # int32 [B, C]: positions whose logits are scored
    targets: np.ndarray  # int32 [B, 2, C]: (high, low) target tokens there
    mask: np.ndarray  # bool [B, 2, C]


def padded_batches(
    prompts: Sequence[Sequence[int]],
    highs: Sequence[Sequence[int]],
    lows: Sequence[Sequence[int]],
    *,
    token_budget: int = 8192,
    max_rows: int = 64,
    min_bucket: int = 64,
) -> list[PaddedBatch]:
    """The rows of every record, planned into padded length-bucket batches."""
    n = len(prompts)
    if not (len(highs) == len(lows) == n):
        raise ValueError(
            f"prompts, highs and lows must have one entry per record; got {n}, {len(highs)}, "
            f"{len(lows)}"
        )
    rows: list[_Row] = []
    for i in range(n):
        rows += [dataclasses.replace(r, record=i) for r in pair_rows(prompts[i], highs[i], lows[i])]
    if not rows:
        return []
    lengths = np.array([len(r.tokens) for r in rows], np.int64)
    tail = max(max(len(t) for t in r.targets) for r in rows)
    C = 1 << max(0, (tail - 1).bit_length())  # scored positions per row, a power of two
    buckets = native.length_buckets(int(lengths.max()), min_len=min_bucket)
    plan = native.plan_batches(
        lengths, token_budget=token_budget, buckets=buckets, max_rows=max_rows
    )
    out = []
    for batch in plan:
        P = batch.padded_len
        B = max(1, min(max_rows, token_budget // P), len(batch))  # the bucket's fixed row count
        tokens = np.zeros((B, P), np.int32)
        valid = np.zeros((B, P), bool)
        positions = np.zeros((B, C), np.int32)
        targets = np.zeros((B, 2, C), np.int32)
        mask = np.zeros((B, 2, C), bool)
        for b, j in enumerate(batch.rows):
            r = rows[j]
            tokens[b, : len(r.tokens)] = r.tokens
            valid[b, : len(r.tokens)] = True
            width = max(len(x) for x in r.targets)
            positions[b, :width] = np.arange(r.first, r.first + width)
            for k, x in enumerate(r.targets):
                targets[b, k, : len(x)] = x
                mask[b, k, : len(x)] = True
        out.append(
            PaddedBatch(tuple(rows[j] for j in batch.rows), tokens, valid, positions, targets, mask)
        )
    return out


def pair_logprobs(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    highs: Sequence[Sequence[int]],
    lows: Sequence[Sequence[int]],
    *,
    token_budget: int = 8192,
    max_rows: int = 64,
    min_bucket: int = 64,
    progress: Callable[[int], None] | None = None,
) -> PairLogprobs:
    """Log-likelihoods of each record's high and low completion after its prompt (token ids).

    Batches hold at most `token_budget` padded tokens and `max_rows` rows; `progress(n)` is
    called with the number of records finished after each batch.
    """
    batches = padded_batches(
        prompts, highs, lows, token_budget=token_budget, max_rows=max_rows, min_bucket=min_bucket
    )
    n = len(prompts)
    high = np.zeros(n, np.float64)
    low = np.zeros(n, np.float64)
    n_tokens = np.zeros(n, np.int64)
    n_scored = np.zeros(n, np.int64)
    remaining = np.bincount([r.record for b in batches for r in b.rows], minlength=n)
    for batch in batches:
        sums = np.asarray(
            _score_batch(
                params,
                batch.tokens,
                batch.valid,
                batch.positions,
                batch.targets,
                batch.mask,
                config=config,
            )
        )
        done = 0
        for b, r in enumerate(batch.rows):
            high[r.record] += float(sums[b, 0])
            low[r.record] += float(sums[b, 1])
            n_tokens[r.record] += len(r.tokens)
            n_scored[r.record] += max(len(x) for x in r.targets)
            remaining[r.record] -= 1
            done += int(remaining[r.record] == 0)
        if progress is not None:
            progress(done)
    return PairLogprobs(high=high, low=low, n_tokens=n_tokens, n_scored=n_scored)
