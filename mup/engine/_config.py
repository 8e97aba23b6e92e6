"""The engine's configuration and what one request asks of it."""

from __future__ import annotations

import dataclasses

import numpy as np

from mup.engine._grammar import Grammar
from mup.models import STEER_POSITIONS

MAX_TOP_LOGPROBS = 20  # as the OpenAI API; every step computes this many (one program)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How an `Engine` lays out its slots and schedules work.

    max_slots: rows decoded together (the KV cache's batch axis); a request with n choices
      takes n slots.
    max_len: tokens per slot (prompt + completion); the KV cache is [L, max_slots, K, max_len, H].
    prefill_chunk: longest prefill call in tokens: longer prompts are prefilled chunk by chunk,
      one chunk between decode steps, so running rows are not stalled for a whole long prompt.
    prefill_rows: row counts a prefill call is padded up to (each one a compiled shape).
    decode_steps: decode steps per jitted call (1 streams and admits at every token); a call
      that holds a constrained row (`Request.grammar`) runs one step, its mask following
      each token.
    steer_positions: "all" (prompt and generated tokens, the vLLM reference), "prompt" or
      "generated".
    admit_window_s: when the engine is idle, how long the first request waits for company
      before its prefill starts (0: none; batching never depends on it).
    static_batches: admit new rows only when no row is running (the design the engine replaced;
      a benchmark baseline).
    """

    max_slots: int = 16
    max_len: int = 2048
    prefill_chunk: int = 512
    prefill_rows: tuple[int, ...] = (1, 4)
    decode_steps: int = 1
    steer_positions: str = "all"
    admit_window_s: float = 0.0
    static_batches: bool = False

    def __post_init__(self):
        if not 1 <= self.max_slots <= 1024:
            raise ValueError(f"max_slots must be in 1..1024, got {self.max_slots}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.prefill_chunk < 16 or self.prefill_chunk % 16:
            raise ValueError(f"prefill_chunk must be a multiple of 16, got {self.prefill_chunk}")
        if not self.prefill_rows or sorted(set(self.prefill_rows)) != list(self.prefill_rows):
            raise ValueError(f"prefill_rows must be increasing, got {self.prefill_rows}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.steer_positions not in STEER_POSITIONS:
            raise ValueError(
                f"steer_positions must be one of {STEER_POSITIONS}, got {self.steer_positions!r}"
            )
        if self.admit_window_s < 0:
            raise ValueError(f"admit_window_s must be >= 0, got {self.admit_window_s}")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Request:
    """One completion row to generate.

    prompt_ids: the prompt's token ids (chat template already applied for chats).
    max_tokens: new-token budget; 0 generates nothing (prompt logprobs only).
    multiplier: steering strength of this row.
    vector: the name of a loaded vector, an own vector [D] (steers the engine's custom block),
      or None (no steering: the plain model).
    temperature: 0 = greedy; top_p: nucleus mass (1 = off); seed: the row's PRNG seed (its
      samples do not depend on its batch-mates).
    stop: strings that end the completion (cut from the text).
    stop_ids: token ids that end it (included in token_ids); None = the tokenizer's.
    logprobs: return each generated token's logprob; top_logprobs: and the k most likely.
    prompt_logprobs: return the prompt tokens' logprobs (echo), with top_logprobs alternatives.
    probe_mask: bool [len(prompt_ids)], the prompt tokens the probe reads; None = no score.
    probe_token_scores: the probe's score on every generated token.
    grammar: constrain the completion to this grammar (`json_schema_grammar`,
      `json_object_grammar`): every token, the first included, is drawn among the tokens the
      grammar allows after the ones before it, and the row stops ("stop") when the grammar is
      complete. Logprobs are then those of the constrained distribution (as vLLM reports them).
      None = free text.
    group: rows sharing a group (one API request's prompts x n) are admitted fairly against
      other groups: a free slot goes to the group with the fewest rows in slots, then the one
      admitted least recently, so one request's thousand rows cannot hold back another's
      one. None = its own.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    multiplier: float = 0.0
    vector: str | np.ndarray | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    probe_mask: np.ndarray | None = None
    probe_token_scores: bool = False
    grammar: Grammar | None = None
    group: object = None


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's float32 log-probability under the model and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token as it leaves the engine: its id, the text it adds (possibly empty:
    partial characters and possible stop-string prefixes are held back) and its logprobs."""

    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    """What one row produced.

    text: the completion (special tokens removed, cut at the first stop string).
    token_ids: the new token ids, through a stop token when one was hit.
    finish_reason: "stop" (stop token or stop string), "length" or "cancelled".
    logprobs: per generated token (when asked), else None.
    prompt_logprobs: per prompt token (echo), the first one None (nothing predicts it).
    probe_score: the (first) probe's probability for the prompt, or None.
    probe_scores: every probe's probability for the prompt, in the engine's probe order.
    probe_token_scores: the first probe's probability on each generated token, or None.
    batch_rows: most rows that ran in one engine step with this row.
    prompt_tokens: len(prompt_ids).
    ttft_s: seconds from submission to the first token (None without one).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    probe_score: float | None = None
    probe_scores: list[float] | None = None
    probe_token_scores: list[float] | None = None
    batch_rows: int = 1
    prompt_tokens: int = 0
    ttft_s: float | None = None
