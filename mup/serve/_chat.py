"""/v1/chat/completions: a validated chat request -> engine rows -> the response body, or its
stream of chunks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from mup.engine import Request as Row
from mup.engine import TokenLogprob
from mup.serve._protocol import (
    Sampling,
    invalid_request,
    parse_continuation,
    parse_messages,
    parse_sampling,
    usage,
)
from mup.serve._serving import Serving, merge, rows

log = logging.getLogger("mup.serve")


class ChatServing(Serving):
    async def create(
        self, body: dict, is_disconnected: Callable[[], Awaitable[bool]], t0: float
    ) -> dict | AsyncIterator[dict]:
        """The chat.completion body, or (with `stream`) its chunks, for a request `body` whose
        model is this server's."""
        messages = parse_messages(body)
        sampling = parse_sampling(body, self.config, self.engine, "chat")
        continuation = parse_continuation(body, messages)
        request_rows = await run_in_threadpool(self.rows, messages, sampling, continuation)
        handles = self.submit(request_rows)
        head = self.head("chatcmpl")
        n_prompt = len(request_rows[0].prompt_ids)
        if sampling.stream:
            return self.stream(head, sampling, handles, n_prompt, request_rows, t0)
        results = await self.wait_all(handles, is_disconnected)
        self.log_request("chat", sampling, request_rows, results, t0)
        n_completion = sum(len(r.token_ids) for r in results)
        choices = []
        for i, r in enumerate(results):
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            if sampling.logprobs:
                choice["logprobs"] = {
                    "content": [self.logprob(t) for t in r.logprobs or []],
                    "refusal": None,
                }
            if sampling.probe_token_scores:
                choice["probe_token_scores"] = r.probe_token_scores
            choices.append(choice)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(n_prompt, n_completion),
            **self.extras(sampling, results),
        }

    def rows(self, messages, sampling: Sampling, continuation=(True, False)) -> list[Row]:
        """The conversation's generation prompt, tokenized, and its probe mask; `continuation`
        is (add_generation_prompt, continue_final_message)."""
        from mup.text import encode_chats, encode_prompts, token_mask

        engine = self.engine
        with engine.tokenizer_lock:
            try:
                add, cont = continuation
                ids = encode_prompts(
                    self.tokenizer,
                    [messages],
                    add_generation_prompt=add,
                    continue_final_message=cont,
                )[0]
                mask = None
                if engine.probe is not None:
                    enc = encode_chats(self.tokenizer, [messages])
                    mask = prompt_mask(
                        ids,
                        enc.input_ids,
                        token_mask(enc.roles, enc.offsets, self.config.probe_mask),
                    )
            except (ValueError, TypeError) as e:
                raise invalid_request(f"messages: {e}", "messages") from None
        if mask is not None and not mask.any():
            raise invalid_request(
                f"the probe reads '{self.config.probe_mask}' tokens and this conversation has none",
                "messages",
            )
        self.check_length(len(ids), sampling, "messages")
        return rows(ids, sampling, mask)

    async def stream(self, head, sampling, handles, n_prompt, request_rows, t0):
        base = {**head, "object": "chat.completion.chunk", **self.steer_extras(sampling)}
        first = True
        async for i, ev in merge(handles):
            if first:
                base.update(self.probe_extras(handles[0]))
                for j in range(len(handles)):
                    yield {**base, "choices": [_delta(j, {"role": "assistant", "content": ""})]}
                first = False
            if ev is None:  # choice i finished
                r = handles[i].result(0)
                choice = _delta(i, {}, r.finish_reason)
                if sampling.probe_token_scores:
                    choice["probe_token_scores"] = r.probe_token_scores
                yield {**base, "choices": [choice]}
                continue
            choice = _delta(i, {"content": ev.text})
            if sampling.logprobs and ev.logprob is not None:
                choice["logprobs"] = {"content": [self.logprob(ev.logprob)], "refusal": None}
            elif not ev.text:
                continue
            yield {**base, "choices": [choice]}
        results = [h.result(0) for h in handles]
        self.log_request("chat-stream", sampling, request_rows, results, t0)
        if sampling.include_usage:
            yield self.usage_chunk(base, n_prompt, results)

    def logprob(self, t: TokenLogprob) -> dict:
        entry = _token(self.token_str(t.token_id), t.logprob)
        entry["top_logprobs"] = [_token(self.token_str(i), lp) for i, lp in t.top]
        return entry


def prompt_mask(prompt_ids, conversation_ids, conversation_mask) -> np.ndarray:
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


def _token(s: str, logprob: float) -> dict:
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def _delta(i: int, delta: dict, finish: str | None = None) -> dict:
    return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
