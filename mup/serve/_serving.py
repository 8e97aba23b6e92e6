"""The serving code under the routes: what the chat and completions bodies share.

A validated request becomes engine rows (`rows`), the rows handles (`Serving.submit`), the
handles results (`Serving.wait_all`) or a merged token stream (`merge`). Every /v1 response
carries, next to the OpenAI fields, the steering actually applied: ``steer_multiplier``
(float), ``steer_block`` (int, the steered block; null unsteered), ``steer_vector`` (the vector's
name, "custom" for a request's own, null unsteered), ``system_fingerprint``
("mup-steer-l<block>-m<multiplier>",
"mup-plain" unsteered), ``batch_rows`` (most rows the engine ran in one step with this request's
rows; non-streamed responses) and, with a probe, ``probe_score`` (the probe's probability for
the prompt, from the generation's own prefill). The official client keeps such extra fields
(``model_extra``).

Deprecated duplicates, kept for one release: ``steer_layer`` (= ``steer_block``) in responses
and /health, a vector's ``layer`` (= ``block``) and ``custom_vector_layer`` (=
``custom_vector_block``) in /v1/models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from mup.engine import Engine, EngineClosed, GrammarError, Handle, Result
from mup.engine import Request as Row
from mup.serve._config import ServeConfig
from mup.serve._protocol import (
    RESPONSE_FORMATS,
    APIError,
    Sampling,
    fingerprint,
    invalid_request,
    usage,
)

log = logging.getLogger("mup.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks for a gone client
# One engine group per request, numbered across both routes' Serving objects: a request's rows
# are admitted fairly against every other request's (`mup.engine.Request.group`).
_GROUPS = itertools.count()


class Serving:
    """One started `mup.engine.Engine` seen from the OpenAI routes: submission, waiting, and
    the fields every response body shares."""

    def __init__(self, engine: Engine, config: ServeConfig, served_name: str):
        self.engine = engine
        self.config = config
        self.served_name = served_name
        self.tokenizer = engine.model.tokenizer
        self.max_context = engine.config.max_len
        # responses name each probe by its file's stem (the path where stems collide)
        stems = [Path(p).stem for p in config.probes]
        self.probe_names = [
            st if stems.count(st) == 1 else str(p)
            for st, p in zip(stems, config.probes, strict=True)
        ]
        self.token_str = functools.lru_cache(maxsize=65536)(self._token_str)

    def _token_str(self, token_id: int) -> str:
        with self.engine.tokenizer_lock:
            return self.tokenizer.decode([token_id])

    def decode(self, ids) -> str:
        with self.engine.tokenizer_lock:
            return self.tokenizer.decode(list(ids))

    def head(self, prefix: str) -> dict:
        """id, created and model of a response (and of each of its stream chunks)."""
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.served_name,
        }

    def check_length(self, n_prompt: int, sampling: Sampling, param: str) -> None:
        if n_prompt + sampling.max_tokens > self.max_context:
            raise invalid_request(
                f"this model's maximum context length is {self.max_context} tokens; the prompt "
                f"has {n_prompt} and max_tokens is {sampling.max_tokens}",
                param,
                "context_length_exceeded",
            )

    def submit(self, rows: list[Row]) -> list[Handle]:
        """All rows of one request, or none (every handle cancelled when one is refused): a 400
        past --max-rows-per-request, a 429 with Retry-After past --max-waiting-rows."""
        config = self.config
        if len(rows) > config.max_rows_per_request:
            raise invalid_request(
                f"this request makes {len(rows)} rows (prompts x n); this server takes at most "
                f"{config.max_rows_per_request} per request (--max-rows-per-request)",
                "n",
                "too_many_rows",
            )
        waiting = self.engine.waiting()
        if waiting + len(rows) > config.max_waiting_rows:
            raise APIError(
                429,
                f"the server's queue is full ({waiting} rows wait for a slot); retry shortly",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        group = next(_GROUPS)  # this request's rows are admitted fairly against others'
        handles: list[Handle] = []
        try:
            for row in rows:
                handles.append(self.engine.submit(dataclasses.replace(row, group=group)))
        except EngineClosed as e:
            for h in handles:
                h.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except GrammarError as e:  # compiled, but not buildable over this model's tokenizer
            for h in handles:
                h.cancel()
            raise invalid_request(
                f"'response_format' cannot constrain this model's tokens: {e}", "response_format"
            ) from None
        except ValueError as e:
            for h in handles:
                h.cancel()
            raise invalid_request(str(e), None) from None
        return handles

    async def wait_all(
        self, handles: list[Handle], is_disconnected: Callable[[], Awaitable[bool]]
    ) -> list[Result]:
        """Every handle's result; a client that goes away cancels them all (its slots free at
        the next step) and gets a 499, the status proxies log for a closed request, instead of
        the traceback an escaping CancelledError made the ASGI server print."""
        waiting = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiting.result()
                if await is_disconnected():
                    await _cancel(handles, waiting)
                    raise APIError(
                        499,
                        f"client closed the request; {len(handles)} row(s) cancelled",
                        type="client_closed_request",
                    )
        except asyncio.CancelledError:  # the server's task was cancelled (shutdown)
            await _cancel(handles, waiting)
            raise
        except APIError:
            raise
        except Exception as e:
            raise APIError(
                500, f"generation failed: {type(e).__name__}: {e}", type="server_error"
            ) from None

    def steer_extras(self, sampling: Sampling) -> dict:
        steer = sampling.steer
        return {
            "system_fingerprint": fingerprint(steer),
            "steer_multiplier": steer.multiplier,
            "steer_block": steer.block,
            "steer_layer": steer.block,  # deprecated duplicate of steer_block
            "steer_vector": steer.name,
        }

    def probe_extras(self, first: Handle | Result) -> dict:
        """The prompt's probe scores, from a request's first row (none without a probe)."""
        if self.engine.probe is None:
            return {}
        out = {"probe_score": first.probe_score}
        if len(self.probe_names) > 1:
            out["probe_scores_by_probe"] = dict(
                zip(self.probe_names, first.probe_scores or [], strict=False)
            )
        return out

    def extras(self, sampling: Sampling, results: list[Result]) -> dict:
        """The mup fields of a non-streamed response."""
        out = self.steer_extras(sampling)
        # most rows the engine ran in one step with this request's rows (batching at work)
        out["batch_rows"] = max(r.batch_rows for r in results)
        out.update(self.probe_extras(results[0]))
        return out

    def usage_chunk(self, base: dict, n_prompt: int, results: list[Result]) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`."""
        n_completion = sum(len(r.token_ids) for r in results)
        return {
            **base,
            "choices": [],
            "usage": usage(n_prompt, n_completion),
            "batch_rows": max(r.batch_rows for r in results),
        }

    def log_request(self, route, sampling, rows, results, t0) -> None:
        log.info(
            "%s vector=%s multiplier=%+g format=%s rows=%d prompt_tokens=%d "
            "completion_tokens=%d batch_rows=%d latency=%.3fs",
            route,
            sampling.steer.name,
            sampling.multiplier,
            "text" if sampling.grammar is None else sampling.grammar.kind,
            len(rows),
            sum(len(r.prompt_ids) for r in rows),
            sum(len(r.token_ids) for r in results),
            max(r.batch_rows for r in results),
            time.perf_counter() - t0,
        )

    def health(self) -> dict:
        engine = self.engine
        block = engine.vector_blocks[engine.vector_names[0]] if engine.vector_names else None
        return {
            "status": "ok",
            "model": self.served_name,
            "steer_block": block,
            "steer_layer": block,  # deprecated duplicate of steer_block
            "probe": engine.probe is not None,
            "vectors": engine.steering_blocks,
        }

    def models(self) -> dict:
        engine = self.engine
        # "layer": a deprecated duplicate of "block"
        vectors = [
            {"name": n, "block": engine.vector_blocks[n], "layer": engine.vector_blocks[n]}
            for n in engine.vector_names
        ]
        return {
            "object": "list",
            "data": [
                {
                    "id": self.served_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mup",
                    "max_model_len": self.max_context,
                    "vectors": vectors,
                    "custom_vector_block": engine.custom_block,
                    "custom_vector_layer": engine.custom_block,  # deprecated duplicate
                    "probe": engine.probe is not None,
                    # decoding is constrained to JSON for the two JSON modes
                    "response_formats": list(RESPONSE_FORMATS),
                }
            ],
        }


def rows(ids, sampling: Sampling, mask) -> list[Row]:
    """The engine rows of one prompt: one per choice (seed)."""
    return [
        Row(
            prompt_ids=tuple(int(t) for t in ids),
            max_tokens=sampling.max_tokens,
            multiplier=sampling.multiplier if sampling.steer.vector is not None else 0.0,
            vector=sampling.steer.vector,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            stop=sampling.stop,
            logprobs=sampling.logprobs,
            top_logprobs=sampling.top_logprobs,
            prompt_logprobs=sampling.echo,
            probe_mask=mask,
            probe_token_scores=sampling.probe_token_scores,
            grammar=sampling.grammar,
        )
        for seed in sampling.seeds
    ]


async def merge(handles: list[Handle]):
    """(choice index, token event) pairs of all handles as they arrive, and (index, None) when
    a choice finishes; cancels every handle if the consumer goes away (client disconnect)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle):
        try:
            async for ev in h.stream():
                await queue.put((i, ev, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - surfaced to the consumer below
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    remaining = len(handles)
    try:
        while remaining:
            i, ev, error = await queue.get()
            if error is not None:
                raise error
            if ev is None:
                remaining -= 1
            yield i, ev
    finally:
        for h in handles:
            h.cancel()
        for t in tasks:
            t.cancel()


async def _cancel(handles: list[Handle], waiting: asyncio.Future) -> None:
    """Cancel the rows and reap their gather, so asyncio does not report its
    CancelledError as an exception that was never retrieved."""
    for h in handles:
        h.cancel()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await waiting
