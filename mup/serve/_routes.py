"""The FastAPI application: thin routes over the serving code (`_serving`), plus authentication,
errors and the engine's lifetime.

Each /v1 route checks the key, reads the JSON body (a 413 past `MAX_BODY_BYTES`, a 400 unless it
is a valid JSON object: `parse_body`) and its `model`, and hands the rest to `ChatServing` /
`CompletionServing` (`_chat`, `_completions`), which return a body or a stream of chunks.
Streaming is real: each SSE chunk leaves when the engine decodes its token; a client that
disconnects cancels its rows, which free their slots at the engine's next step.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mup.engine import Engine
from mup.serve._chat import ChatServing
from mup.serve._completions import CompletionServing
from mup.serve._config import ServeConfig
from mup.serve._protocol import MAX_BODY_BYTES, APIError, parse_body

log = logging.getLogger("mup.serve")


def create_app(engine: Engine, config: ServeConfig, served_name: str) -> FastAPI:
    """The server application around a started `mup.engine.Engine` (closed with the app)."""
    chat = ChatServing(engine, config, served_name)
    completions = CompletionServing(engine, config, served_name)

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

    @app.get("/health")
    async def health():
        return chat.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return chat.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        return _respond(await chat.create(body, request.is_disconnected, t0))

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        return _respond(await completions.create(body, request.is_disconnected, t0))

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


def _respond(out):
    """A body as JSON; a stream of chunks as server-sent events."""
    return out if isinstance(out, dict) else _sse(out)


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
