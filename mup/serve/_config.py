"""The server's configuration: everything `mup serve` is told, checked once."""

from __future__ import annotations

import dataclasses
import re

from mup.text import MASK_MODES


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `mup serve` is told on its command line.

    model: model spec (short name, .gguf file, HF checkpoint dir or hub id).
    vectors: steering vectors as (name, file) pairs: safetensors (with a ``block`` metadata
      entry, ``layer`` in older files) or .npy [D]; none serves the plain model. A request picks
      one by name (`steer_vector`); the first is the default.
    block: block a .npy vector steers (must match a safetensors file's), and the block that
      request-supplied vectors (`steer_vector: [floats]`) steer; default: the first vector's.
    probes: probe files (`mup.probes.Probe.save`); every response then carries the first one's
      score (`probe_score`) and, with several, every one's (`probe_scores_by_probe`).
    probe_mask: which prompt tokens the probe reads (`mup.text.token_mask` modes).
    served_name: the model name clients send; default: the resolved spec's name.
    dtype: parameter and activation dtype.
    host / port: where to listen.
    api_key: when set, every /v1 request needs ``Authorization: Bearer <api_key>``.
    default_multiplier: applied when a request names none (and a vector is in use).
    max_multiplier: requests with |multiplier| above this are refused (400).
    max_vector_norm: request-supplied vectors with a larger L2 norm are refused (400).
    max_batch: engine slots, i.e. rows decoded together (a request with n choices takes n).
    batch_window_ms: when the engine is idle, how long a first request waits for company
      before its prefill (0: none).
    max_tokens_per_request: largest max_tokens a request may ask for.
    max_rows_per_request: most rows (prompts x n) one request may submit (a 400 above).
    max_waiting_rows: rows queued for a slot beyond which new requests get a 429 with
      Retry-After (a full queue only grows every waiting client's latency).
    default_max_tokens: used when a request gives no max_tokens.
    max_context: largest prompt + max_tokens, also each slot's KV cache length; default: the
      model's max_position_embeddings, at most DEFAULT_MAX_CONTEXT.
    prefill_chunk: longest prefill call (tokens); longer prompts are prefilled in chunks
      between decode steps.
    steer_positions: "all" (prompt and generated tokens, as the vLLM reference), "prompt" or
      "generated".
    warmup: compile the prefill and decode programs before reporting healthy.
    static_batches: admit requests only when no row is running (the static-batch design the
      engine replaced), the baseline that benchmarks/bench_serve.py measures the engine against.
    """

    model: str
    vectors: tuple[tuple[str, str], ...] = ()
    block: int | None = None
    probes: tuple[str, ...] = ()
    probe_mask: str = "all"
    served_name: str | None = None
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    default_multiplier: float = 1.0
    max_multiplier: float = 10.0
    max_vector_norm: float = 1000.0
    max_batch: int = 16
    batch_window_ms: float = 0.0
    max_tokens_per_request: int = 1024
    max_rows_per_request: int = 256
    max_waiting_rows: int = 4096
    default_max_tokens: int = 256
    max_context: int | None = None
    prefill_chunk: int = 512
    steer_positions: str = "all"
    warmup: bool = True
    static_batches: bool = False

    @property
    def probe(self) -> str | None:
        """The first probe file, or None."""
        return self.probes[0] if self.probes else None

    @property
    def vector(self) -> str | None:
        """The default (first) vector file, or None."""
        return self.vectors[0][1] if self.vectors else None

    def __post_init__(self):
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch must be in 1..256, got {self.max_batch}")
        if not self.max_multiplier >= 0:
            raise ValueError(f"max_multiplier must be >= 0, got {self.max_multiplier}")
        if not self.max_vector_norm > 0:
            raise ValueError(f"max_vector_norm must be > 0, got {self.max_vector_norm}")
        if abs(self.default_multiplier) > self.max_multiplier:
            raise ValueError(
                f"default_multiplier {self.default_multiplier} exceeds max_multiplier "
                f"{self.max_multiplier}"
            )
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_rows_per_request < 1 or self.max_waiting_rows < 1:
            raise ValueError("max_rows_per_request and max_waiting_rows must be >= 1")
        if self.max_tokens_per_request < 1 or self.default_max_tokens < 1:
            raise ValueError("max_tokens_per_request and default_max_tokens must be >= 1")
        if self.default_max_tokens > self.max_tokens_per_request:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_per_request "
                f"{self.max_tokens_per_request}"
            )
        if self.probe_mask not in MASK_MODES:
            raise ValueError(f"probe_mask must be one of {MASK_MODES}, got {self.probe_mask!r}")
        if self.steer_positions not in ("all", "prompt", "generated"):
            raise ValueError(
                f"steer_positions must be all, prompt or generated, got {self.steer_positions!r}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.prefill_chunk < 16 or self.prefill_chunk % 16:
            raise ValueError(f"prefill_chunk must be a multiple of 16, got {self.prefill_chunk}")
        names = [n for n, _ in self.vectors]
        if len(set(names)) != len(names):
            raise ValueError(f"vector names must be unique, got {names}")
        for name, _ in self.vectors:
            if not VECTOR_NAME.fullmatch(name):
                raise ValueError(
                    f"vector name {name!r}: use letters, digits, '.', '_' or '-' (NAME=FILE)"
                )


DEFAULT_MAX_CONTEXT = 2048  # each slot's KV cache is this long: memory and decode time scale
VECTOR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
