"""The FastAPI application: routes, authentication, errors, streaming and request logs.

Every /v1 response carries, next to the OpenAI fields, the steering actually applied:
``steer_multiplier`` (float), ``steer_layer`` (int, null unsteered), ``steer_vector`` (the
vector's name, "custom" for a request's own, null unsteered), ``system_fingerprint``
("mup-steer-l<layer>-m<multiplier>", "mup-plain" unsteered), ``batch_rows`` (most rows the
engine ran in one step with this request's rows; non-streamed responses) and, with a probe,
``probe_score`` (the probe's probability for the prompt, from the generation's own prefill).
The official client keeps such extra fields (``model_extra``).

Streaming is real: each SSE chunk leaves when the engine decodes its token; a client that
disconnects cancels its rows, which free their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import itertools
import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mup.engine import Engine, EngineClosed, Handle, Result, TokenLogprob
from mup.engine import Request as Row
from mup.serve._config import ServeConfig
from mup.serve._protocol import (
    MAX_BODY_BYTES,
    APIError,
    Sampling,
    fingerprint,
    invalid_request,
    parse_body,
    parse_completion_prompts,
    parse_messages,
    parse_sampling,
    usage,
)

log = logging.getLogger("mup.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks for a gone client


def create_app(engine: Engine, config: ServeConfig, served_name: str) -> FastAPI:
    """The server application around a started `mup.engine.Engine` (closed with the app)."""
    max_context = engine.config.max_len
    tok = engine.model.tokenizer
    # responses name each probe by its file's stem (the path where stems collide)
    stems = [Path(p).stem for p in config.probes]
    probe_names = [
        st if stems.count(st) == 1 else str(p) for st, p in zip(stems, config.probes, strict=True)
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        # uvicorn reaches this only after open requests have completed (graceful shutdown).
        await run_in_threadpool(engine.close)
        log.info("engine stopped")

    app = FastAPI(title="mup server", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_key(request)
        body = parse_body(await _bounded_body(request))
        model = body.get("model")
        if model != served_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {served_name!r}",
                param="model",
                code="model_not_found",
            )
        return body

    def check_length(n_prompt: int, sampling: Sampling, param: str) -> None:
        if n_prompt + sampling.max_tokens > max_context:
            raise invalid_request(
                f"this model's maximum context length is {max_context} tokens; the prompt has "
                f"{n_prompt} and max_tokens is {sampling.max_tokens}",
                param,
                "context_length_exceeded",
            )

    def chat_rows(messages, sampling: Sampling) -> list[Row]:
        from mup.text import encode_chats, encode_prompts, token_mask

        with engine.tokenizer_lock:
            try:
                ids = encode_prompts(tok, [messages])[0]
                mask = None
                if engine.probe is not None:
                    enc = encode_chats(tok, [messages])
                    mask = _prompt_mask(
                        ids, enc.input_ids, token_mask(enc.roles, enc.offsets, config.probe_mask)
                    )
            except (ValueError, TypeError) as e:
                raise invalid_request(f"messages: {e}", "messages") from None
        if mask is not None and not mask.any():
            raise invalid_request(
                f"the probe reads '{config.probe_mask}' tokens and this conversation has none",
                "messages",
            )
        check_length(len(ids), sampling, "messages")
        return _rows(ids, sampling, mask)

    def completion_rows(prompts, sampling: Sampling) -> tuple[list[Row], list[str | None]]:
        vocab = engine.model.config.vocab_size
        rows, texts = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                with engine.tokenizer_lock:
                    ids = tok(prompt, add_special_tokens=True)["input_ids"]
                if not ids:
                    raise invalid_request(f"prompt {i} encodes to no tokens", "prompt")
                texts.append(prompt)
            else:
                ids = prompt
                if any(not 0 <= t < vocab for t in ids):
                    raise invalid_request(
                        f"prompt {i}: token ids outside the vocabulary 0..{vocab - 1}", "prompt"
                    )
                texts.append(None)
            check_length(len(ids), sampling, "prompt")
            # Raw text has no roles: the probe reads every prompt token.
            mask = np.ones(len(ids), bool) if engine.probe is not None else None
            rows.extend(_rows(ids, sampling, mask))
        return rows, texts

    groups = itertools.count()

    def submit(rows: list[Row]) -> list[Handle]:
        if len(rows) > config.max_rows_per_request:
            raise invalid_request(
                f"this request makes {len(rows)} rows (prompts x n); this server takes at most "
                f"{config.max_rows_per_request} per request (--max-rows-per-request)",
                "n",
                "too_many_rows",
            )
        waiting = engine.waiting()
        if waiting + len(rows) > config.max_waiting_rows:
            raise APIError(
                429,
                f"the server's queue is full ({waiting} rows wait for a slot); retry shortly",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        group = next(groups)  # this request's rows are admitted fairly against others'
        handles: list[Handle] = []
        try:
            for row in rows:
                handles.append(engine.submit(dataclasses.replace(row, group=group)))
        except EngineClosed as e:
            for h in handles:
                h.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ValueError as e:
            for h in handles:
                h.cancel()
            raise invalid_request(str(e), None) from None
        return handles

    async def wait_all(request: Request, handles: list[Handle]) -> list[Result]:
        waiting = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            for h in handles:
                h.cancel()
            waiting.cancel()
            raise
        except Exception as e:
            raise APIError(
                500, f"generation failed: {type(e).__name__}: {e}", type="server_error"
            ) from None

    @functools.lru_cache(maxsize=65536)
    def token_str(token_id: int) -> str:
        with engine.tokenizer_lock:
            return tok.decode([token_id])

    def steer_extras(sampling: Sampling) -> dict:
        steer = sampling.steer
        return {
            "system_fingerprint": fingerprint(steer),
            "steer_multiplier": steer.multiplier,
            "steer_layer": steer.layer,
            "steer_vector": steer.name,
        }

    def extras(sampling: Sampling, results: list[Result]) -> dict:
        out = steer_extras(sampling)
        # most rows the engine ran in one step with this request's rows (batching at work)
        out["batch_rows"] = max(r.batch_rows for r in results)
        if engine.probe is not None:
            out["probe_score"] = results[0].probe_score
            if len(probe_names) > 1:
                out["probe_scores_by_probe"] = dict(
                    zip(probe_names, results[0].probe_scores or [], strict=False)
                )
        return out

    def log_request(route, sampling, rows, results, t0):
        log.info(
            "%s vector=%s multiplier=%+g rows=%d prompt_tokens=%d completion_tokens=%d "
            "batch_rows=%d latency=%.3fs",
            route,
            sampling.steer.name,
            sampling.multiplier,
            len(rows),
            sum(len(r.prompt_ids) for r in rows),
            sum(len(r.token_ids) for r in results),
            max(r.batch_rows for r in results),
            time.perf_counter() - t0,
        )

    def chat_logprob(t: TokenLogprob) -> dict:
        entry = _chat_token(token_str(t.token_id), t.logprob)
        entry["top_logprobs"] = [_chat_token(token_str(i), lp) for i, lp in t.top]
        return entry

    def completion_logprobs(items: list[TokenLogprob | None], start: int = 0) -> dict:
        """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for t in items:
            if t is None:  # the first prompt token: nothing predicts it
                continue
            s = token_str(t.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            # As vLLM and the OpenAI legacy API: the top-k plus the chosen token.
            top = {token_str(i): lp for i, lp in t.top}
            top.setdefault(s, t.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def echo_logprobs(row: Row, prompt_lps) -> dict:
        first = token_str(row.prompt_ids[0])
        out = completion_logprobs(prompt_lps or [], start=len(first))
        out["tokens"].insert(0, first)
        out["token_logprobs"].insert(0, None)
        out["top_logprobs"].insert(0, None)
        out["text_offset"].insert(0, 0)
        return out

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served_name,
            "steer_layer": engine.vector_layers[engine.vector_names[0]]
            if engine.vector_names
            else None,
            "probe": engine.probe is not None,
            "vectors": engine.steering_layers,
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        vectors = [{"name": n, "layer": engine.vector_layers[n]} for n in engine.vector_names]
        return {
            "object": "list",
            "data": [
                {
                    "id": served_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mup",
                    "max_model_len": max_context,
                    "vectors": vectors,
                    "custom_vector_layer": engine.custom_layer,
                    "probe": engine.probe is not None,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        messages = parse_messages(body)
        sampling = parse_sampling(body, config, engine, "chat")
        rows = await run_in_threadpool(chat_rows, messages, sampling)
        handles = submit(rows)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": served_name}
        n_prompt = len(rows[0].prompt_ids)
        if sampling.stream:
            return _sse(chat_stream(head, sampling, handles, n_prompt, rows, t0))
        results = await wait_all(request, handles)
        log_request("chat", sampling, rows, results, t0)
        n_completion = sum(len(r.token_ids) for r in results)
        choices = []
        for i, r in enumerate(results):
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            if sampling.logprobs:
                choice["logprobs"] = {
                    "content": [chat_logprob(t) for t in r.logprobs or []],
                    "refusal": None,
                }
            if sampling.probe_token_scores:
                choice["probe_token_scores"] = r.probe_token_scores
            choices.append(choice)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(n_prompt, n_completion),
            **extras(sampling, results),
        }

    async def chat_stream(head, sampling, handles, n_prompt, rows, t0):
        base = {**head, "object": "chat.completion.chunk", **steer_extras(sampling)}
        events = _merge(handles)
        first = True
        async for i, ev in events:
            if first:
                if engine.probe is not None:
                    base["probe_score"] = handles[0].probe_score
                    if len(probe_names) > 1:
                        base["probe_scores_by_probe"] = dict(
                            zip(probe_names, handles[0].probe_scores or [], strict=False)
                        )
                for j in range(len(handles)):
                    yield {**base, "choices": [_delta(j, {"role": "assistant", "content": ""})]}
                first = False
            if ev is None:  # choice i finished
                r = handles[i].result(0)
                choice = _delta(i, {}, r.finish_reason)
                if sampling.probe_token_scores:
                    choice["probe_token_scores"] = r.probe_token_scores
                yield {**base, "choices": [choice]}
                continue
            choice = _delta(i, {"content": ev.text})
            if sampling.logprobs and ev.logprob is not None:
                choice["logprobs"] = {"content": [chat_logprob(ev.logprob)], "refusal": None}
            elif not ev.text:
                continue
            yield {**base, "choices": [choice]}
        results = [h.result(0) for h in handles]
        log_request("chat-stream", sampling, rows, results, t0)
        if sampling.include_usage:
            n_completion = sum(len(r.token_ids) for r in results)
            yield {
                **base,
                "choices": [],
                "usage": usage(n_prompt, n_completion),
                "batch_rows": max(r.batch_rows for r in results),
            }

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        prompts = parse_completion_prompts(body)
        sampling = parse_sampling(body, config, engine, "completions")
        rows, texts = await run_in_threadpool(completion_rows, prompts, sampling)
        handles = submit(rows)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": served_name}
        n = len(sampling.seeds)
        n_prompt = sum(len(r.prompt_ids) for r in rows[::n])
        if sampling.stream:
            return _sse(completion_stream(head, sampling, handles, rows, texts, n_prompt, t0))
        results = await wait_all(request, handles)
        log_request("completions", sampling, rows, results, t0)
        n_completion = sum(len(r.token_ids) for r in results)
        ext = extras(sampling, results)
        if engine.probe is not None and len(prompts) > 1:
            ext["probe_scores"] = [r.probe_score for r in results[::n]]
        choices = []
        for i, (row, r) in enumerate(zip(rows, results, strict=True)):
            prefix = ""
            if sampling.echo:
                prefix = texts[i // n] if texts[i // n] is not None else _decode(row.prompt_ids)
            choice = {
                "index": i,
                "text": prefix + r.text,
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            if sampling.logprobs:
                gen = completion_logprobs(r.logprobs or [])
                if sampling.echo:
                    lp = echo_logprobs(row, r.prompt_logprobs)
                    end = sum(len(s) for s in lp["tokens"])
                    gen = completion_logprobs(r.logprobs or [], start=end)
                    gen = {k: lp[k] + gen[k] for k in lp}
                choice["logprobs"] = gen
            if sampling.probe_token_scores:
                choice["probe_token_scores"] = r.probe_token_scores
            choices.append(choice)
        return {
            **head,
            "object": "text_completion",
            "choices": choices,
            "usage": usage(n_prompt, n_completion),
            **ext,
        }

    def _decode(ids) -> str:
        with engine.tokenizer_lock:
            return tok.decode(list(ids))

    async def completion_stream(head, sampling, handles, rows, texts, n_prompt, t0):
        base = {**head, "object": "text_completion", **steer_extras(sampling)}
        n = len(sampling.seeds)
        offsets = [0] * len(handles)
        first = True
        async for i, ev in _merge(handles):
            if first:
                if engine.probe is not None:
                    base["probe_score"] = handles[0].probe_score
                    if len(probe_names) > 1:
                        base["probe_scores_by_probe"] = dict(
                            zip(probe_names, handles[0].probe_scores or [], strict=False)
                        )
                first = False
            if sampling.echo and offsets[i] == 0 and (ev is None or ev.index == 0):
                row = rows[i]
                prefix = texts[i // n] if texts[i // n] is not None else _decode(row.prompt_ids)
                lp = echo_logprobs(row, handles[i].prompt_logprobs) if sampling.logprobs else None
                offsets[i] = max(1, len(prefix))
                yield {**base, "choices": [_text(i, prefix, None, lp)]}
            if ev is None:
                r = handles[i].result(0)
                choice = _text(i, "", r.finish_reason)
                if sampling.probe_token_scores:
                    choice["probe_token_scores"] = r.probe_token_scores
                yield {**base, "choices": [choice]}
                continue
            lp = None
            if sampling.logprobs and ev.logprob is not None:
                lp = completion_logprobs([ev.logprob], start=offsets[i])
            elif not ev.text:
                continue
            offsets[i] += len(ev.text)
            yield {**base, "choices": [_text(i, ev.text, None, lp)]}
        results = [h.result(0) for h in handles]
        log_request("completions-stream", sampling, rows, results, t0)
        if sampling.include_usage:
            n_completion = sum(len(r.token_ids) for r in results)
            yield {
                **base,
                "choices": [],
                "usage": usage(n_prompt, n_completion),
                "batch_rows": max(r.batch_rows for r in results),
            }

    return app


async def _bounded_body(request: Request) -> bytes:
    """The body, refused with a 413 past MAX_BODY_BYTES, whether the client declared its
    length or streams it chunked."""
    too_big = APIError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _rows(ids, sampling: Sampling, mask) -> list[Row]:
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
        )
        for seed in sampling.seeds
    ]


def _prompt_mask(prompt_ids, conversation_ids, conversation_mask) -> np.ndarray:
    """Probe mask over the generation prompt: the conversation's mask, False on the tokens the
    template appends to open the assistant turn."""
    n = len(conversation_ids)
    mask = np.zeros(len(prompt_ids), bool)
    if n <= len(prompt_ids) and list(prompt_ids[:n]) == [int(t) for t in conversation_ids]:
        mask[:n] = conversation_mask
    else:
        # Templates whose generation prompt rewrites earlier tokens: read the whole prompt.
        log.warning("conversation tokens are not a prefix of the prompt; probe reads all tokens")
        mask[:] = True
    return mask


async def _merge(handles: list[Handle]):
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


def _chat_token(s: str, logprob: float) -> dict:
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def _sse(chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            log.exception("stream failed")
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _delta(i: int, delta: dict, finish: str | None = None) -> dict:
    return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}


def _text(i: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}
