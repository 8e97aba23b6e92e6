"""The inspect-ai model provider `mup/<spec>`: in-process steered generation, batched.

    inspect eval TASK --model mup/smollm2-135m -M vector=v.npy -M layer=12 -M multiplier=1.0

Axis letters: B batch rows, D model width.

inspect calls `generate` once per sample, concurrently (up to max_connections per model, and
for several models at once when one `eval()` runs tasks x models). Every provider instance
that shares (model, dtype, vector, layer) also shares one `_Batcher`: the requests that arrive
while a batch runs are gathered into the next `mup.models.generate` call, with each row's own
multiplier, so the seven multipliers of a sweep run as one batch, not seven.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

PROVIDER = "mup"
DEFAULT_MAX_TOKENS = 256
# Batch sizes are padded up to one of these (with copies of a real row, outputs dropped):
# `generate` compiles one XLA program per batch size, so arbitrary sizes would recompile.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
# How long the first request of a batch waits for company. inspect starts a task's samples
# within a few milliseconds of each other; a model step takes far longer than this.
GATHER_SECONDS = 0.05


def load_vector(
    path: str | os.PathLike, layer: int | None = None, d_model: int | None = None
) -> tuple[np.ndarray, int]:
    """A steering vector file -> (vector [D] float32, layer), via `mup.steering.load_vector`.

    `.safetensors` files from mup.steering carry their layer (an explicit `layer` must agree);
    a plain `.npy` array [D] needs `layer`. With `d_model`, the shape is checked too.
    """
    from mup.steering import load_vector as read_vector

    loaded = read_vector(path, layer=None if layer is None else int(layer), d_model=d_model)
    return np.asarray(loaded.vector, np.float32), int(loaded.layer)


# ---------------------------------------------------------------------------------------------
# Loaded models and batchers, shared by every provider instance of one process
# ---------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], Any] = {}
_BATCHERS: dict[tuple, _Batcher] = {}


def _load(spec: str, dtype: str):
    from mup.models import load_model

    with _LOCK:
        key = (spec, dtype)
        if key not in _MODELS:
            _MODELS[key] = load_model(spec, dtype=dtype)  # type: ignore[arg-type]
        return _MODELS[key]


@dataclasses.dataclass
class _Request:
    messages: list[dict[str, str]]
    multiplier: float
    max_new_tokens: int
    sampler: Any
    seed: int
    future: asyncio.Future


class _Batcher:
    """Gathers concurrent requests and runs them as `mup.models.generate` batches.

    One worker task per event loop drains the queue: requests that need the same compiled
    program (max_new_tokens, sampler) go into one call, each row with its own multiplier.
    Generation runs in a worker thread so that inspect's event loop keeps scheduling samples
    (and so keeps filling the next batch) meanwhile.
    """

    def __init__(self, model, steering, max_batch: int):
        self.model = model
        self.steering = steering
        self.max_batch = max_batch
        self._pending: list[_Request] = []
        self._worker: asyncio.Task | None = None
        self.batches: list[tuple[float, ...]] = []  # each call's row multipliers (real rows)

    async def submit(self, request: _Request):
        loop = asyncio.get_running_loop()
        self._pending.append(request)
        worker = self._worker
        # Each inspect `eval()` runs its own event loop: a worker of an earlier loop is gone.
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._worker = loop.create_task(self._work())
        return await request.future

    async def _work(self) -> None:
        await asyncio.sleep(GATHER_SECONDS)
        loop = asyncio.get_running_loop()
        while True:
            # Requests of a finished loop (a cancelled eval) can never be answered: drop them.
            self._pending = [
                r for r in self._pending if r.future.get_loop() is loop and not r.future.done()
            ]
            if not self._pending:
                return
            first = self._pending[0]
            key = (first.max_new_tokens, first.sampler)
            batch = [r for r in self._pending if (r.max_new_tokens, r.sampler) == key]
            batch = batch[: self.max_batch]
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            try:
                result = await asyncio.to_thread(self._generate, batch)
            except Exception as error:  # noqa: BLE001 - handed to every waiting sample
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(error)
            else:
                for r, row in zip(batch, result, strict=True):
                    if not r.future.done():
                        r.future.set_result(row)
            # Let samples whose previous turn just finished enqueue before the next batch.
            await asyncio.sleep(0)

    def _generate(self, batch: list[_Request]) -> list[tuple[str, int, int, bool]]:
        from mup.models import generate

        n = len(batch)
        size = next((b for b in BATCH_BUCKETS if b >= n), n)
        rows = batch + [batch[0]] * (size - n)  # padding rows repeat a real one
        kwargs: dict[str, Any] = {}
        if self.steering is not None:
            kwargs = dict(steering=self.steering, multipliers=[r.multiplier for r in rows])
        out = generate(
            self.model,
            [r.messages for r in rows],
            max_new_tokens=batch[0].max_new_tokens,
            sampler=batch[0].sampler,
            seed=[r.seed for r in rows],
            **kwargs,
        )
        self.batches.append(tuple(r.multiplier for r in batch))
        return [
            (out.texts[i], len(out.prompt_ids[i]), len(out.token_ids[i]), out.finished[i])
            for i in range(n)
        ]


def _batcher(spec: str, dtype: str, vector: str | None, layer: int | None, max_batch: int):
    from mup.models import Steering

    key = (spec, dtype, None if vector is None else str(Path(vector).resolve()), layer)
    with _LOCK:
        found = _BATCHERS.get(key)
    if found is not None:
        return found
    model = _load(spec, dtype)
    steering = None
    if vector is not None:
        values, layer = load_vector(vector, layer, d_model=model.config.d_model)
        steering = Steering(layer, values)
    with _LOCK:
        return _BATCHERS.setdefault(key, _Batcher(model, steering, max_batch))


# ---------------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------------


def _parse_bool_free_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"mup provider: {name} must be a number, got {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"mup provider: {name} must be finite, got {value!r}")
    return out


@modelapi(name=PROVIDER)
class MupModelAPI(ModelAPI):
    """`mup/<spec>`: a model loaded in process by `mup.models.load_model(spec)`, steered.

    Model args (``-M`` on inspect's command line, ``model_args`` in Python):
      multiplier: strength of the steering vector for this model's samples (default 1.0 with a
                  vector, 0 without);
      vector:     steering vector file (.safetensors, or .npy with `layer`);
      layer:      the block whose output is steered (overrides / must match the file's);
      dtype:      "float32" (default) | "bfloat16" | "float16";
      max_batch:  most rows per generate call (default 16).
    """

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),  # noqa: B008 - inspect's own signature
        **model_args: Any,
    ):
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        known = {"multiplier", "vector", "layer", "dtype", "max_batch"}
        if unknown := sorted(set(model_args) - known):
            raise ValueError(f"mup provider: unknown model args {unknown}; known: {sorted(known)}")
        vector = model_args.get("vector")
        layer = model_args.get("layer")
        if layer is not None:
            try:
                layer = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"mup provider: layer must be an int, got {layer!r}") from None
        default_multiplier = 1.0 if vector is not None else 0.0
        self.multiplier = _parse_bool_free_float(
            "multiplier", model_args.get("multiplier", default_multiplier)
        )
        if vector is None and self.multiplier != 0.0:
            raise ValueError(
                f"mup provider: multiplier={self.multiplier} needs a steering vector "
                "(-M vector=FILE)"
            )
        dtype = str(model_args.get("dtype", "float32"))
        max_batch = int(model_args.get("max_batch", 16))
        if not 1 <= max_batch <= BATCH_BUCKETS[-1]:
            raise ValueError(f"mup provider: max_batch must be in 1..{BATCH_BUCKETS[-1]}")
        self._batcher = _batcher(model_name, dtype, vector, layer, max_batch)
        self._seed = 0

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS

    def max_connections(self) -> int:
        # Enough concurrent samples to fill a batch of every model sharing the batcher.
        return self._batcher.max_batch

    def connection_key(self) -> str:
        # Each multiplier gets its own pool: they are batched together downstream anyway.
        return f"{self.model_name}:{self.multiplier}"

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        if tools:
            raise ValueError("mup provider: tool calling is not supported")
        from mup.models import Greedy, Temperature, TopP

        temperature = config.temperature
        if temperature is None or temperature == 0:
            sampler: Any = Greedy()
        elif config.top_p is not None and config.top_p < 1:
            sampler = TopP(p=float(config.top_p), t=float(temperature))
        else:
            sampler = Temperature(t=float(temperature))
        max_new = int(config.max_tokens or DEFAULT_MAX_TOKENS)
        base_seed = config.seed if config.seed is not None else 0
        self._seed += 1
        request = _Request(
            messages=_to_chat(input),
            multiplier=self.multiplier,
            max_new_tokens=max_new,
            sampler=sampler,
            seed=int(base_seed) * 1_000_003 + self._seed,
            future=asyncio.get_running_loop().create_future(),
        )
        text, n_in, n_out, finished = await self._batcher.submit(request)
        stop_reason = "stop" if finished else "max_tokens"
        if config.stop_seqs:
            cut = _cut_at_stop(text, config.stop_seqs)
            if cut is not None:
                text, stop_reason = cut, "stop"
        output = ModelOutput.from_content(
            model=self.model_name, content=text, stop_reason=stop_reason
        )
        output.usage = ModelUsage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)
        return output


def _to_chat(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant"):
            raise ValueError(
                f"mup provider: message {i} has role {message.role!r}; "
                "only system, user and assistant messages are supported"
            )
        out.append({"role": message.role, "content": message.text})
    return out


def _cut_at_stop(text: str, stops: list[str]) -> str | None:
    hits = [m.start() for s in stops if s for m in [re.search(re.escape(s), text)] if m]
    return text[: min(hits)] if hits else None
