"""Before serving: read the command line's vector and probe files, bind the listening port,
load the model, build and warm up the engine (`mup serve` runs these in order; each is usable
on its own)."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

from mup.serve._config import DEFAULT_MAX_CONTEXT, ServeConfig


@dataclasses.dataclass(frozen=True)
class _Files:
    """What the command line's files hold, read before the model loads."""

    vectors: dict  # name -> (vector [D] float32, steered block)
    probes: list  # loaded probes, in command-line order


def check_files(config: ServeConfig) -> _Files:
    """Read every vector and probe file named by `config`; a bad one raises ValueError with
    one line naming the flag and the file. Runs before the (slow) model load."""
    vectors = {}
    for name, path in config.vectors:
        where = f"--vector {name}={path}"
        try:
            vectors[name] = _read_vector(path, config.block)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: {_one_line(e)}") from None
    probes = []
    for path in config.probes:
        from mup.probes import load

        if not Path(path).is_file():
            raise ValueError(f"--probe {path}: file not found")
        try:
            probe = load(path)
        except Exception as e:  # noqa: BLE001 - any unreadable probe file is one clear line
            raise ValueError(f"--probe {path}: {_one_line(e)}") from None
        if not probe.layers:
            raise ValueError(
                f"--probe {path}: the probe records no layers (train it on a store, "
                "or with layer=...)"
            )
        probes.append(probe)
    return _Files(vectors=vectors, probes=probes)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_vector(path: str, block: int | None):
    from mup.steering import load_vector

    # load_vector says "vector file ... does not exist"; the flag already names the file.
    if not Path(path).is_file():
        raise ValueError("file not found")
    sv = load_vector(path, block=block)  # a finite float32 [D] vector, or VectorFileError
    return sv.vector, sv.block


def bind_port(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails in one line at
    once instead of after the load and warm-up, and nothing can take it in between (uvicorn
    serves on this very socket). Port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        raise ValueError(
            f"--port {port}: cannot listen on {host}:{port} ({reason}); is another server "
            "running there? choose another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def build_engine(config: ServeConfig, files: _Files | None = None):
    """Check the files, load the model, and build the started-to-be `mup.engine.Engine`."""
    from mup.engine import Engine, EngineConfig, check_probe
    from mup.models import load_model

    files = check_files(config) if files is None else files
    model = load_model(config.model, dtype=config.dtype)
    mc = model.config
    for name, (vec, block) in files.vectors.items():
        path = dict(config.vectors)[name]
        if vec.shape != (mc.d_model,):
            raise ValueError(
                f"--vector {name}={path}: shape {vec.shape}, the model needs [{mc.d_model}]"
            )
        if not 0 <= block < mc.n_layers:
            raise ValueError(
                f"--vector {name}={path}: steered block {block} is outside the model's blocks "
                f"0..{mc.n_layers - 1}"
            )
    for path, probe in zip(config.probes, files.probes, strict=True):
        try:
            check_probe(probe, mc)
        except ValueError as e:
            raise ValueError(f"--probe {path}: {e}") from None
    custom = config.block
    if custom is None and files.vectors:
        custom = next(iter(files.vectors.values()))[1]
    if custom is not None and not 0 <= custom < mc.n_layers:
        raise ValueError(f"--block {custom} is outside the model's blocks 0..{mc.n_layers - 1}")
    return Engine(
        model,
        vectors=files.vectors,
        custom_block=custom,
        probe=files.probes or None,
        config=EngineConfig(
            max_slots=config.max_batch,
            max_len=max_context(config, model),
            prefill_chunk=config.prefill_chunk,
            steer_positions=config.steer_positions,
            admit_window_s=config.batch_window_ms / 1000,
            static_batches=config.static_batches,
        ),
    )


def max_context(config: ServeConfig, model) -> int:
    if config.max_context is not None:
        return int(config.max_context)
    return min(int(model.config.max_position_embeddings), DEFAULT_MAX_CONTEXT)


def warm_up(engine) -> float:
    """Compile the engine's prefill, insert and decode programs (`Engine.warm_up`) before the
    server reports healthy, so that no request of a greedy load waits for a compile."""
    t0 = time.perf_counter()
    engine.warm_up()
    return time.perf_counter() - t0
