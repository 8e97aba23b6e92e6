"""The FastAPI application: routes, authentication, errors, streaming and request logs.

Every /v1 response carries, next to the OpenAI fields, the steering actually applied:
``steer_multiplier`` (float), ``steer_layer`` (int), ``system_fingerprint``
("mup-steer-l<layer>-m<multiplier>"), ``batch_rows`` (real rows in the generate call that
served it) and, with a probe, ``probe_score`` (the probe's
probability for the prompt). The official client keeps such extra fields (``model_extra``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mup.serve._config import ServeConfig
from mup.serve._engine import Batcher, Engine, Row, RowResult
from mup.serve._protocol import (
    APIError,
    Sampling,
    bad,
    fingerprint,
    parse_completion_prompts,
    parse_messages,
    parse_sampling,
    usage,
)

log = logging.getLogger("mup.serve")


def create_app(engine: Engine, config: ServeConfig, served_name: str) -> FastAPI:
    """The server application around a loaded `Engine` (batcher started with the app)."""
    max_context = config.max_context or int(engine.model.config.max_position_embeddings)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = Batcher(
            engine, window_s=config.batch_window_ms / 1000, max_batch=config.max_batch
        ).start()
        yield
        # uvicorn reaches this only after open requests have completed (graceful shutdown).
        await run_in_threadpool(state["batcher"].close)
        log.info("batcher stopped")

    app = FastAPI(title="mup steered server", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

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
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", None, "invalid_json")
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
            raise bad(
                f"this model's maximum context length is {max_context} tokens; the prompt has "
                f"{n_prompt} and max_tokens is {sampling.max_tokens}",
                param,
                "context_length_exceeded",
            )

    def chat_rows(messages, sampling: Sampling) -> list[Row]:
        from mup.text import encode_chats, encode_prompts, token_mask

        tok = engine.model.tokenizer
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
                raise bad(f"messages: {e}", "messages") from None
        if mask is not None and not mask.any():
            raise bad(
                f"the probe reads '{config.probe_mask}' tokens and this conversation has none",
                "messages",
            )
        check_length(len(ids), sampling, "messages")
        return _rows(ids, sampling, mask)

    def completion_rows(prompts, sampling: Sampling) -> list[Row]:
        tok = engine.model.tokenizer
        vocab = engine.model.config.vocab_size
        rows = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                with engine.tokenizer_lock:
                    ids = tok(prompt, add_special_tokens=True)["input_ids"]
                if not ids:
                    raise bad(f"prompt {i} encodes to no tokens", "prompt")
            else:
                ids = prompt
                if any(not 0 <= t < vocab for t in ids):
                    raise bad(
                        f"prompt {i}: token ids outside the vocabulary 0..{vocab - 1}", "prompt"
                    )
            check_length(len(ids), sampling, "prompt")
            # Raw text has no roles: the probe reads every prompt token.
            mask = np.ones(len(ids), bool) if engine.probe is not None else None
            rows.extend(_rows(ids, sampling, mask))
        return rows

    async def generate(rows: list[Row]) -> list[RowResult]:
        try:
            future = state["batcher"].submit(rows)
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        try:
            return await asyncio.wrap_future(future)
        except Exception as e:
            raise APIError(
                500, f"generation failed: {type(e).__name__}: {e}", type="server_error"
            ) from None

    def extras(sampling: Sampling, results: list[RowResult]) -> dict:
        out = {
            "system_fingerprint": fingerprint(sampling.multiplier, engine.layer),
            "steer_multiplier": sampling.multiplier,
            "steer_layer": engine.layer,
            # rows of the largest generate call this request's rows shared (batching at work)
            "batch_rows": max(r.batch_rows for r in results),
        }
        if engine.probe is not None:
            out["probe_score"] = results[0].probe_score
        return out

    def log_request(route, sampling, rows, results, t0):
        log.info(
            "%s multiplier=%+g rows=%d prompt_tokens=%d completion_tokens=%d batch_rows=%d "
            "latency=%.3fs",
            route,
            sampling.multiplier,
            len(rows),
            sum(len(r.prompt_ids) for r in rows),
            sum(len(r.token_ids) for r in results),
            max(r.batch_rows for r in results),
            time.perf_counter() - t0,
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served_name,
            "steer_layer": engine.layer,
            "probe": engine.probe is not None,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": served_name, "object": "model", "created": 0, "owned_by": "mup"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        messages = parse_messages(body)
        sampling = parse_sampling(body, config)
        rows = await run_in_threadpool(chat_rows, messages, sampling)
        results = await generate(rows)
        log_request("chat", sampling, rows, results, t0)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = len(rows[0].prompt_ids)
        n_completion = sum(len(r.token_ids) for r in results)
        head = {"id": rid, "created": created, "model": served_name}
        if sampling.stream:
            return _sse(
                _chat_chunks(engine, head, sampling, results, extras(sampling, results), n_prompt)
            )
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": None,
                }
                for i, r in enumerate(results)
            ],
            "usage": usage(n_prompt, n_completion),
            **extras(sampling, results),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        prompts = parse_completion_prompts(body)
        sampling = parse_sampling(body, config)
        rows = await run_in_threadpool(completion_rows, prompts, sampling)
        results = await generate(rows)
        log_request("completions", sampling, rows, results, t0)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = sum(len(r.prompt_ids) for r in rows[:: len(sampling.seeds)])
        n_completion = sum(len(r.token_ids) for r in results)
        head = {"id": rid, "created": created, "model": served_name}
        ext = extras(sampling, results)
        if engine.probe is not None and len(prompts) > 1:
            ext["probe_scores"] = [r.probe_score for r in results[:: len(sampling.seeds)]]
        if sampling.stream:
            return _sse(_completion_chunks(engine, head, sampling, results, ext, n_prompt))
        return {
            **head,
            "object": "text_completion",
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": usage(n_prompt, n_completion),
            **ext,
        }

    return app


def _rows(ids, sampling: Sampling, mask) -> list[Row]:
    return [
        Row(
            prompt_ids=tuple(int(t) for t in ids),
            max_tokens=sampling.max_tokens,
            multiplier=sampling.multiplier,
            sampler=sampling.sampler,
            seed=seed,
            stop=sampling.stop,
            probe_mask=mask,
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


def _pieces(engine: Engine, result: RowResult) -> list[str]:
    """The completion text split at token boundaries (what a token-by-token stream sends)."""
    tok = engine.model.tokenizer
    pieces, sent = [], ""
    with engine.tokenizer_lock:
        for k in range(1, len(result.token_ids) + 1):
            text = tok.decode(result.token_ids[:k], skip_special_tokens=True)
            # Cut at the final text (stop strings) and hold back partial multi-byte characters.
            if not result.text.startswith(text) or "\ufffd" in text[len(sent) :]:
                continue
            if len(text) > len(sent):
                pieces.append(text[len(sent) :])
                sent = text
    if len(result.text) > len(sent):
        pieces.append(result.text[len(sent) :])
    return pieces


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chat_chunks(engine, head, sampling, results, ext, n_prompt):
    base = {**head, "object": "chat.completion.chunk", **ext}
    for i, r in enumerate(results):
        yield {**base, "choices": [_delta(i, {"role": "assistant", "content": ""})]}
        for piece in _pieces(engine, r):
            yield {**base, "choices": [_delta(i, {"content": piece})]}
        yield {**base, "choices": [_delta(i, {}, r.finish_reason)]}
    if sampling.include_usage:
        n_completion = sum(len(r.token_ids) for r in results)
        yield {**base, "choices": [], "usage": usage(n_prompt, n_completion)}


async def _completion_chunks(engine, head, sampling, results, ext, n_prompt):
    base = {**head, "object": "text_completion", **ext}
    for i, r in enumerate(results):
        for piece in _pieces(engine, r):
            yield {**base, "choices": [_text(i, piece, None)]}
        yield {**base, "choices": [_text(i, "", r.finish_reason)]}
    if sampling.include_usage:
        n_completion = sum(len(r.token_ids) for r in results)
        yield {**base, "choices": [], "usage": usage(n_prompt, n_completion)}


def _delta(i: int, delta: dict, finish: str | None = None) -> dict:
    return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}


def _text(i: int, text: str, finish: str | None) -> dict:
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
