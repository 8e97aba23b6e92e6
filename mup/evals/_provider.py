"""The inspect-ai model provider `mup/<spec>`: in-process steered generation on `mup.engine`.

    inspect eval TASK --model mup/smollm2-135m -M vector=v.npy -M block=12 -M multiplier=1.0

inspect calls `generate` once per sample, concurrently (up to max_connections per model, and
for several models at once when one `eval()` runs tasks x models). Every provider instance
that shares (model, dtype, vector, block) also shares one `mup.engine.Engine`: each sample is
one row submitted to it, with its own multiplier, sampler and seed, so the seven multipliers
of a sweep decode together in the engine's slots, and a sample never waits for a batch to
finish. With ``GenerateConfig(logprobs=True, top_logprobs=k)`` the completion carries each
token's logprob and its k alternatives (float32 log-softmax of the model's logits).

`score_continuations` is the log-likelihood path of the multiple-choice tasks
(`mup.evals._loglik`), steered like generation. By default (``loglik=prefix``) a sample's
prompt is prefilled once and every choice is scored from its KV cache (`mup.evals._prefix`,
samples of all multipliers batched together); ``loglik=rows`` submits every prompt + choice as
one engine row with max_tokens 0 and prompt logprobs (the prompt then runs once per choice).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from inspect_ai.model import (
    ChatCompletionChoice,
    ChatMessage,
    ChatMessageAssistant,
    GenerateConfig,
    Logprob,
    Logprobs,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    TopLogprob,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from mup._renamed import old_keywords

PROVIDER = "mup"
DEFAULT_MAX_TOKENS = 256
MAX_SLOTS = 64
MAX_CONTEXT = 2048  # each slot's KV cache length (prompt + completion), at most the model's
VECTOR = "vector"  # the engine's name for the provider's one vector


@old_keywords(layer="block")
def load_vector(
    path: str | os.PathLike, block: int | None = None, d_model: int | None = None
) -> tuple[np.ndarray, int]:
    """A steering vector file -> (vector [D] float32, steered block), via
    `mup.steering.load_vector`.

    `.safetensors` files from mup.steering carry their block (an explicit `block` must agree);
    a plain `.npy` array [D] needs `block`. With `d_model`, the shape is checked too.
    ``layer=`` is the old name of ``block=``.
    """
    from mup.steering import load_vector as read_vector

    loaded = read_vector(path, block=None if block is None else int(block), d_model=d_model)
    return np.asarray(loaded.vector, np.float32), int(loaded.block)


# ---------------------------------------------------------------------------------------------
# Loaded models and engines, shared by every provider instance of one process
# ---------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], Any] = {}
_ENGINES: dict[tuple, Any] = {}
_SCORERS: dict[tuple, Any] = {}
LOGLIK_ROUTES = ("prefix", "rows")


def _load(spec: str, dtype: str):
    from mup.models import load_model

    with _LOCK:
        key = (spec, dtype)
        if key not in _MODELS:
            _MODELS[key] = load_model(spec, dtype=dtype)  # type: ignore[arg-type]
        return _MODELS[key]


def _engine(spec: str, dtype: str, vector: str | None, block: int | None, max_batch: int):
    """The started engine of (model, dtype, vector, block); the first caller's max_batch sets
    its slot count."""
    from mup.engine import Engine, EngineConfig

    key = (spec, dtype, None if vector is None else str(Path(vector).resolve()), block)
    with _LOCK:
        found = _ENGINES.get(key)
    if found is not None:
        return found
    model = _load(spec, dtype)
    vectors = {}
    if vector is not None:
        values, block = load_vector(vector, block, d_model=model.config.d_model)
        vectors[VECTOR] = (values, block)
    engine = Engine(
        model,
        vectors=vectors,
        config=EngineConfig(
            max_slots=max_batch,
            max_len=min(int(model.config.max_position_embeddings), MAX_CONTEXT),
        ),
    )
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = engine.start()
        return _ENGINES[key]


def _prefix_scorer(spec: str, dtype: str, vector: str | None, block: int | None):
    """The shared-prefix log-likelihood scorer of (model, dtype, vector, block)."""
    from mup.evals._prefix import PrefixScorer

    key = (spec, dtype, None if vector is None else str(Path(vector).resolve()), block)
    with _LOCK:
        found = _SCORERS.get(key)
    if found is not None:
        return found
    model = _load(spec, dtype)
    values = None
    if vector is not None:
        values, block = load_vector(vector, block, d_model=model.config.d_model)
    scorer = PrefixScorer(model, values, None if vector is None else block)
    with _LOCK:
        return _SCORERS.setdefault(key, scorer)


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
      vector:     steering vector file (.safetensors, or .npy with `block`);
      block:      the block whose output is steered (must match a .safetensors file's);
                  ``layer`` is its old name;
      dtype:      "float32" (default) | "bfloat16" | "float16";
      max_batch:  the engine's slots, rows decoded together (default 16);
      loglik:     "prefix" (default) | "rows", how multiple-choice log-likelihoods are
                  computed (see the module docstring).
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
        known = {"multiplier", "vector", "block", "layer", "dtype", "max_batch", "loglik"}
        if unknown := sorted(set(model_args) - known):
            raise ValueError(f"mup provider: unknown model args {unknown}; known: {sorted(known)}")
        if "block" in model_args and "layer" in model_args:
            raise ValueError("mup provider: give block (or its old name layer), not both")
        vector = model_args.get("vector")
        name = "block" if "block" in model_args else "layer"  # layer: the old name
        block = model_args.get(name)
        if block is not None:
            try:
                block = int(block)
            except (TypeError, ValueError):
                raise ValueError(f"mup provider: {name} must be an int, got {block!r}") from None
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
        if not 1 <= max_batch <= MAX_SLOTS:
            raise ValueError(f"mup provider: max_batch must be in 1..{MAX_SLOTS}")
        self.loglik = str(model_args.get("loglik", "prefix"))
        if self.loglik not in LOGLIK_ROUTES:
            raise ValueError(
                f"mup provider: loglik must be one of {list(LOGLIK_ROUTES)}, got {self.loglik!r}"
            )
        self.engine = _engine(model_name, dtype, vector, block, max_batch)
        self._scorer_key = (model_name, dtype, vector, block)
        self._seed = 0

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS

    def max_connections(self) -> int:
        # Enough concurrent samples to fill the slots of the engine the models share.
        return self.engine.config.max_slots

    def connection_key(self) -> str:
        # Each multiplier gets its own pool: they decode together in the engine anyway.
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
        from mup.engine import MAX_TOP_LOGPROBS, Request
        from mup.text import encode_prompts

        temperature = float(config.temperature or 0.0)
        top_p = float(config.top_p) if config.top_p is not None and temperature > 0 else 1.0
        max_new = int(config.max_tokens or DEFAULT_MAX_TOKENS)
        base_seed = config.seed if config.seed is not None else 0
        self._seed += 1
        top_k = int(config.top_logprobs or 0) if config.logprobs else 0
        if not 0 <= top_k <= MAX_TOP_LOGPROBS:
            raise ValueError(f"mup provider: top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
        engine = self.engine
        with engine.tokenizer_lock:
            ids = encode_prompts(engine.model.tokenizer, [_to_chat(input)])[0]
        handle = engine.submit(
            Request(
                prompt_ids=tuple(ids),
                max_tokens=max_new,
                multiplier=self.multiplier,
                vector=VECTOR if engine.vector_names else None,
                temperature=temperature,
                top_p=top_p,
                seed=(int(base_seed) * 1_000_003 + self._seed) % (1 << 31),
                stop=tuple(s for s in (config.stop_seqs or []) if s),
                logprobs=bool(config.logprobs),
                top_logprobs=top_k,
            )
        )
        try:
            result = await handle.wait()
        finally:
            handle.cancel()  # a cancelled sample frees its slot; no-op once finished
        stop_reason = "stop" if result.finish_reason == "stop" else "max_tokens"
        logprobs = None
        if result.logprobs is not None:
            logprobs = Logprobs(content=[self._logprob(t) for t in result.logprobs])
        n_in, n_out = result.prompt_tokens, len(result.token_ids)
        return ModelOutput(
            model=self.model_name,
            choices=[
                ChatCompletionChoice(
                    message=ChatMessageAssistant(
                        content=result.text, model=self.model_name, source="generate"
                    ),
                    stop_reason=stop_reason,
                    logprobs=logprobs,
                )
            ],
            usage=ModelUsage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out),
        )

    async def score_continuations(self, prompt: str, continuations: list[str]):
        """Log-likelihood of each continuation after the plain-text `prompt` (no chat template),
        steered at this model's multiplier (see `mup.evals._loglik`), by the `loglik` route.

        Text is tokenized as `mup serve` tokenizes a /v1/completions prompt, so this and the
        server's echo route read the same tokens.
        """
        if self.loglik == "rows":
            return await self.score_continuations_rows(prompt, continuations)
        from mup.evals._prefix import PrefixItem

        prompt_ids, fulls = self._encode_continuations(prompt, continuations)
        scorer = _prefix_scorer(*self._scorer_key)
        item = PrefixItem(
            prompt_ids=tuple(prompt_ids),
            full_ids=tuple(tuple(f) for f in fulls),
            multiplier=self.multiplier,
        )
        if item.shared < 1:  # no token for the prefill to hold (the first token differs)
            return await self.score_continuations_rows(prompt, continuations)
        return await scorer.score(item)

    def _encode_continuations(self, prompt: str, continuations: list[str]):
        engine = self.engine
        tokenizer = engine.model.tokenizer
        with engine.tokenizer_lock:
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            fulls = [
                tokenizer(prompt + c, add_special_tokens=True)["input_ids"] for c in continuations
            ]
        return prompt_ids, fulls

    async def score_continuations_rows(self, prompt: str, continuations: list[str]):
        """`score_continuations` as engine rows: each prompt + continuation is one row with
        ``max_tokens=0`` and prompt logprobs; the rows of every sample and multiplier running
        at the same time share prefill batches, and each runs its whole prompt."""
        import asyncio

        from mup.engine import Request
        from mup.evals._loglik import continuation_score

        engine = self.engine
        prompt_ids, fulls = self._encode_continuations(prompt, continuations)
        handles = [
            engine.submit(
                Request(
                    prompt_ids=tuple(ids),
                    max_tokens=0,
                    multiplier=self.multiplier,
                    vector=VECTOR if engine.vector_names else None,
                    prompt_logprobs=True,
                )
            )
            for ids in fulls
        ]
        try:
            results = await asyncio.gather(*(h.wait() for h in handles))
        finally:
            for h in handles:
                h.cancel()
        out = []
        for ids, result in zip(fulls, results, strict=True):
            lps = [None if t is None else t.logprob for t in result.prompt_logprobs]
            out.append(continuation_score(prompt_ids, ids, lps))
        return out

    def _logprob(self, t) -> Logprob:
        def text(token_id: int) -> str:
            with self.engine.tokenizer_lock:
                return self.engine.model.tokenizer.decode([token_id])

        s = text(t.token_id)
        return Logprob(
            token=s,
            logprob=t.logprob,
            bytes=list(s.encode("utf-8")),
            top_logprobs=[
                TopLogprob(token=(x := text(i)), logprob=lp, bytes=list(x.encode("utf-8")))
                for i, lp in t.top
            ],
        )


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
