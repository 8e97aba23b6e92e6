"""Steered generation: one jitted prefill + `lax.while_loop` decode, and a Python reference.

Axis letters: B batch, P prompt bucket length, E emitted (new) token buffer, S cache slots
(P + E), D model, V vocab, J steering entries. (N and G are taken: heads and heads per kv head
in `_layers` and `_transformer`.)

Prompts are LEFT-padded to a bucket length P so that every row's last prompt token sits in the
same column and the loop writes one column of the KV cache per step for all rows; padding slots
are marked invalid in the cache and never attended to, and rope positions are per row, so a
row's tokens do not depend on the padding (or the other rows) around it. Prompt lengths and
the new-token budget are rounded up to buckets so that XLA compiles few programs.

Steering adds ``multiplier[j, b] * vector[j]`` to the output of block ``blocks[j]``. With
``steer_positions`` "prompt" only prefill is steered, with "generated" only the decode steps
(the first new token is predicted from the unsteered prompt), with "all" both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mup._renamed import old_keywords
from mup.models._config import ModelConfig
from mup.models._padding import pad_tokens, token_positions
from mup.models._sampling import Greedy, Sampler
from mup.models._transformer import ForwardSteering, KVCache, forward, jit_forward, lm_head

GREEDY = Greedy()  # the default sampler (frozen, so one shared instance is safe)
SteerPositions = Literal["all", "prompt", "generated"]
STEER_POSITIONS = ("all", "prompt", "generated")
# Whether prefill / decode steps are steered. Passed as traced 0/1 factors on the multipliers
# (adding 0 * vector is exact), so the three modes share one compiled loop (and the engine's
# rows share one program).
STEER_PHASES = {"all": (1.0, 1.0), "prompt": (1.0, 0.0), "generated": (0.0, 1.0)}

# Prompt length buckets; longer prompts round up to a multiple of the last bucket. Steps of
# 1.5x above 32 (not 2x): prefill of a batch is compute-bound, and a 41-token chat prompt padded
# to 64 spent a third of it on padding.
PROMPT_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
NEW_TOKEN_BUCKET = 32  # the new-token buffer is a multiple of this
MAX_STOP_TOKENS = 8  # stop ids are padded to this many so their count never recompiles

# Tokens that end an assistant turn in common chat templates (SmolLM/Qwen ChatML, Llama 3,
# Gemma, Phi). Only the ones the tokenizer knows are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class Steering:
    """Steering vectors and the blocks whose output they are added to.

    ``Steering(12, v)`` steers block 12 (the residual stream that becomes layer 13) with v [D];
    ``Steering((10, 12), [v10, v12])`` steers several blocks (vectors [J, D]). The strength per
    row comes from `generate(multipliers=)`. ``layers=`` is the old name of ``blocks=``.
    """

    blocks: tuple[int, ...]
    vectors: np.ndarray  # [J, D] float32

    @old_keywords(layers="blocks")
    def __init__(self, blocks: int | Sequence[int], vectors: Any):
        blocks = (int(blocks),) if np.ndim(blocks) == 0 else tuple(int(x) for x in blocks)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[0] != len(blocks):
            raise ValueError(
                f"Steering: {len(blocks)} blocks need vectors of shape [{len(blocks)}, D], "
                f"got {vectors.shape}"
            )
        if not np.all(np.isfinite(vectors)):
            raise ValueError("Steering: vectors contain NaN or inf")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "vectors", vectors)

    @property
    def layers(self) -> tuple[int, ...]:
        """The old name of `blocks` (deprecated; read-only)."""
        return self.blocks


@dataclasses.dataclass(frozen=True)
class Generation:
    """Output of `generate`, one entry per prompt.

    texts:      the new tokens decoded (special tokens removed).
    token_ids:  the new token ids, through the first stop token (included, as HF does).
    prompt_ids: the prompt token ids that were fed to the model.
    finished:   True when the row hit a stop token before max_new_tokens.
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_ids: list[list[int]]
    finished: list[bool]


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def generate(
    model,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    sampler: Sampler = GREEDY,
    stop_tokens: Sequence[int] | None = None,
    steering: Steering | None = None,
    multipliers: Any = None,
    steer_positions: SteerPositions = "all",
    seed: int | Sequence[int] = 0,
    chat: bool = True,
) -> Generation:
    """Generate continuations of a batch of prompts in one jitted loop.

    prompts: each a chat (list of {role, content} messages, rendered with the tokenizer's chat
      template and generation prompt), a string (one user message when `chat`, else raw text),
      or a list of token ids (used as is).
    stop_tokens: ids that end a row; default: the tokenizer's eos and end-of-turn tokens;
      ``()`` generates exactly max_new_tokens for every row.
    steering / multipliers: per-row strengths [B] (shared by all steering entries) or [J, B];
      default 1 for every row.
    seed: one int (row b uses key b of that seed) or one int per row (a row's samples then do
      not depend on the batch it runs in).
    """
    batch = _prepare(
        model,
        GenerationRequest(
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            stop_tokens=stop_tokens,
            steering=steering,
            multipliers=multipliers,
            steer_positions=steer_positions,
            seed=seed,
            chat=chat,
        ),
    )
    buffer_len = -(-max_new_tokens // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET
    steer_prefill, steer_decode = STEER_PHASES[steer_positions]
    tokens, steps = _generate_loop(
        model.params,
        batch.prompt,
        batch.valid,
        jnp.int32(max_new_tokens),
        batch.keys,
        batch.stop_ids,
        jnp.int32(batch.pad_id),
        batch.vectors,
        batch.multipliers,
        jnp.float32(steer_prefill),
        jnp.float32(steer_decode),
        config=model.config,
        sampler=sampler,
        steer_blocks=batch.steer_blocks,
        buffer_len=buffer_len,
    )
    tokens = np.asarray(tokens)[:, : int(steps)]  # [B, steps]
    return _finish(model.tokenizer, batch, tokens)


def generate_reference(model, prompts: Sequence[Any], **options) -> Generation:
    """The same generation as `generate` (the same keyword `options`, checked by
    `GenerationRequest`), as a plain Python loop without a KV cache.

    Every step runs the uncached forward over the whole sequence so far and steers through the
    `ForwardSteering` gate; slow, for tests and debugging only.
    """
    request = GenerationRequest(prompts=prompts, **options)
    max_new_tokens, sampler = request.max_new_tokens, request.sampler
    batch = _prepare(model, request)
    # The sequence lives in a buffer of P + max_new_tokens columns whose unused tail is marked
    # invalid (causal attention never looks right of the current token anyway): every step
    # runs the same uncached program, compiled once, instead of one program per length.
    B, P = batch.prompt.shape
    T = P + max_new_tokens
    seq = np.full((B, T), batch.pad_id, np.int32)
    seq[:, :P] = np.asarray(batch.prompt)
    valid = np.zeros((B, T), bool)
    valid[:, :P] = np.asarray(batch.valid)
    spec = None
    if batch.vectors is not None:
        is_prompt = np.arange(T) < P
        gate = {"all": np.ones(T, bool), "prompt": is_prompt, "generated": ~is_prompt}
        spec = ForwardSteering(
            blocks=batch.steer_blocks,
            vectors=batch.vectors,
            multipliers=batch.multipliers,
            gate=jnp.asarray(np.broadcast_to(gate[request.steer_positions], (B, T)), jnp.float32),
        )
    stop = np.asarray(batch.stop_ids)
    done = np.zeros(B, bool)
    new: list[np.ndarray] = []
    for step in range(max_new_tokens):
        out = jit_forward(
            model.params,
            jnp.asarray(seq),
            token_positions(valid),
            config=model.config,
            valid=jnp.asarray(valid),
            steering=spec,
        )
        logits = out.logits[:, P + step - 1]  # [B, V] at the last token so far
        nxt = np.asarray(_jit_sample(sampler, logits, _step_keys(batch.keys, step)))
        nxt = np.where(done, batch.pad_id, nxt)
        new.append(nxt)
        done |= np.isin(nxt, stop)
        if done.all() or step + 1 == max_new_tokens:
            break
        seq[:, P + step] = nxt
        valid[:, P + step] = True
    return _finish(model.tokenizer, batch, np.stack(new, axis=1))


# ---------------------------------------------------------------------------------------------
# Batch preparation and output
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What `generate` and `generate_reference` were asked for (their keywords, documented
    there); the checks that need no model run on construction."""

    prompts: Sequence[Any]
    max_new_tokens: int = 64
    sampler: Sampler = GREEDY
    stop_tokens: Sequence[int] | None = None
    steering: Steering | None = None
    multipliers: Any = None
    steer_positions: SteerPositions = "all"
    seed: int | Sequence[int] = 0
    chat: bool = True

    def __post_init__(self):
        prompts, max_new_tokens = self.prompts, self.max_new_tokens
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not len(prompts):
            raise TypeError("prompts must be a non-empty list of prompts (wrap a single one in [])")
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not callable(self.sampler):
            raise TypeError(
                f"sampler must be Greedy(), Temperature(t=...) or TopP(...), got {self.sampler}"
            )
        if self.steer_positions not in STEER_POSITIONS:
            raise ValueError(
                f"steer_positions must be one of {STEER_POSITIONS}, got {self.steer_positions!r}"
            )


@dataclasses.dataclass(frozen=True)
class _Batch:
    prompt_ids: list[list[int]]
    prompt: jax.Array  # [B, P] int32, left-padded
    valid: jax.Array  # [B, P] bool
    keys: jax.Array  # [B] PRNG keys, one per row
    stop_ids: jax.Array  # [MAX_STOP_TOKENS] int32, padded with -1
    pad_id: int
    steer_blocks: tuple[int, ...]
    vectors: jax.Array | None  # [J, D]
    multipliers: jax.Array | None  # [J, B]


def _prepare(model, request: GenerationRequest) -> _Batch:
    """The request's prompts encoded and left-padded, with its stop ids, keys and steering."""
    r = request
    tokenizer = model.tokenizer
    config: ModelConfig = model.config
    ids = _encode(tokenizer, r.prompts, r.chat, config.vocab_size)
    B = len(ids)

    stops = [
        int(t) for t in (default_stop_tokens(tokenizer) if r.stop_tokens is None else r.stop_tokens)
    ]
    if len(stops) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {stops}")
    if bad := [t for t in stops if not 0 <= t < config.vocab_size]:
        raise ValueError(f"stop tokens {bad} outside the vocabulary 0..{config.vocab_size - 1}")
    stop_ids = np.full(MAX_STOP_TOKENS, -1, np.int32)
    stop_ids[: len(stops)] = stops
    # Finished rows keep emitting this id (discarded on output); padding slots hold it too.
    pad_id = stops[0] if stops else int(tokenizer.pad_token_id or 0)

    longest = max(len(x) for x in ids)
    P = next((b for b in PROMPT_BUCKETS if b >= longest), None)
    if P is None:
        P = -(-longest // PROMPT_BUCKETS[-1]) * PROMPT_BUCKETS[-1]
    prompt, valid = pad_tokens(ids, P, pad_id=pad_id, side="left")  # [B, P]

    if np.ndim(r.seed) == 0:
        keys = jax.random.split(jax.random.PRNGKey(int(r.seed)), B)
    else:
        if len(r.seed) != B:
            raise ValueError(f"seed has {len(r.seed)} entries for {B} prompts")
        keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in r.seed])

    dtype = jnp.dtype(model.params["embed"].dtype)
    blocks: tuple[int, ...] = ()
    vectors = mults = None
    steering, multipliers = r.steering, r.multipliers
    if steering is None:
        if multipliers is not None:
            raise ValueError("multipliers were given without a steering vector")
    else:
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a mup.models.Steering, got {type(steering)}")
        J = len(steering.blocks)
        if steering.vectors.shape[1] != config.d_model:
            raise ValueError(
                f"steering vectors have size {steering.vectors.shape[1]}, the model's d_model "
                f"is {config.d_model}"
            )
        bad = [x for x in steering.blocks if not 0 <= x < config.n_layers]
        if bad:
            raise ValueError(f"steering blocks {bad} out of range 0..{config.n_layers - 1}")
        m = np.ones(B, np.float32) if multipliers is None else np.asarray(multipliers, np.float32)
        if m.shape == (B,):
            m = np.broadcast_to(m, (J, B))
        if m.shape != (J, B):
            raise ValueError(f"multipliers must have shape [{B}] or [{J}, {B}], got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("multipliers contain NaN or inf")
        blocks = steering.blocks
        vectors = jnp.asarray(steering.vectors, dtype)
        mults = jnp.asarray(m, dtype)
    return _Batch(
        prompt_ids=ids,
        prompt=jnp.asarray(prompt),
        valid=jnp.asarray(valid),
        keys=keys,
        stop_ids=jnp.asarray(stop_ids),
        pad_id=pad_id,
        steer_blocks=blocks,
        vectors=vectors,
        multipliers=mults,
    )


def default_stop_tokens(tokenizer) -> list[int]:
    """The tokenizer's eos id(s) plus the end-of-turn tokens of common chat templates."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    ids = list(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ValueError("the tokenizer has no eos or end-of-turn token; pass stop_tokens=[...]")
    return ids[:MAX_STOP_TOKENS]


def _encode(tokenizer, prompts, chat: bool, vocab_size: int) -> list[list[int]]:
    from mup.text import encode_prompts

    out: list[list[int] | None] = [None] * len(prompts)
    chats: list[tuple[int, Any]] = []
    for i, item in enumerate(prompts):
        if isinstance(item, np.ndarray) or (
            isinstance(item, Sequence)
            and item
            and all(isinstance(x, int | np.integer) for x in item)
        ):
            row = [int(x) for x in np.asarray(item).reshape(-1)]
            bad = [x for x in row if not 0 <= x < vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i}: token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}"
                )
            out[i] = row
        elif isinstance(item, str) and not chat:
            out[i] = tokenizer(item, add_special_tokens=True)["input_ids"]
        else:
            chats.append((i, item))
    if chats:
        for (i, _), row in zip(
            chats, encode_prompts(tokenizer, [c for _, c in chats]), strict=True
        ):
            out[i] = row
    empty = [i for i, row in enumerate(out) if not row]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens")
    return out  # type: ignore[return-value]


def _finish(tokenizer, batch: _Batch, tokens: np.ndarray) -> Generation:
    stop = set(int(s) for s in np.asarray(batch.stop_ids) if s >= 0)
    token_ids: list[list[int]] = []
    finished: list[bool] = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        finished.append(end is not None)
        token_ids.append(row if end is None else row[: end + 1])
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return Generation(
        texts=texts, token_ids=token_ids, prompt_ids=batch.prompt_ids, finished=finished
    )


# ---------------------------------------------------------------------------------------------
# The jitted loop
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _LoopState:
    tokens: jax.Array  # [B, E] new tokens so far (pad_id after a row's stop token)
    cache: KVCache  # S = P + E slots
    done: jax.Array  # [B] bool: row emitted a stop token
    step: jax.Array  # int32 scalar: number of new tokens written


@functools.partial(jax.jit, static_argnums=0)
def _jit_sample(sampler: Sampler, logits: jax.Array, keys: jax.Array) -> jax.Array:
    return sampler(logits, keys)


@jax.jit
def _step_keys(keys: jax.Array, step) -> jax.Array:
    """Per-row keys of one step: fold the step into each row's key (same in both loops)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


@functools.partial(
    jax.jit,
    static_argnames=("config", "sampler", "steer_blocks", "buffer_len"),
)
def _generate_loop(
    params,
    prompt,  # [B, P] int32, left-padded
    valid,  # [B, P] bool
    max_new,  # int32 scalar <= buffer_len
    keys,  # [B] PRNG keys
    stop_ids,  # [MAX_STOP_TOKENS] int32 (-1 = unused)
    pad_id,  # int32 scalar
    vectors,  # [J, D] or None
    multipliers,  # [J, B] or None
    steer_prefill,  # float32 scalar 0/1: steer the prompt
    steer_decode,  # float32 scalar 0/1: steer the generated tokens
    *,
    config: ModelConfig,
    sampler: Sampler,
    steer_blocks: tuple[int, ...],
    buffer_len: int,
):
    B, P = prompt.shape
    L = config.n_layers
    lengths = valid.sum(axis=1).astype(jnp.int32)  # [B]
    positions = token_positions(valid)  # [B, P]

    def steering(factor) -> ForwardSteering | None:
        if vectors is None:
            return None
        scaled = multipliers * factor.astype(multipliers.dtype)  # [J, B]
        return ForwardSteering(blocks=steer_blocks, vectors=vectors, multipliers=scaled)

    def next_token(out, step):
        logits = lm_head(config, params, out.hidden[L][:, -1])  # [B, V]
        return sampler(logits, _step_keys(keys, step))  # [B]

    cache = KVCache.create(config, B, P + buffer_len, dtype=params["embed"].dtype)
    out = forward(
        params,
        prompt,
        positions,
        config=config,
        valid=valid,
        cache=cache,
        capture=(L,),
        steering=steering(steer_prefill),
        logits=False,
    )
    first = next_token(out, 0)  # [B]
    state = _LoopState(
        tokens=jnp.full((B, buffer_len), pad_id, jnp.int32).at[:, 0].set(first),
        cache=out.cache,
        done=jnp.isin(first, stop_ids),
        step=jnp.int32(1),
    )
    decode_steering = steering(steer_decode)

    def cond(s: _LoopState):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
        pos = (lengths + s.step - 1)[:, None]  # [B, 1]
        out = forward(
            params,
            last,
            pos,
            config=config,
            cache=s.cache,
            capture=(L,),
            steering=decode_steering,
            logits=False,
        )
        nxt = jnp.where(s.done, pad_id, next_token(out, s.step))  # [B]
        return _LoopState(
            tokens=jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (0, s.step)),
            cache=out.cache,
            done=s.done | jnp.isin(nxt, stop_ids),
            step=s.step + 1,
        )

    final = jax.lax.while_loop(cond, body, state)
    return final.tokens, final.step
