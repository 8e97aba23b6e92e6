"""Log-likelihoods of the choices of multiple-choice samples, each sample's prompt computed once.

Axis letters: B samples (prompts) in a batch, R choice rows (every choice of every sample),
P prompt bucket length, C continuation bucket length, S cache slots (P + C), D model,
V vocab, L layers, J steering entries (one here).

A choice's text is scored as in `mup.evals._loglik`: the log-probabilities of the tokens of
prompt + choice after the common prefix of its tokens with the prompt's. The tokens all choices
of a sample share (the shortest of those common prefixes) are prefilled once into a KV cache;
every choice row then reads its sample's cache and runs only its own tokens. The layout is
`mup.models.generate`'s: prompts LEFT-padded to a bucket P so that every row's last shared
token sits in slot P - 1, choice tokens right-padded to a bucket C in slots P.., rope positions
counting each row's real tokens. A token's log-probability comes from the logits of the
position before it: for a choice's first token that is the prefill's last column. Steering adds
``multiplier * vector`` at every position of both passes, as the engine steers a prompt.

`PrefixScorer.score` batches the samples that are waiting when its worker thread is free (the
solver's samples arrive concurrently, for every multiplier of a run), so a batch holds prompts
of several samples and multipliers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import queue
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mup.evals._loglik import ContinuationScore, common_prefix

# Batch shapes round up to few values, so that XLA compiles few programs: sample and row
# counts and the choice length to powers of two, the shared prompt to these lengths and then to
# `generate`'s buckets. Both stay short and tight: multiple-choice prompts are often a dozen
# tokens and choices one or two, and every padded token costs a full forward on a CPU.
SHORT_PROMPT_BUCKETS = (8, 16, 24)
MAX_SAMPLES = 16  # samples per batch
MAX_ROWS = 64  # choice rows per batch
# The [R, C, V] float32 logits of a batch stay under this many bytes (large vocabularies).
MAX_LOGIT_BYTES = 1 << 28


@dataclasses.dataclass(frozen=True)
class PrefixItem:
    """One sample: its prompt's tokens, each prompt + choice's tokens, its steering strength."""

    prompt_ids: tuple[int, ...]
    full_ids: tuple[tuple[int, ...], ...]
    multiplier: float

    @functools.cached_property
    def shared(self) -> int:
        """How many leading tokens every choice shares with the prompt."""
        return min(common_prefix(self.prompt_ids, f) for f in self.full_ids)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    found = next((b for b in buckets if b >= n), None)
    return found if found is not None else -(-n // buckets[-1]) * buckets[-1]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "steer_blocks"))
def _choice_logprobs(
    params,
    prompt,  # [B, P] int32, left-padded
    prompt_valid,  # [B, P] bool
    choice,  # [R, C] int32, right-padded
    choice_valid,  # [R, C] bool
    owner,  # [R] int32: the sample (row of `prompt`) of each choice row
    vectors,  # [J, D] or None
    multipliers,  # [J, B] or None
    *,
    config,
    steer_blocks: tuple[int, ...],
):
    """log p(choice[r, t] | shared prompt, choice[r, :t]) [R, C] float32 (0 at padding)."""
    from mup.models import ForwardSteering, KVCache, forward, lm_head, token_positions

    B, P = prompt.shape
    R, C = choice.shape
    L = config.n_layers

    def steering(m):
        if vectors is None:
            return None
        return ForwardSteering(blocks=steer_blocks, vectors=vectors, multipliers=m)

    cache = KVCache.create(config, B, P + C, dtype=params["embed"].dtype)
    out = forward(
        params,
        prompt,
        token_positions(prompt_valid),
        config=config,
        valid=prompt_valid,
        cache=cache,
        capture=(L,),
        steering=steering(multipliers),
        logits=False,
    )
    first = lm_head(config, params, out.hidden[L][:, -1])  # [B, V]: predicts choice token 0
    c = out.cache
    rows = KVCache(k=c.k[:, owner], v=c.v[:, owner], valid=c.valid[owner], index=c.index)
    lengths = prompt_valid.sum(axis=1).astype(jnp.int32)[owner]  # [R]
    positions = lengths[:, None] + jnp.arange(C, dtype=jnp.int32)[None]  # [R, C]
    logits = forward(
        params,
        choice,
        positions,
        config=config,
        valid=choice_valid,
        cache=rows,
        steering=steering(None if multipliers is None else multipliers[:, owner]),
    ).logits  # [R, C, V]
    pred = jnp.concatenate([first[owner][:, None], logits[:, :-1]], axis=1)  # [R, C, V]
    logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]  # [R, C]
    return jnp.where(choice_valid, picked, 0.0)


class PrefixScorer:
    """Scores `PrefixItem`s on one model (and one optional steering vector at `block`).

    `score_batch` is the synchronous batched computation; `score` (async) queues one sample for
    the worker thread, which runs everything queued at once (at most MAX_SAMPLES samples and
    MAX_ROWS choice rows per batch).
    """

    def __init__(self, model, vector: np.ndarray | None = None, block: int | None = None):
        if (vector is None) != (block is None):
            raise ValueError("PrefixScorer: a steering vector needs its block and vice versa")
        self.model = model
        dtype = model.params["embed"].dtype
        self._vectors = None if vector is None else jnp.asarray(np.asarray(vector)[None], dtype)
        self._blocks = () if block is None else (int(block),)
        self.max_len = int(model.config.max_position_embeddings)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def check(self, item: PrefixItem) -> None:
        """Raise ValueError for an item that cannot be scored (before it is queued)."""
        if not item.full_ids:
            raise ValueError("no choices to score")
        if item.shared < 1:
            raise ValueError("the choices share no first token with the prompt")
        for f in item.full_ids:
            if max(1, common_prefix(item.prompt_ids, f)) >= len(f):
                raise ValueError("the continuation adds no token to the prompt")
        longest = max(len(f) for f in item.full_ids)
        if longest > self.max_len:
            raise ValueError(
                f"prompt + choice is {longest} tokens, longer than the model's "
                f"{self.max_len} positions"
            )
        if self._vectors is None and item.multiplier != 0.0:
            raise ValueError(f"multiplier {item.multiplier} without a steering vector")

    def score_batch(self, items: Sequence[PrefixItem]) -> list[list[ContinuationScore]]:
        """The continuation scores of every item, in as few jitted calls as the limits allow."""
        for item in items:
            self.check(item)
        out: list[list[ContinuationScore]] = []
        for chunk in self._chunks(items):
            out.extend(self._run(chunk))
        return out

    def _chunks(self, items: Sequence[PrefixItem]):
        chunk: list[PrefixItem] = []
        rows = 0
        for item in items:
            k = len(item.full_ids)
            if chunk and (len(chunk) == MAX_SAMPLES or rows + k > MAX_ROWS):
                yield chunk
                chunk, rows = [], 0
            chunk.append(item)
            rows += k
        if chunk:
            yield chunk

    def _run(self, items: Sequence[PrefixItem]) -> list[list[ContinuationScore]]:
        from mup.models._generate import PROMPT_BUCKETS

        config = self.model.config
        pad = int(self.model.tokenizer.pad_token_id or 0)
        prefixes = [it.prompt_ids[: it.shared] for it in items]
        tails = [[f[it.shared :] for f in it.full_ids] for it in items]
        n_rows = sum(len(t) for t in tails)
        P = _bucket(max(map(len, prefixes)), SHORT_PROMPT_BUCKETS + PROMPT_BUCKETS)
        C = _pow2(max(len(x) for t in tails for x in t))
        B, R = _pow2(len(items)), _pow2(n_rows)
        if R * C * config.vocab_size * 4 > MAX_LOGIT_BYTES and len(items) > 1:
            half = len(items) // 2
            return self._run(items[:half]) + self._run(items[half:])

        prompt = np.full((B, P), pad, np.int32)  # [B, P]
        prompt_valid = np.zeros((B, P), bool)
        prompt_valid[len(items) :, -1] = True  # padding samples: one token, never read
        choice = np.full((R, C), pad, np.int32)  # [R, C]
        choice_valid = np.zeros((R, C), bool)
        owner = np.zeros(R, np.int32)
        spans: list[list[tuple[int, int, int]]] = []  # per item: (row, first scored, end)
        r = 0
        for b, (item, prefix, item_tails) in enumerate(zip(items, prefixes, tails, strict=True)):
            prompt[b, P - len(prefix) :] = prefix
            prompt_valid[b, P - len(prefix) :] = True
            spans.append([])
            for full, tail in zip(item.full_ids, item_tails, strict=True):
                choice[r, : len(tail)] = tail
                choice_valid[r, : len(tail)] = True
                owner[r] = b
                start = max(1, common_prefix(item.prompt_ids, full)) - item.shared
                spans[-1].append((r, start, len(tail)))
                r += 1
        multipliers = None
        if self._vectors is not None:
            m = np.zeros((1, B), np.float32)
            m[0, : len(items)] = [it.multiplier for it in items]
            multipliers = jnp.asarray(m, self._vectors.dtype)
        logp = np.asarray(
            _choice_logprobs(
                self.model.params,
                jnp.asarray(prompt),
                jnp.asarray(prompt_valid),
                jnp.asarray(choice),
                jnp.asarray(choice_valid),
                jnp.asarray(owner),
                self._vectors,
                multipliers,
                config=config,
                steer_blocks=self._blocks,
            ),
            np.float64,
        )  # [R, C]
        return [
            [ContinuationScore(float(logp[r, a:e].sum()), e - a) for r, a, e in item_spans]
            for item_spans in spans
        ]

    async def score(self, item: PrefixItem) -> list[ContinuationScore]:
        """The item's continuation scores, computed in the worker's next batch."""
        self.check(item)
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, loop, future))
        return await future

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="mup-prefix-scorer", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            waiting = [self._queue.get()]
            while True:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # Batch by batch, so the first samples go on while the rest are computed.
            batches = self._chunks([item for item, _, _ in waiting])
            for batch in batches:
                done, waiting = waiting[: len(batch)], waiting[len(batch) :]
                try:
                    results = self._run(batch)
                except Exception as e:  # the batch's samples get the error, the worker goes on
                    for _, loop, future in done:
                        loop.call_soon_threadsafe(_set, future, None, e)
                    continue
                for (_, loop, future), result in zip(done, results, strict=True):
                    loop.call_soon_threadsafe(_set, future, result, None)


def _set(future: asyncio.Future, result, error) -> None:
    if future.done():  # the sample was cancelled while it waited
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
