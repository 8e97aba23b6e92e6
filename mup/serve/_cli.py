"""`mup serve` (== `python -m mup.serve`): its command line, then check files, load, warm up,
serve until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mup import _compile_cache
from mup.serve._config import DEFAULT_MAX_CONTEXT, ServeConfig
from mup.serve._load import bind_port, build_engine, check_files, warm_up
from mup.text import MASK_MODES


def parse_vector_arg(text: str) -> tuple[str, str]:
    """`--vector [NAME=]FILE` -> (name, file); the name defaults to the file's stem."""
    name, sep, path = text.partition("=")
    if not sep or "/" in name or not name:
        return Path(text).stem, text
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mup serve",
        description="Serve a model (plain, or steered by any number of named vectors) behind an "
        "OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health, "
        "/metrics). Each request picks its vector (`steer_vector`: a name, or its own list of "
        "floats) and multiplier (`steer_multiplier`, or custom.steer_multiplier); requests are "
        "decoded together by a continuous-batching engine, tokens streamed as they decode.",
    )
    add = p.add_argument
    add("--model", required=True, help="model spec: smollm2-135m, a .gguf, an HF dir or hub id")
    add(
        "--vector",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="steering vector (.safetensors with metadata, or .npy); repeat for several; "
        "none serves the plain model",
    )
    add(
        "--block",
        "--layer",
        dest="block",
        type=int,
        help="steered block of .npy vectors and request-supplied vectors (--layer: its old name)",
    )
    add(
        "--probe",
        action="append",
        default=[],
        metavar="FILE",
        help="probe file; responses then carry its score for the prompt; repeat for several",
    )
    add("--probe-mask", choices=MASK_MODES, default="all", help="prompt tokens the probe reads")
    add("--served-name", help="model name clients use (default: the model's name)")
    add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    add("--default-multiplier", type=float, default=1.0)
    add("--max-multiplier", type=float, default=10.0)
    add("--max-vector-norm", type=float, default=1000.0, help="largest request-supplied norm")
    add("--max-batch", type=int, default=16, help="engine slots: rows decoded together")
    add("--batch-window-ms", type=float, default=0.0, help="idle engine: wait for company")
    add("--max-tokens-per-request", type=int, default=1024)
    add(
        "--max-rows-per-request",
        type=int,
        default=256,
        help="most rows (prompts x n) in one request; more get a 400",
    )
    add(
        "--max-waiting-rows",
        type=int,
        default=4096,
        help="rows queued for a slot beyond which requests get a 429 with Retry-After",
    )
    add("--default-max-tokens", type=int, default=256)
    add(
        "--max-context",
        type=int,
        help=f"largest prompt + max_tokens, the slot length (default: the model's, at most "
        f"{DEFAULT_MAX_CONTEXT})",
    )
    add("--prefill-chunk", type=int, default=512, help="longest prefill call, in tokens")
    add("--steer-positions", choices=("all", "prompt", "generated"), default="all")
    add("--no-warmup", action="store_true", help="skip compiling the engine before serving")
    add(
        "--static-batches",
        action="store_true",
        help="baseline: admit requests only when no row runs (static batches)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> ServeConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServeConfig(
            model=args.model,
            vectors=tuple(parse_vector_arg(v) for v in args.vector),
            block=args.block,
            probes=tuple(args.probe),
            probe_mask=args.probe_mask,
            served_name=args.served_name,
            dtype=args.dtype,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            default_multiplier=args.default_multiplier,
            max_multiplier=args.max_multiplier,
            max_vector_norm=args.max_vector_norm,
            max_batch=args.max_batch,
            batch_window_ms=args.batch_window_ms,
            max_tokens_per_request=args.max_tokens_per_request,
            max_rows_per_request=args.max_rows_per_request,
            max_waiting_rows=args.max_waiting_rows,
            default_max_tokens=args.default_max_tokens,
            max_context=args.max_context,
            prefill_chunk=args.prefill_chunk,
            steer_positions=args.steer_positions,
            warmup=not args.no_warmup,
            static_batches=args.static_batches,
        )
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from mup.serve._routes import create_app

    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("mup.serve")
    try:
        files = check_files(config)
        sock = bind_port(config.host, config.port)
    except ValueError as e:
        print(f"mup serve: error: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    _compile_cache.enable()
    t0 = time.perf_counter()
    try:
        engine = build_engine(config, files)
    except (OSError, ValueError) as e:
        print(f"mup serve: error: {e}", file=sys.stderr)
        return 2
    name = config.served_name or engine.model.spec.name
    log.info("loaded %s (%s) in %.1fs", name, engine.model.spec.path, time.perf_counter() - t0)
    if config.warmup:
        log.info("warm-up compile took %.1fs", warm_up(engine))
    engine.start()
    app = create_app(engine, config, name)
    steer = (
        ", ".join(f"{n} (block {engine.vector_blocks[n]})" for n in engine.vector_names)
        or "none (plain model)"
    )
    print(
        f"mup serve: model {name!r}; vectors: {steer}; default multiplier "
        f"{config.default_multiplier:+g}"
        f"{'; probes ' + ', '.join(config.probes) if config.probes else ''}; "
        f"{config.max_batch} slots of {engine.config.max_len} tokens; "
        f"on http://{config.host}:{port}/v1",
        flush=True,
    )
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: stop accepting, let open requests
    # finish, then run the app's lifespan exit (which drains the engine).
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=port, log_level="warning", access_log=False)
    )
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
