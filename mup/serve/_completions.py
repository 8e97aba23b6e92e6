"""/v1/completions: validated prompts (text or token ids) -> engine rows -> the response body,
or its stream of chunks; legacy logprobs, with the prompt's under `echo`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from mup.engine import Request as Row
from mup.engine import TokenLogprob
from mup.serve._protocol import (
    Sampling,
    invalid_request,
    parse_completion_prompts,
    parse_sampling,
    usage,
)
from mup.serve._serving import Serving, merge, rows


class CompletionServing(Serving):
    async def create(
        self, body: dict, is_disconnected: Callable[[], Awaitable[bool]], t0: float
    ) -> dict | AsyncIterator[dict]:
        """The text_completion body, or (with `stream`) its chunks, for a request `body` whose
        model is this server's."""
        prompts = parse_completion_prompts(body)
        sampling = parse_sampling(body, self.config, self.engine, "completions")
        request_rows, texts = await run_in_threadpool(self.rows, prompts, sampling)
        handles = self.submit(request_rows)
        head = self.head("cmpl")
        n = len(sampling.seeds)
        n_prompt = sum(len(r.prompt_ids) for r in request_rows[::n])
        if sampling.stream:
            return self.stream(head, sampling, handles, request_rows, texts, n_prompt, t0)
        results = await self.wait_all(handles, is_disconnected)
        self.log_request("completions", sampling, request_rows, results, t0)
        n_completion = sum(len(r.token_ids) for r in results)
        ext = self.extras(sampling, results)
        if self.engine.probe is not None and len(prompts) > 1:
            ext["probe_scores"] = [r.probe_score for r in results[::n]]
        choices = []
        for i, (row, r) in enumerate(zip(request_rows, results, strict=True)):
            prefix = self.prompt_text(row, texts[i // n]) if sampling.echo else ""
            choice = {
                "index": i,
                "text": prefix + r.text,
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            if sampling.logprobs:
                gen = self.logprobs(r.logprobs or [])
                if sampling.echo:
                    lp = self.echo_logprobs(row, r.prompt_logprobs)
                    end = sum(len(s) for s in lp["tokens"])
                    gen = self.logprobs(r.logprobs or [], start=end)
                    gen = {k: lp[k] + gen[k] for k in lp}
                choice["logprobs"] = gen
            if sampling.probe_token_scores:
                choice["probe_token_scores"] = r.probe_token_scores
            choices.append(choice)
        return {
            **head,
            "object": "text_completion",
            "choices": choices,
            "usage": usage(n_prompt, n_completion),
            **ext,
        }

    def rows(self, prompts, sampling: Sampling) -> tuple[list[Row], list[str | None]]:
        """Every prompt's rows, and its text (None for token ids)."""
        engine = self.engine
        vocab = engine.model.config.vocab_size
        out, texts = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                with engine.tokenizer_lock:
                    ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
                if not ids:
                    raise invalid_request(f"prompt {i} encodes to no tokens", "prompt")
                texts.append(prompt)
            else:
                ids = prompt
                if any(not 0 <= t < vocab for t in ids):
                    raise invalid_request(
                        f"prompt {i}: token ids outside the vocabulary 0..{vocab - 1}", "prompt"
                    )
                texts.append(None)
            self.check_length(len(ids), sampling, "prompt")
            # Raw text has no roles: the probe reads every prompt token.
            mask = np.ones(len(ids), bool) if engine.probe is not None else None
            out.extend(rows(ids, sampling, mask))
        return out, texts

    def prompt_text(self, row: Row, text: str | None) -> str:
        """What `echo` prepends: the prompt as sent, or its token ids decoded."""
        return text if text is not None else self.decode(row.prompt_ids)

    async def stream(self, head, sampling, handles, request_rows, texts, n_prompt, t0):
        base = {**head, "object": "text_completion", **self.steer_extras(sampling)}
        n = len(sampling.seeds)
        offsets = [0] * len(handles)
        first = True
        async for i, ev in merge(handles):
            if first:
                base.update(self.probe_extras(handles[0]))
                first = False
            if sampling.echo and offsets[i] == 0 and (ev is None or ev.index == 0):
                row = request_rows[i]
                prefix = self.prompt_text(row, texts[i // n])
                lp = (
                    self.echo_logprobs(row, handles[i].prompt_logprobs)
                    if sampling.logprobs
                    else None
                )
                offsets[i] = max(1, len(prefix))
                yield {**base, "choices": [_text(i, prefix, None, lp)]}
            if ev is None:
                r = handles[i].result(0)
                choice = _text(i, "", r.finish_reason)
                if sampling.probe_token_scores:
                    choice["probe_token_scores"] = r.probe_token_scores
                yield {**base, "choices": [choice]}
                continue
            lp = None
            if sampling.logprobs and ev.logprob is not None:
                lp = self.logprobs([ev.logprob], start=offsets[i])
            elif not ev.text:
                continue
            offsets[i] += len(ev.text)
            yield {**base, "choices": [_text(i, ev.text, None, lp)]}
        results = [h.result(0) for h in handles]
        self.log_request("completions-stream", sampling, request_rows, results, t0)
        if sampling.include_usage:
            yield self.usage_chunk(base, n_prompt, results)

    def logprobs(self, items: list[TokenLogprob | None], start: int = 0) -> dict:
        """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for t in items:
            if t is None:  # the first prompt token: nothing predicts it
                continue
            s = self.token_str(t.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            # As vLLM and the OpenAI legacy API: the top-k plus the chosen token.
            top = {self.token_str(i): lp for i, lp in t.top}
            top.setdefault(s, t.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def echo_logprobs(self, row: Row, prompt_lps) -> dict:
        first = self.token_str(row.prompt_ids[0])
        out = self.logprobs(prompt_lps or [], start=len(first))
        out["tokens"].insert(0, first)
        out["token_logprobs"].insert(0, None)
        out["top_logprobs"].insert(0, None)
        out["text_offset"].insert(0, 0)
        return out


def _text(i: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}
