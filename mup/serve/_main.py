"""`python -m mup.serve` / `mup serve`: load, warm up, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from mup import _compile_cache
from mup.serve._config import ServeConfig, parse_args


def build_engine(config: ServeConfig):
    """Load the model, steering vector and probe named by `config` into an `Engine`."""
    from mup.models import load_model
    from mup.serve._engine import Engine

    model = load_model(config.model, dtype=config.dtype)
    vector, layer = _load_vector(config, model.config.d_model)
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(
            f"{config.vector}: steering layer {layer} is outside the model's blocks "
            f"0..{model.config.n_layers - 1}"
        )
    probe = None
    if config.probe:
        from mup.probes import load

        probe = load(config.probe)
    return Engine(
        model,
        vector,
        layer,
        probe=probe,
        steer_positions=config.steer_positions,
        max_batch=config.max_batch,
    )


def _load_vector(config: ServeConfig, d_model: int):
    # Prefer the steering package's reader (the files its commands write) when it is there;
    # the private reader accepts the same two formats otherwise.
    try:
        from mup.steering import load_vector
    except ImportError:
        from mup.serve._vectors import load_steering_vector

        return load_steering_vector(config.vector, config.layer, d_model)
    sv = load_vector(config.vector, layer=config.layer, d_model=d_model)
    return sv.vector, sv.layer


def warm_up(engine) -> float:
    """Compile the single-row loop (and probe capture) for a short chat before the server
    reports healthy, so that the first real request does not pay for it."""
    import numpy as np

    from mup.models import Greedy
    from mup.serve._engine import Row
    from mup.text import encode_prompts

    t0 = time.perf_counter()
    with engine.tokenizer_lock:
        ids = encode_prompts(engine.model.tokenizer, [[{"role": "user", "content": "Hello!"}]])[0]
    mask = np.ones(len(ids), bool) if engine.probe is not None else None
    row = Row(
        prompt_ids=tuple(ids), max_tokens=1, multiplier=0.0, sampler=Greedy(), seed=0,
        probe_mask=mask,
    )  # fmt: skip
    engine.run([row])
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from mup.serve._app import create_app

    config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("mup.serve")
    _compile_cache.enable()
    t0 = time.perf_counter()
    try:
        engine = build_engine(config)
    except (OSError, ValueError) as e:
        print(f"mup serve: {e}", file=sys.stderr)
        return 2
    name = config.served_name or engine.model.spec.name
    log.info("loaded %s (%s) in %.1fs", name, engine.model.spec.path, time.perf_counter() - t0)
    if config.warmup:
        log.info("warm-up compile took %.1fs", warm_up(engine))
    app = create_app(engine, config, name)
    print(
        f"mup serve: model {name!r} steered at layer {engine.layer} by {config.vector} "
        f"(default multiplier {config.default_multiplier:+g}"
        f"{', probe ' + config.probe if config.probe else ''}) "
        f"on http://{config.host}:{config.port}/v1",
        flush=True,
    )
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown: stop accepting, let open requests
    # finish, then run the app's lifespan exit (which drains the batcher).
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    return 0
