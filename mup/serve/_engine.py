"""The generation engine behind the server and the dynamic batcher that feeds it.

Axis letters: B rows in one generate call (padded up to a power of two), P prompt bucket, D model.

A `Row` is one completion to produce (a request asking for n choices makes n rows). The
`Batcher` thread collects the rows of concurrent requests for a few milliseconds and hands
them to `Engine.run` in one `mup.models.generate` call with per-row multipliers, seeds and
max_tokens; only rows with the same sampler share a call, because the sampler is static in the
jitted loop (greedy rows batch together, and so do rows with the same temperature / top_p).

Results do not depend on the batch a row lands in: rows are left-padded and masked, every row
has its own rope positions, its own multiplier and its own PRNG seed, and a row that asked for
fewer tokens than its batch-mates is cut at its own max_tokens (generation is causal, so the
first k tokens of a longer run are the k-token run). Batches are padded with copies of their
first row up to a power of two so that few batch shapes are ever compiled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mup.models import Sampler, Steering, SteeringSpec, default_stop_tokens, generate, jit_forward

log = logging.getLogger("mup.serve")

MIN_PROMPT_BUCKET = 32  # probe capture batches: prompt length rounded up to a power of two


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Row:
    """One completion to generate.

    prompt_ids: the prompt's token ids (chat template already applied for chat requests).
    max_tokens: new-token budget of this row.
    multiplier: steering strength of this row.
    sampler: Greedy() / Temperature(t=) / TopP(p=, t=); rows share a batch only with equal ones.
    seed: this row's PRNG seed (its samples then do not depend on its batch-mates).
    stop: strings that end the completion (cut from the text; generation itself stops on the
      tokenizer's stop tokens).
    probe_mask: bool [len(prompt_ids)], the prompt tokens the probe reads; None = no probe.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    multiplier: float
    sampler: Sampler
    seed: int
    stop: tuple[str, ...] = ()
    probe_mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowResult:
    """What one row produced.

    text: the completion (special tokens removed, cut at the first stop string).
    token_ids: the new token ids, through a stop token when one was hit.
    finish_reason: "stop" (stop token or stop string) or "length".
    probe_score: the probe's probability for the prompt, or None without a probe.
    batch_rows: how many real rows shared the generate call (for logs and tests).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    probe_score: float | None
    batch_rows: int


def probe_site(probe) -> str:
    """The capture site the probe was trained on: its store's `site` (recorded by `fit`),
    residual for probes trained on in-memory arrays."""
    site = probe.metadata.get("site", "residual")
    if site not in ("residual", "normed"):
        raise ValueError(f"the probe's metadata names an unknown site {site!r}")
    return site


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Engine:
    """A loaded model, its steering vector and optional probe; `run` generates one batch.

    `run` is called from one thread at a time (the batcher's); `tokenizer_lock` guards the
    tokenizer, which request handlers also use (fast tokenizers are not re-entrant).
    """

    def __init__(
        self,
        model,
        vector: np.ndarray,
        layer: int,
        *,
        probe=None,
        steer_positions: str = "all",
        max_batch: int = 16,
    ):
        self.model = model
        self.layer = int(layer)
        self.steering = Steering(self.layer, vector)
        self.steer_positions = steer_positions
        self.max_batch = int(max_batch)
        self.stop_ids = default_stop_tokens(model.tokenizer)
        self.tokenizer_lock = threading.Lock()
        self.probe = probe
        if probe is not None:
            if not probe.layers:
                raise ValueError(
                    "the probe file records no layers; the server needs to know which residual "
                    "stream it reads (train it on a store, or with layer=...)"
                )
            site = probe_site(probe)
            top = model.config.n_layers if site == "residual" else model.config.n_layers - 1
            bad = [x for x in probe.layers if not 0 <= x <= top]
            if bad:
                raise ValueError(
                    f"probe layers {bad} are outside the model's 0..{top} ({site} site)"
                )
            width = model.config.d_model * (len(probe.layers) if probe.combine == "concat" else 1)
            if width != probe.d_model:
                raise ValueError(
                    f"the probe reads width {probe.d_model} (layers {list(probe.layers)}, "
                    f"{probe.combine}) but this model gives {width}"
                )

    def run(self, rows: Sequence[Row]) -> list[RowResult]:
        """Generate all rows (same sampler, at most max_batch) in one generate call."""
        if not rows:
            return []
        sampler = rows[0].sampler
        if any(r.sampler != sampler for r in rows):
            raise ValueError("Engine.run: every row of a batch needs the same sampler")
        if len(rows) > self.max_batch:
            raise ValueError(f"Engine.run: {len(rows)} rows exceed max_batch {self.max_batch}")
        B = len(rows)
        # Copies of row 0 (same multiplier and seed) finish exactly when row 0 does, so the
        # padding never keeps the loop running longer.
        padded = list(rows) + [rows[0]] * (_pow2_at_least(B) - B)
        gen = generate(
            self.model,
            [list(r.prompt_ids) for r in padded],
            max_new_tokens=max(r.max_tokens for r in rows),
            sampler=sampler,
            stop_tokens=self.stop_ids,
            steering=self.steering,
            multipliers=[r.multiplier for r in padded],
            steer_positions=self.steer_positions,
            seed=[r.seed for r in padded],
            chat=False,
        )
        scores = self._probe_scores(padded) if self.probe is not None else [None] * len(padded)
        stops = set(self.stop_ids)
        out = []
        for b, row in enumerate(rows):
            ids = gen.token_ids[b][: row.max_tokens]
            finished = bool(ids) and ids[-1] in stops
            with self.tokenizer_lock:
                text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((i for s in row.stop if (i := text.find(s)) >= 0), default=None)
            if cut is not None:
                text, finished = text[:cut], True
            out.append(
                RowResult(
                    text=text,
                    token_ids=ids,
                    finish_reason="stop" if finished else "length",
                    probe_score=scores[b],
                    batch_rows=B,
                )
            )
        return out

    def _probe_scores(self, rows: Sequence[Row]) -> list[float]:
        """The probe's probability per row from the prompt's activations at the probe's
        layers and site (the store's `site` recorded at training; residual by default).

        `generate` does not return hidden states, so this is a second, capture-only forward over
        the same left-padded prompts with the same steering applied to the prompt: it runs only
        the blocks below the probe's deepest layer and no LM head, i.e. at most one prefill's
        worth of compute on top of the generation's prefill + decode.
        """
        from mup.probes import Activations

        probe = self.probe
        B = len(rows)
        longest = max(len(r.prompt_ids) for r in rows)
        P = max(MIN_PROMPT_BUCKET, _pow2_at_least(longest))
        tokens = np.zeros((B, P), np.int32)
        valid = np.zeros((B, P), bool)
        for b, r in enumerate(rows):
            tokens[b, P - len(r.prompt_ids) :] = r.prompt_ids
            valid[b, P - len(r.prompt_ids) :] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)  # [B, P]
        steer = 1.0 if self.steer_positions in ("all", "prompt") else 0.0
        dtype = jnp.dtype(self.model.params["embed"].dtype)
        spec = SteeringSpec(
            layers=(self.layer,),
            vectors=jnp.asarray(self.steering.vectors, dtype),  # [1, D]
            multipliers=jnp.asarray([[r.multiplier * steer for r in rows]], dtype),  # [1, B]
        )
        out = jit_forward(
            self.model.params,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            config=self.model.config,
            valid=jnp.asarray(valid),
            capture=tuple(probe.layers),
            site=probe_site(probe),
            steering=spec,
            logits=False,
        )
        hidden = [np.asarray(jax.device_get(out.hidden[x]), np.float32) for x in probe.layers]
        parts, lengths = [], []
        for b, r in enumerate(rows):
            n = len(r.prompt_ids)
            per_layer = [h[b, P - n :] for h in hidden]  # each [n, D]
            if probe.combine == "sum":
                parts.append(np.sum(per_layer, axis=0))
            else:
                parts.append(np.concatenate(per_layer, axis=1))
            lengths.append(n)
        offsets = np.zeros(B + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        acts = Activations(
            acts=np.concatenate(parts),
            offsets=offsets,
            mask=np.concatenate([r.probe_mask for r in rows]),
        )
        return [float(x) for x in probe.predict(acts)]


# ---------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    rows: list[Row]
    future: concurrent.futures.Future
    results: list[RowResult | None]


_STOP = object()


class Batcher:
    """Collects the rows of concurrent requests and runs them through `Engine.run` in batches.

    One worker thread owns the engine (JAX dispatch from one thread keeps compiled programs and
    device memory simple). `submit` returns a future of the request's row results. `close`
    lets every request submitted before it finish, then stops the thread.
    """

    def __init__(self, engine: Engine, *, window_s: float = 0.01, max_batch: int = 16):
        self.engine = engine
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mup-serve-batcher", daemon=True)
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def submit(self, rows: Sequence[Row]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not rows:
            future.set_result([])
            return future
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.put(_Job(list(rows), future, [None] * len(rows)))
        return future

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        # Rows of the previous batch: how many concurrent clients there were last time. Clients
        # that got their answers from one batch send their next requests a few ms apart (HTTP,
        # JSON, tokenization), so the batch waits up to the window for that many rows, and
        # leaves as soon as they are there, so a window long enough for stragglers costs a steady
        # stream of 7 clients nothing. After a lone request the plain window applies.
        expected = 1
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            n = len(first.rows)
            deadline = time.monotonic() + self.window_s
            while n < self.max_batch:
                early = 1 < expected <= n  # the clients of the last batch are all here
                remaining = 0.0 if early else deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                jobs.append(item)
                n += len(item.rows)
            expected = min(n, self.max_batch)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        groups: dict[Sampler, list[tuple[_Job, int]]] = {}
        for job in jobs:
            for i, row in enumerate(job.rows):
                groups.setdefault(row.sampler, []).append((job, i))
        failed: set[int] = set()
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                chunk = [(job, i) for job, i in chunk if id(job) not in failed]
                if not chunk:
                    continue
                try:
                    results = self.engine.run([job.rows[i] for job, i in chunk])
                except Exception as e:  # the request fails, the server keeps serving
                    log.exception("generation failed for a batch of %d rows", len(chunk))
                    for job, _ in chunk:
                        if id(job) not in failed:
                            failed.add(id(job))
                            job.future.set_exception(e)
                    continue
                for (job, i), result in zip(chunk, results, strict=True):
                    job.results[i] = result
        for job in jobs:
            if id(job) not in failed:
                job.future.set_result(job.results)
