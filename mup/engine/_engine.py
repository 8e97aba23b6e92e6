"""The continuous-batching engine: fixed slots, bucketed and chunked prefill, one decode step
for every live slot, tokens streamed to each request as they are decoded.

Axis letters: B slots, R rows of one prefill call, P prefill bucket, C chunk, D model, J
steering entries, X top-k width.

One host thread owns the model and loops:

1. drop cancelled rows (their slots are free for this very step);
2. admit waiting rows into free slots: rows of one prompt bucket are prefilled together
   (right-padded, in chunks of at most `prefill_chunk` tokens into a prefill cache of the
   bucket's length); one chunk budget per loop turn while other rows decode, so a long prompt
   never stalls them for more than a chunk;
3. a prefilled row's first token comes from its prefill; its cache rows are copied into its
   slot, whose next write goes to the prompt's length (each slot writes at its own column);
4. one jitted decode call advances every slot; each live row takes its token, logprobs and
   probe activations; a row that finishes frees its slot at once.

Constrained rows (`Request.grammar`) carry an llguidance matcher: after each of the row's tokens
the host advances it and writes the row's allowed-token mask (packed bits [W]) into the slot's
mask row, which the next call applies to the logits before sampling (the prefill applies the
grammar's start mask to the first token). Every call passes the mask rows, all-allowed for
other rows and free slots, so one compiled program serves every mix and a free row's tokens
are exactly those it gets without constrained batch-mates. A call that holds a constrained row
runs one decode step (the mask must be updated between steps), whatever `decode_steps` says.

A row's tokens depend only on its own prompt, steering, sampler and seed: attention is masked
per row, rope positions are per row, and sampling uses per-row parameters and keys, so its
batch-mates, their number and their arrival times never change its output.

Steering: J = (loaded vectors) + (one custom entry per row when a custom block is set). A row
that picked loaded vector j gets multiplier m in entry j, one with its own vector gets it in its
custom entry; every other entry is 0 for that row, so one program serves every mix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mup._renamed import old_keywords
from mup.engine._config import (
    MAX_TOP_LOGPROBS,
    EngineConfig,
    Request,
    Result,
    TokenEvent,
    TokenLogprob,
)
from mup.engine._grammar import ALL_ALLOWED, Constraints, Grammar, GrammarError, mask_words
from mup.engine._metrics import EngineMetrics
from mup.engine._steps import decode_steps, insert_rows, prefill_chunk
from mup.models import STEER_PHASES, KVCache, default_stop_tokens, pad_tokens

log = logging.getLogger("mup.engine")

# Slot columns a decode step reads: the smallest bucket holding every live row (each bucket is
# one compiled decode program). Reading all max_len columns would make every step cost the
# whole slot length, however short the live rows (benchmarks/bench_serve.py).
_ATTEND_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def row_buckets(max_slots: int) -> tuple[int, ...]:
    """Slot counts a decode step advances: powers of 4 below max_slots, then max_slots. A step
    advances the smallest bucket holding the live rows (padded with free slots), so a lone row
    at the end of a batch costs a one-row step, not a step of every slot; each bucket is one
    more compiled decode program, hence the coarse steps."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 4
    return (*out, max_slots)


# Request groups whose last admission is remembered before the gone ones are forgotten.
_MAX_TRACKED_GROUPS = 4096


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


def probe_site(probe) -> str:
    """The capture site the probe was trained on: its store's `site` (recorded by `fit`),
    residual for probes trained on in-memory arrays."""
    site = probe.metadata.get("site", "residual")
    if site not in ("residual", "normed"):
        raise ValueError(f"the probe's metadata names an unknown site {site!r}")
    return site


def check_probe(probe, config) -> None:
    """Refuse a probe this model cannot feed (layers out of range, wrong width)."""
    if not probe.layers:
        raise ValueError(
            "the probe file records no layers; the engine needs to know which residual "
            "stream it reads (train it on a store, or with layer=...)"
        )
    site = probe_site(probe)
    top = config.n_layers if site == "residual" else config.n_layers - 1
    bad = [x for x in probe.layers if not 0 <= x <= top]
    if bad:
        raise ValueError(f"probe layers {bad} are outside the model's 0..{top} ({site} site)")
    width = config.d_model * (len(probe.layers) if probe.combine == "concat" else 1)
    if width != probe.d_model:
        raise ValueError(
            f"the probe reads width {probe.d_model} (layers {list(probe.layers)}, "
            f"{probe.combine}) but this model gives {width}"
        )


# ---------------------------------------------------------------------------------------------
# Handles: what a submitter holds
# ---------------------------------------------------------------------------------------------


class Handle:
    """A submitted row: its token events as they are decoded, then its `Result`.

    Thread-safe; `events()` / `result()` block, `stream()` / `wait()` are their asyncio forms.
    `cancel()` frees the row's slot at the engine's next step.
    """

    def __init__(self, request: Request, engine: Engine):
        self.request = request
        self._engine = engine
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        # Set by the engine when the prefill ends, before the first token event: streams can
        # send the prompt's score and logprobs (echo) ahead of the completion.
        self.probe_score: float | None = None
        self.probe_scores: list[float] | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self._engine._wake()

    # engine side
    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._cond.notify_all()
        for loop, event in waiters:
            # RuntimeError: that event loop is closed, nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._notify()

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        with self._cond:
            self._result, self._error = result, error
            self._notify()

    # consumer side
    def result(self, timeout: float | None = None) -> Result:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the row did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def events(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=i: len(self._events) > seen or self.done)
                new, done = self._events[i:], self.done
            yield from new
            i += len(new)
            if done and i == len(self._events):
                if self._error is not None:
                    raise self._error
                return

    async def stream(self):
        """Async iterator over the token events; raises the engine's error if the row failed."""
        i = 0
        loop = asyncio.get_running_loop()
        while True:
            event = None
            with self._cond:
                new, done = self._events[i:], self.done
                if not new and not done:
                    event = asyncio.Event()
                    self._waiters.append((loop, event))
            for e in new:
                yield e
            i += len(new)
            if done and not new:
                if self._error is not None:
                    raise self._error
                return
            if event is not None:
                await event.wait()

    async def wait(self) -> Result:
        async for _ in self.stream():
            pass
        return self.result(0)


# ---------------------------------------------------------------------------------------------
# Engine-side row and prefill state
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Row:
    req: Request
    handle: Handle
    key: np.ndarray  # uint32 [2]
    stop_ids: frozenset
    entry: int | None  # loaded steering entry, or None
    custom: np.ndarray | None  # own vector [D]
    t_submit: float
    matcher: object = None  # the grammar's llguidance matcher, advanced by every token
    grammar_error: str | None = None  # a token the matcher refused (never when masks apply)
    slot: int = -1
    live: bool = False  # in a slot and decoding
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_lps: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
    first: tuple | None = None  # (token, lp, top ids, top lps) from the prefill
    probe_parts: list[list[np.ndarray]] = dataclasses.field(default_factory=list)
    token_acts: list[np.ndarray] = dataclasses.field(default_factory=list)
    probe_score: float | None = None
    probe_scores: list[float] = dataclasses.field(default_factory=list)  # one per probe
    decoded: str = ""  # text of ids[:read]
    prefix_at: int = 0
    read_at: int = 0
    emitted: str = ""
    finish: str | None = None
    final_feed: bool = False  # one more step to read the last token's probe activations
    batch_rows: int = 1
    t_first: float | None = None
    t_last: float | None = None


@dataclasses.dataclass(eq=False)
class _Prefill:
    rows: list[_Row]
    R: int
    P: int
    C: int
    echo: bool
    tokens: np.ndarray  # [R, P] right-padded
    valid: np.ndarray  # [R, P]
    next_tokens: np.ndarray  # [R, P]
    cache: KVCache
    temperature: np.ndarray
    top_p: np.ndarray
    keys: np.ndarray
    vectors: np.ndarray | None
    multipliers: np.ndarray | None
    allowed: np.ndarray  # [R, W] packed allowed-token masks of the first new token
    chunk: int = 0

    @property
    def n_chunks(self) -> int:
        return -(-self.P // self.C)


MIN_PREFILL_BUCKET = 32


def prompt_bucket(n: int, chunk: int) -> int:
    """Prefill cache length for an n-token prompt: a power of two from 32 up to `chunk`,
    multiples of the chunk above it (every chunk of a long prompt has the same shape). Few
    buckets, so that the warm-up can compile every prefill program the load can need."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(chunk, max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class Engine:
    """A loaded model, its steering vectors and optional probe, decoding in fixed slots.

    model: a `mup.models.Model`.
    vectors: name -> (vector [D], steered block); any number, each request picks one by name.
    custom_block: the block a request's own vector (`Request.vector` as an array) steers;
      None refuses own vectors. (``custom_layer=`` is its old name.)
    probe: a `mup.probes.Probe`, or a sequence of them; their layers are captured in the same
      prefill (prompt scores, one per probe) and, for the first probe, in the decode steps
      (per-token scores).
    """

    @old_keywords(custom_layer="custom_block")
    def __init__(
        self,
        model,
        *,
        vectors: Mapping[str, tuple[np.ndarray, int]] | None = None,
        custom_block: int | None = None,
        probe=None,
        config: EngineConfig = EngineConfig(),  # noqa: B008 - frozen
    ):
        self.model = model
        self.config = config
        mc = model.config
        self.d_model = int(mc.d_model)
        self.vector_names = list(vectors or {})
        self.vector_blocks: dict[str, int] = {}
        rows = []
        for name, (vec, block) in (vectors or {}).items():
            vec = np.asarray(vec, np.float32)
            if vec.shape != (self.d_model,):
                raise ValueError(f"vector {name!r} has shape {vec.shape}, need [{self.d_model}]")
            if not 0 <= int(block) < mc.n_layers:
                raise ValueError(
                    f"vector {name!r} steers block {block}, outside 0..{mc.n_layers - 1}"
                )
            self.vector_blocks[name] = int(block)
            rows.append(vec)
        self._loaded = np.stack(rows) if rows else np.zeros((0, self.d_model), np.float32)
        if custom_block is not None and not 0 <= int(custom_block) < mc.n_layers:
            raise ValueError(f"custom_block {custom_block} outside 0..{mc.n_layers - 1}")
        self.custom_block = None if custom_block is None else int(custom_block)
        if probe is None:
            self.probes = []
        elif isinstance(probe, list | tuple):
            self.probes = list(probe)
        else:
            self.probes = [probe]
        self.probe = self.probes[0] if self.probes else None
        for p in self.probes:
            check_probe(p, mc)
        # (layer, site) pairs every probe reads, captured once per forward
        self.captures: tuple[tuple[int, str], ...] = tuple(
            sorted({(int(x), probe_site(p)) for p in self.probes for x in p.layers})
        )
        self._probe_cols = [
            [self.captures.index((int(x), probe_site(p))) for x in p.layers] for p in self.probes
        ]
        self.stop_ids = tuple(default_stop_tokens(model.tokenizer))
        self.pad_id = self.stop_ids[0]
        # Request handlers tokenize on their own threads; fast tokenizers are not re-entrant.
        self.tokenizer_lock = threading.Lock()
        self.metrics = EngineMetrics()

        B, S = config.max_slots, config.max_len
        self._dtype = jnp.dtype(model.params["embed"].dtype)
        self._cache: KVCache | None = None
        self._slots: list[_Row | None] = [None] * B
        self._tok = np.zeros(B, np.int32)
        self._steps = np.zeros(B, np.int32)
        self._temp = np.zeros(B, np.float32)
        self._top_p = np.ones(B, np.float32)
        self._keys = np.zeros((B, 2), np.uint32)
        J = self._n_entries(B)
        self._vec = np.zeros((J, self.d_model), np.float32)
        self._vec[: len(self._loaded)] = self._loaded
        self._mult = np.zeros((J, B), np.float32)
        self._max_len = S
        # allowed-token masks of the next step, one packed row per slot (-1: every token)
        self._words = mask_words(int(mc.vocab_size))
        self._allowed = np.full((B, self._words), ALL_ALLOWED, np.int32)
        self._allowed_dev: jax.Array | None = None  # device copy; None when out of date
        self._constraints: Constraints | None = None  # built with the first grammar
        self._constraints_lock = threading.Lock()

        self._cv = threading.Condition()
        self._incoming: list[_Row] = []
        self._waiting: collections.deque[_Row] = collections.deque()
        self._admitted_at: dict[object, int] = {}  # request group -> when it last got a slot
        self._admit_count = 0
        self._prefills: list[_Prefill] = []
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mup-engine", daemon=True)
        # what the steps did, for tests and logs
        # (interleaved_steps: decode steps run while a chunked prefill was still in progress)
        self.stats = {
            "decode_steps": 0,
            "advanced_rows": 0,  # slots the decode steps advanced (live + bucket padding)
            "prefill_calls": 0,
            "max_live": 0,
            "mixed_steps": 0,
            "interleaved_steps": 0,
            "constrained_steps": 0,
        }

    # -- public ----------------------------------------------------------------------------

    @property
    def steering_blocks(self) -> dict[str, int]:
        return dict(self.vector_blocks)

    def start(self) -> Engine:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def warm_up(self) -> int:
        """Compile, before `start`, every program a load of greedy rows can need: each
        prefill rows x bucket up to the chunk (and the chunked buckets that the decode buckets
        imply), its insert, and the decode step of every slot-count bucket at every attend
        bucket up to max_len, by running short rows through the loop's own code in this
        thread. Programs for top-k
        logprobs and echo compile on first use. Returns the number of rows run."""
        if self._thread.is_alive():
            raise RuntimeError("warm_up runs before start()")
        cfg = self.config
        top = self._max_len - 2  # room for 2 new tokens
        lengths = []
        b = MIN_PREFILL_BUCKET
        while b <= min(cfg.prefill_chunk, top + 1):
            lengths.append(b - 1)  # bucket b; decode reads bucket(b) columns
            b *= 2
        for a in _ATTEND_BUCKETS:  # longer prompts: chunked prefill, wider decode reads
            n = min(a - 1, top)
            if n > cfg.prefill_chunk and n + 1 > a // 2 and n not in lengths:
                lengths.append(n)
        runs = 0
        for n in lengths:
            for R in cfg.prefill_rows:
                if cfg.max_slots < R:
                    continue
                handles = [
                    Handle(Request(prompt_ids=(0,) * n, max_tokens=2), self) for _ in range(R)
                ]
                for h in handles:
                    self._waiting.append(self._new_row(h.request, h, None, None))
                while self._busy():
                    self._admit()
                    self._run_prefills()
                    if self.running():
                        self._decode()
                runs += R
        # Every slot-count bucket at every width (the rows above ran only their own counts):
        # free slots stepped here are reset when a prompt is inserted into them.
        if self._allowed_dev is None:
            self._allowed_dev = jnp.asarray(self._allowed)
        if self._cache is None:
            self._cache = self._new_cache()
        for a in sorted({min(a, self._max_len) for a in _ATTEND_BUCKETS}):
            for R in row_buckets(cfg.max_slots):
                rows = np.arange(R, dtype=np.int32)
                out = self._decode_call(
                    rows, captures=(), top_k=1, n_steps=cfg.decode_steps, attend_len=a
                )
                jax.block_until_ready(out)
        self.metrics = EngineMetrics()  # the warm-up is not traffic
        self.stats = {k: 0 for k in self.stats}
        return runs

    def _new_row(self, request: Request, handle: Handle, entry, custom, matcher=None) -> _Row:
        return _Row(
            req=request,
            handle=handle,
            key=np.asarray(jax.random.PRNGKey(int(request.seed) % (1 << 32)), np.uint32),
            stop_ids=frozenset(self.stop_ids if request.stop_ids is None else request.stop_ids),
            entry=entry,
            custom=custom,
            t_submit=time.perf_counter(),
            matcher=matcher,
        )

    def submit(self, request: Request) -> Handle:
        """Queue one row; raises ValueError for a request the engine cannot serve (a
        `GrammarError` for a grammar it cannot build) and EngineClosed once closing."""
        entry, custom = self._check(request)
        # The matcher is built here, on the submitter's thread, not in the decode loop.
        matcher = None if request.grammar is None else self.constraints().matcher(request.grammar)
        handle = Handle(request, self)
        row = self._new_row(request, handle, entry, custom, matcher)
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            self._incoming.append(row)
            self._cv.notify()
        self.metrics.on_submit(len(request.prompt_ids))
        return handle

    def generate(self, requests: Sequence[Request], timeout: float | None = None) -> list[Result]:
        """Submit rows and wait for all their results (a convenience for batch jobs)."""
        handles = [self.submit(r) for r in requests]
        return [h.result(timeout) for h in handles]

    def close(self, timeout: float | None = None) -> None:
        """Finish every row submitted so far, then stop the loop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def running(self) -> int:
        return sum(1 for r in self._slots if r is not None and r.live)

    def constraints(self) -> Constraints:
        """The llguidance side of the engine (its tokenizer's trie), built on first use."""
        with self._constraints_lock:
            if self._constraints is None:
                self._constraints = Constraints(
                    self.model.tokenizer, self.model.config.vocab_size, self.stop_ids
                )
            return self._constraints

    def waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    # -- validation ----------------------------------------------------------------------

    def _check(self, r: Request) -> tuple[int | None, np.ndarray | None]:
        n = len(r.prompt_ids)
        if n < 1:
            raise ValueError("the prompt has no tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in r.prompt_ids):
            raise ValueError(f"prompt token ids outside the vocabulary 0..{vocab - 1}")
        if r.max_tokens < 0 or (r.max_tokens == 0 and not r.prompt_logprobs):
            raise ValueError("max_tokens must be >= 1 (0 only with prompt logprobs)")
        if n + r.max_tokens > self._max_len:
            raise ValueError(
                f"prompt ({n}) + max_tokens ({r.max_tokens}) exceeds the engine's slot length "
                f"{self._max_len}"
            )
        if not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
        if not (r.temperature >= 0 and 0 < r.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if r.probe_mask is not None:
            if self.probe is None:
                raise ValueError("a probe mask was given but the engine has no probe")
            if len(r.probe_mask) != n:
                raise ValueError(f"probe_mask has {len(r.probe_mask)} entries for {n} tokens")
        if r.probe_token_scores and self.probe is None:
            raise ValueError("probe token scores need a probe")
        if r.grammar is not None and not isinstance(r.grammar, Grammar):
            raise GrammarError(
                f"grammar must be a mup.engine.Grammar, got {type(r.grammar).__name__}"
            )
        if r.vector is None:
            return None, None
        if isinstance(r.vector, str):
            if r.vector not in self.vector_blocks:
                raise ValueError(f"unknown steering vector {r.vector!r}")
            return self.vector_names.index(r.vector), None
        if self.custom_block is None:
            raise ValueError("this engine has no steered block for request-supplied vectors")
        vec = np.asarray(r.vector, np.float32)
        if vec.shape != (self.d_model,) or not np.all(np.isfinite(vec)):
            raise ValueError(f"a request vector must be {self.d_model} finite floats")
        return None, vec

    # -- the loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _busy(self) -> bool:
        return bool(self._incoming or self._waiting or self._prefills or self.running())

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    idle = not self._busy()
                    while not self._busy() and not self._closing:
                        self._cv.wait()
                    if not self._busy() and self._closing:
                        break
                if idle and self.config.admit_window_s > 0:
                    time.sleep(self.config.admit_window_s)  # let company arrive
                with self._cv:
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                self._drop_cancelled()
                self._admit()
                self._run_prefills()
                if self.running():
                    self._decode()
                self.metrics.set_gauges(self.running(), self.waiting(), self.config.max_slots)
        except BaseException as e:  # a broken step: fail every row rather than hang them
            log.exception("the engine loop failed")
            self._fail_all(e)
            raise

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            self._closing = True
            rows = list(self._incoming) + list(self._waiting)
            self._incoming.clear()
            self._waiting.clear()
        rows += [r for job in self._prefills for r in job.rows]
        rows += [r for r in self._slots if r is not None]
        self._prefills.clear()
        self._slots = [None] * self.config.max_slots
        for r in rows:
            if not r.handle.done:
                r.handle._finish(None, RuntimeError(f"generation failed: {error!r}"))

    def _drop_cancelled(self) -> None:
        kept = collections.deque()
        for r in self._waiting:
            if r.handle.cancelled:
                r.finish = "cancelled"
                self._complete(r)
            else:
                kept.append(r)
        self._waiting = kept
        for r in self._slots:
            if r is not None and r.live and r.handle.cancelled:
                r.finish = "cancelled"
                self._free(r)
                self._complete(r)

    # -- admission and prefill -------------------------------------------------------------

    def _admit(self) -> None:
        cfg = self.config
        if cfg.static_batches and (self.running() or self._prefills):
            return
        free = [s for s, r in enumerate(self._slots) if r is None]
        while free and self._waiting:
            head = self._fairest()
            P = prompt_bucket(len(head.req.prompt_ids), cfg.prefill_chunk)
            echo = head.req.prompt_logprobs
            limit = min(len(free), cfg.prefill_rows[-1])
            group = [head]
            for r in self._waiting:
                if r is head:
                    continue
                if len(group) == limit:
                    break
                same = prompt_bucket(len(r.req.prompt_ids), cfg.prefill_chunk) == P
                if same and r.req.prompt_logprobs == echo:
                    group.append(r)
            for r in group:
                self._waiting.remove(r)
                r.slot = free.pop(0)
                self._slots[r.slot] = r
            self._note_admitted(group)
            self._prefills.append(self._new_prefill(group, P, echo))

    def _fairest(self) -> _Row:
        """The waiting row to admit next: of the groups with the fewest rows in slots, the one
        admitted least recently (never first), then the earliest row. Rows without a group
        count as never admitted, so ungrouped traffic stays first-in first-out."""
        in_slots = collections.Counter(
            r.req.group for r in self._slots if r is not None and r.req.group is not None
        )

        def key(r: _Row):
            g = r.req.group
            if g is None:
                return (0, -1)
            return (in_slots[g], self._admitted_at.get(g, -1))

        return min(self._waiting, key=key)  # min keeps the earliest row among equal keys

    def _note_admitted(self, rows: list[_Row]) -> None:
        self._admit_count += 1
        for r in rows:
            if r.req.group is not None:
                self._admitted_at[r.req.group] = self._admit_count
        if len(self._admitted_at) > _MAX_TRACKED_GROUPS:  # forget groups no longer queued
            live = {r.req.group for r in self._waiting} | {
                r.req.group for r in self._slots if r is not None
            }
            self._admitted_at = {g: t for g, t in self._admitted_at.items() if g in live}

    def _n_entries(self, rows: int) -> int:
        return len(self._loaded) + (rows if self.custom_block is not None else 0)

    def _steer_blocks(self, rows: int) -> tuple[int, ...]:
        blocks = tuple(self.vector_blocks[n] for n in self.vector_names)
        if self.custom_block is not None:
            blocks += (self.custom_block,) * rows
        return blocks

    def _new_prefill(self, rows: list[_Row], P: int, echo: bool) -> _Prefill:
        cfg = self.config
        R = next(b for b in cfg.prefill_rows if b >= len(rows))
        # Right-padded: each row's tokens from column 0, so its cache columns are its positions.
        tokens, valid = pad_tokens(
            [r.req.prompt_ids for r in rows], P, pad_id=self.pad_id, n_rows=R
        )  # [R, P]
        nxt = np.zeros((R, P), np.int32)
        temp = np.zeros(R, np.float32)
        top_p = np.ones(R, np.float32)
        keys = np.zeros((R, 2), np.uint32)
        J = self._n_entries(R)
        vectors = mults = None
        if J:
            vectors = np.zeros((J, self.d_model), np.float32)
            vectors[: len(self._loaded)] = self._loaded
            mults = np.zeros((J, R), np.float32)
        allowed = np.full((R, self._words), ALL_ALLOWED, np.int32)
        constrained = [(r.matcher, i) for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            self.constraints().fill(constrained, allowed)
        phase = STEER_PHASES[cfg.steer_positions][0]
        for i, r in enumerate(rows):
            ids = np.asarray(r.req.prompt_ids, np.int32)
            nxt[i, : len(ids) - 1] = ids[1:]
            temp[i], top_p[i], keys[i] = r.req.temperature, r.req.top_p, r.key
            self._steer_row(vectors, mults, i, len(self._loaded) + i, r, phase)
            r.probe_parts = [[] for _ in self.captures]
        C = min(P, cfg.prefill_chunk)
        cache = KVCache.create(self.model.config, R, P, dtype=self._dtype)
        return _Prefill(
            rows=rows, R=R, P=P, C=C, echo=echo, tokens=tokens, valid=valid, next_tokens=nxt,
            cache=cache, temperature=temp, top_p=top_p, keys=keys, vectors=vectors,
            multipliers=mults, allowed=allowed,
        )  # fmt: skip

    @staticmethod
    def _steer_row(vectors, mults, col: int, custom_entry: int, r: _Row, phase: float) -> None:
        if mults is None:
            return
        if r.entry is not None:
            mults[r.entry, col] = r.req.multiplier * phase
        elif r.custom is not None:
            vectors[custom_entry] = r.custom
            mults[custom_entry, col] = r.req.multiplier * phase

    def _run_prefills(self) -> None:
        # While rows decode, one chunk budget per turn; with nothing decoding, all of it.
        budget = self.config.prefill_chunk * self.config.prefill_rows[-1]
        spent = 0
        while self._prefills and (spent < budget or not self.running()):
            job = self._prefills[0]
            self._prefill_chunk(job)
            spent += job.R * job.C
            if job.chunk == job.n_chunks:
                self._prefills.pop(0)
                self._finish_prefill(job)

    def _prefill_chunk(self, job: _Prefill) -> None:
        start = job.chunk * job.C
        stop = start + job.C
        lengths = np.array(
            [len(r.req.prompt_ids) for r in job.rows] + [1] * (job.R - len(job.rows))
        )
        last_col = np.clip(lengths - 1 - start, 0, job.C - 1).astype(np.int32)
        entries = self._n_entries(job.R)
        out = prefill_chunk(
            self.model.params,
            job.cache,
            jnp.asarray(job.tokens[:, start:stop]),
            jnp.asarray(job.valid[:, start:stop]),
            jnp.asarray(last_col),
            jnp.asarray(job.next_tokens[:, start:stop]) if job.echo else None,
            jnp.asarray(job.temperature),
            jnp.asarray(job.top_p),
            jnp.asarray(job.keys),
            jnp.asarray(job.allowed),
            None if not entries else jnp.asarray(job.vectors, self._dtype),
            None if not entries else jnp.asarray(job.multipliers, self._dtype),
            config=self.model.config,
            steer_blocks=self._steer_blocks(job.R) if entries else (),
            captures=self.captures,
            top_k=MAX_TOP_LOGPROBS if any(r.req.top_logprobs for r in job.rows) else 1,
            all_logprobs=job.echo,
        )
        job.cache = out["cache"]
        job.chunk += 1
        self.stats["prefill_calls"] += 1
        host = jax.device_get({k: v for k, v in out.items() if k != "cache"})
        for i, r in enumerate(job.rows):
            n = int(lengths[i])
            if start <= n - 1 < stop:
                c = n - 1 - start
                r.first = (
                    int(host["first"][i]),
                    float(host["first_lp"][i]),
                    host["top_ids"][i],
                    host["top_lp"][i],
                )
            upto = min(n, stop) - start  # this row's real tokens in the chunk
            if upto <= 0:
                continue
            for j, h in enumerate(host["probe"]):
                r.probe_parts[j].append(np.asarray(h[i, :upto], np.float32))
            if job.echo:
                k = r.req.top_logprobs
                if start == 0:
                    r.prompt_lps.append(None)
                # position c predicts token c + 1 (the row's last token predicts nothing here)
                for c in range(min(upto, n - 1 - start)):
                    ids, lps = host["prompt_top_ids"][i, c], host["prompt_top_lp"][i, c]
                    r.prompt_lps.append(
                        TokenLogprob(
                            int(job.tokens[i, start + c + 1]),
                            float(host["prompt_lp"][i, c]),
                            tuple(zip(ids[:k].tolist(), lps[:k].tolist(), strict=True)),
                        )
                    )

    def _finish_prefill(self, job: _Prefill) -> None:
        rows = job.rows
        for r in rows:
            r.batch_rows = max(r.batch_rows, len(rows))
        scored = [r for r in rows if r.req.probe_mask is not None]
        if scored:
            masks = [np.asarray(r.req.probe_mask, bool) for r in scored]
            per_row = [[np.concatenate(p) for p in r.probe_parts] for r in scored]
            for k in range(len(self.probes)):
                scores = self._probe_predict(k, [self._combine(k, a) for a in per_row], masks)
                for r, x in zip(scored, scores, strict=True):
                    r.probe_scores.append(float(x))
        for r in rows:
            r.probe_parts = []
            r.probe_score = r.probe_scores[0] if r.probe_scores else None
            r.handle.probe_score = r.probe_score
            r.handle.probe_scores = list(r.probe_scores) if r.probe_scores else None
            if r.req.prompt_logprobs:
                r.handle.prompt_logprobs = list(r.prompt_lps)
        keep: list[_Row] = []
        for r in rows:
            if r.handle.cancelled:
                r.finish = "cancelled"
            elif r.req.max_tokens == 0:
                r.finish = "length"
            else:
                self._accept(r, *r.first)
            if r.finish is None or r.final_feed:
                keep.append(r)
            else:
                self._slots[r.slot] = None
                self._complete(r)
        if not keep:
            return
        if self._cache is None:
            self._cache = self._new_cache()
        slots = np.full(job.R, self.config.max_slots, np.int32)  # out of range: dropped
        lengths = np.zeros(job.R, np.int32)
        phase = STEER_PHASES[self.config.steer_positions][1]
        for i, r in enumerate(rows):
            if r in keep:
                slots[i], lengths[i] = r.slot, len(r.req.prompt_ids)
        self._cache = insert_rows(
            self._cache,
            job.cache.k,
            job.cache.v,
            job.cache.valid,
            jnp.asarray(slots),
            jnp.asarray(lengths),
        )
        for r in keep:
            s = r.slot
            r.live = True
            self._tok[s] = r.ids[-1]
            self._steps[s] = len(r.ids)
            self._temp[s], self._top_p[s], self._keys[s] = r.req.temperature, r.req.top_p, r.key
            self._mult[:, s] = 0.0
            self._steer_row(self._vec, self._mult, s, len(self._loaded) + s, r, phase)
        self._update_masks(keep)

    def _update_masks(self, rows: Sequence[_Row]) -> None:
        """Each constrained row's mask row for its next token: its grammar's after the tokens
        so far, or every token once it is finished (it may still feed one token). Rows without
        a grammar keep their slot's all-allowed row (`_free` resets it behind a grammar)."""
        constrained = []
        for r in rows:
            if r.matcher is None:
                continue
            if r.finish is None:
                constrained.append((r.matcher, r.slot))
            else:
                self._allowed[r.slot] = ALL_ALLOWED
                self._allowed_dev = None
        if constrained:
            self.constraints().fill(constrained, self._allowed)
            self._allowed_dev = None

    def _new_cache(self) -> KVCache:
        cache = KVCache.create(
            self.model.config, self.config.max_slots, self.config.max_len, dtype=self._dtype
        )
        return cache.replace(index=jnp.zeros(self.config.max_slots, jnp.int32))

    # -- decode ----------------------------------------------------------------------------

    def _decode(self) -> None:
        live = [r for r in self._slots if r is not None and r.live]
        n_live = len(live)
        self.stats["decode_steps"] += 1
        self.stats["interleaved_steps"] += bool(self._prefills)
        self.stats["max_live"] = max(self.stats["max_live"], n_live)
        if (
            len({(r.entry, None if r.custom is None else id(r), r.req.multiplier) for r in live})
            > 1
        ):
            self.stats["mixed_steps"] += 1
        # A constrained row's mask follows its every token: one step per call while one runs.
        constrained = any(r.matcher is not None for r in live)
        n_steps = 1 if constrained else self.config.decode_steps
        self.stats["constrained_steps"] += constrained
        # Columns the step must read: every live row's next write, plus the steps of the call.
        need = max(len(r.req.prompt_ids) + len(r.ids) - 1 for r in live) + n_steps
        attend = next((b for b in _ATTEND_BUCKETS if b >= need), self._max_len)
        if self._allowed_dev is None:
            self._allowed_dev = jnp.asarray(self._allowed)
        # The slots to advance: the live ones plus free ones up to a bucket, in slot order (all
        # slots in order when the bucket is max_slots: the step then reads the cache by slices).
        R = next(b for b in row_buckets(self.config.max_slots) if b >= n_live)
        used = {r.slot for r in live}
        spare = [s for s in range(self.config.max_slots) if s not in used][: R - n_live]
        rows = np.array(sorted(used | set(spare)), np.int32)
        self.stats["advanced_rows"] += R
        at = {int(s): i for i, s in enumerate(rows)}  # slot -> its row in the outputs
        out = self._decode_call(
            rows,
            # the probes' layers only while a row wants per-token scores (another program)
            captures=self.captures if any(r.req.probe_token_scores for r in live) else (),
            # XLA CPU's top-k over the vocabulary took 40% of a SmolLM2 step: only when asked.
            top_k=MAX_TOP_LOGPROBS if any(r.req.top_logprobs for r in live) else 1,
            n_steps=n_steps,
            attend_len=min(attend, self._max_len),
        )
        host = jax.device_get(out)
        going = []
        for r in live:
            s, i = r.slot, at[r.slot]
            r.batch_rows = max(r.batch_rows, n_live)
            for k in range(n_steps):
                if r.req.probe_token_scores and host["probe"]:  # the token fed at this step
                    r.token_acts.append(self._combine(0, [h[i, k] for h in host["probe"]]))
                if r.final_feed:
                    r.final_feed = False
                    break
                self._accept(
                    r,
                    int(host["tokens"][i, k]),
                    float(host["lp"][i, k]),
                    host["top_ids"][i, k],
                    host["top_lp"][i, k],
                )
                if r.finish is not None:
                    break
            if r.finish is not None and not r.final_feed:
                self._free(r)
                self._complete(r)
            else:
                self._tok[s] = r.ids[-1]
                self._steps[s] = len(r.ids)
                going.append(r)
        if constrained:
            self._update_masks(going)

    def _decode_call(self, rows: np.ndarray, **static) -> dict:
        """One `decode_steps` call of slots `rows` with the slots' current arrays (the warm-up
        makes the same calls, so it compiles the very programs traffic runs)."""
        entries = self._n_entries(self.config.max_slots)
        self._cache, out = decode_steps(
            self.model.params,
            self._cache,
            jnp.asarray(rows),
            jnp.asarray(self._tok),
            jnp.asarray(self._steps),
            jnp.asarray(self._temp),
            jnp.asarray(self._top_p),
            jnp.asarray(self._keys),
            self._allowed_dev,
            None if not entries else jnp.asarray(self._vec, self._dtype),
            None if not entries else jnp.asarray(self._mult, self._dtype),
            config=self.model.config,
            steer_blocks=self._steer_blocks(self.config.max_slots) if entries else (),
            **static,
        )
        return out

    def _free(self, r: _Row) -> None:
        s = r.slot
        if s >= 0 and self._slots[s] is r:
            self._slots[s] = None
            self._mult[:, s] = 0.0
            self._temp[s], self._top_p[s] = 0.0, 1.0
            if r.matcher is not None:
                self._allowed[s] = ALL_ALLOWED
                self._allowed_dev = None
        r.live = False

    # -- per-token bookkeeping ---------------------------------------------------------------

    def _accept(self, r: _Row, token: int, lp: float, top_ids, top_lps) -> None:
        now = time.perf_counter()
        if r.t_first is None:
            r.t_first = now
            self.metrics.on_first_token(now - r.t_submit)
        else:
            self.metrics.on_token_gap(now - r.t_last)
        r.t_last = now
        r.ids.append(token)
        self.metrics.on_generated(1)
        tl = None
        if r.req.logprobs:
            k = r.req.top_logprobs
            top = tuple(zip(top_ids[:k].tolist(), top_lps[:k].tolist(), strict=True))
            if r.matcher is not None:  # fewer than k tokens may be allowed: drop the -inf ones
                top = tuple(t for t in top if t[1] != -np.inf)
            tl = TokenLogprob(token, lp, top)
            r.logprobs.append(tl)
        complete = False  # the grammar takes no more tokens
        if r.matcher is not None and token not in r.stop_ids:
            if r.matcher.consume_token(token):
                complete = r.matcher.is_stopped()
            else:
                r.grammar_error = r.matcher.get_error() or f"token {token} is not allowed"
        if token in r.stop_ids or complete or r.grammar_error is not None:
            r.finish = "stop"
        elif len(r.ids) >= r.req.max_tokens or len(r.req.prompt_ids) + len(r.ids) >= self._max_len:
            r.finish = "length"
        text = self._new_text(r)
        if r.finish is not None and r.req.probe_token_scores:
            r.final_feed = True  # one more step reads the last token's activations
        r.handle._push(TokenEvent(len(r.ids) - 1, token, text, tl))

    def _new_text(self, r: _Row) -> str:
        """The text this token releases: decoded incrementally (a window of recent tokens, so
        multi-token characters are held until complete), cut at a stop string, and holding
        back a tail that could still become a stop string."""
        tok = self.model.tokenizer
        with self.tokenizer_lock:
            prefix = tok.decode(r.ids[r.prefix_at : r.read_at], skip_special_tokens=True)
            new = tok.decode(r.ids[r.prefix_at :], skip_special_tokens=True)
            if len(new) > len(prefix) and not new.endswith("\ufffd"):
                r.decoded += new[len(prefix) :]
                r.prefix_at, r.read_at = r.read_at, len(r.ids)
            if r.finish is not None:
                full = tok.decode(r.ids, skip_special_tokens=True)
                if full.startswith(r.emitted):
                    r.decoded = full
        text = r.decoded
        stops = r.req.stop
        if stops:
            lo = max(0, len(r.emitted) - max(map(len, stops)))
            cut = min((i for s in stops if (i := text.find(s, lo)) >= 0), default=None)
            if cut is not None:
                text = text[:cut]
                r.finish = "stop"
            elif r.finish is None:
                hold = max(
                    (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
                    default=0,
                )
                text = text[: len(text) - hold]
        if len(text) <= len(r.emitted) or not text.startswith(r.emitted):
            return ""
        out = text[len(r.emitted) :]
        r.emitted = text
        return out

    def _complete(self, r: _Row) -> None:
        scores = None
        if r.req.probe_token_scores and r.token_acts:
            scores = self._probe_token_scores(np.stack(r.token_acts))
        result = Result(
            text=r.emitted,
            token_ids=list(r.ids),
            finish_reason=r.finish or "length",
            logprobs=list(r.logprobs) if r.req.logprobs else None,
            prompt_logprobs=list(r.prompt_lps) if r.req.prompt_logprobs else None,
            probe_score=r.probe_score,
            probe_scores=list(r.probe_scores) if r.probe_scores else None,
            probe_token_scores=scores,
            batch_rows=r.batch_rows,
            prompt_tokens=len(r.req.prompt_ids),
            ttft_s=None if r.t_first is None else r.t_first - r.t_submit,
        )
        self.metrics.on_finish(result.finish_reason, time.perf_counter() - r.t_submit)
        if r.grammar_error is not None:  # a bug, not the request's fault: fail loudly
            log.error("row left its grammar: %s", r.grammar_error)
            r.handle._finish(None, RuntimeError(f"the row left its grammar: {r.grammar_error}"))
            return
        r.handle._finish(result)

    # -- probes ------------------------------------------------------------------------------

    def _combine(self, k: int, captured: list[np.ndarray]) -> np.ndarray:
        """Probe k's input from the engine's captures (one array per (layer, site))."""
        parts = [captured[c] for c in self._probe_cols[k]]
        if len(parts) == 1:
            return np.asarray(parts[0], np.float32)
        if self.probes[k].combine == "sum":
            return np.sum(parts, axis=0).astype(np.float32)
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def _probe_predict(self, k: int, acts: list[np.ndarray], masks: list[np.ndarray]):
        from mup.probes import Activations

        offsets = np.zeros(len(acts) + 1, np.int64)
        np.cumsum([len(a) for a in acts], out=offsets[1:])
        data = Activations(acts=np.concatenate(acts), offsets=offsets, mask=np.concatenate(masks))
        return self.probes[k].predict(data)

    def _probe_token_scores(self, acts: np.ndarray) -> list[float]:
        from mup.probes import Activations

        data = Activations(acts=acts, offsets=np.array([0, len(acts)], np.int64))
        logits, _ = self.probes[0].token_scores(data)
        return [float(x) for x in 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))]
