"""Prompted LLM monitors: a model asked whether a conversation is high-stakes, in process (on
mup.models) or through any OpenAI-compatible server that returns echo logprobs (`mup serve`,
vLLM).

Likelihood monitors (`likelihood_rows`) compare the log-likelihoods of the template's two
completions (`mup.monitors._likelihood`); the generative monitor (`generative_rows`) lets the
model answer in up to 32 tokens and reads the label from its text. Both return score-file rows
(`mup.monitors.score_row`), with the cost of each record from `mup.monitors.llm_flops`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mup.models import ModelConfig
from mup.monitors._flops import llm_flops
from mup.monitors._likelihood import PairLogprobs, pair_logprobs, pair_rows
from mup.monitors._prompts import (
    GENERATIVE,
    LIKELIHOOD_TEMPLATES,
    PromptTemplate,
    format_conversation,
    parse_generated_label,
)
from mup.monitors._scores import label_of, score_row

__all__ = [
    "EchoScorer",
    "generative_rows",
    "likelihood_rows",
    "monitor_name",
    "template_prompts",
]

GENERATIVE_MAX_TOKENS = 32


def monitor_name(model_name: str, template: str) -> str:
    return f"prompted:{model_name}/{template}"


def _conversation(tokenizer, record, max_tokens: int | None) -> str:
    """The record as role-labelled turns; past `max_tokens` tokens only its end is kept (the
    last turns say most about what is happening now), marked with "[...]"."""
    text = format_conversation(record.messages)
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return "[...]\n" + tokenizer.decode(ids[-max_tokens:])


def template_prompts(
    tokenizer,
    records: Sequence,
    template: PromptTemplate,
    *,
    max_conversation_tokens: int | None = None,
) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of each record's prompt (chat template with the generation prompt) and of the
    two completions (the same for every record)."""
    from mup.text import encode_prompts

    chats = [
        template.messages(_conversation(tokenizer, r, max_conversation_tokens)) for r in records
    ]
    prompts = encode_prompts(tokenizer, chats, add_generation_prompt=True)
    high = tokenizer(template.high, add_special_tokens=False)["input_ids"]
    low = tokenizer(template.low, add_special_tokens=False)["input_ids"]
    return prompts, high, low


def _template(name: str) -> PromptTemplate:
    if name not in LIKELIHOOD_TEMPLATES:
        raise ValueError(
            f"unknown prompt template {name!r}; choose from {', '.join(LIKELIHOOD_TEMPLATES)}"
        )
    return LIKELIHOOD_TEMPLATES[name]


@dataclasses.dataclass
class EchoScorer:
    """Log-likelihoods from a server's /v1/completions with ``echo`` and ``max_tokens: 0``:
    the server returns the log-probability of every prompt token, and the completion's tokens
    are summed from the first one where high and low differ. Prompts go as token ids, so the
    server scores exactly the tokens we built (no second tokenization)."""

    client: Any  # openai.OpenAI
    model: str  # the served model's name
    prompts_per_request: int = 16
    concurrency: int = 4

    def _logprobs(self, sequences: list[list[int]]) -> list[list[float | None]]:
        response = self.client.completions.create(
            model=self.model, prompt=sequences, max_tokens=0, echo=True, logprobs=0
        )
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(sequences):
            raise RuntimeError(
                f"the server at {self.client.base_url} answered {len(choices)} choices for "
                f"{len(sequences)} prompts"
            )
        out = []
        for seq, choice in zip(sequences, choices, strict=True):
            lps = choice.logprobs.token_logprobs if choice.logprobs else None
            if lps is None or len(lps) < len(seq):
                raise RuntimeError(
                    f"the server at {self.client.base_url} returned no echo logprobs for a "
                    f"{len(seq)}-token prompt; it must support echo with max_tokens 0 (mup "
                    "serve and vLLM do)"
                )
            out.append(lps[: len(seq)])
        return out

    def __call__(self, prompts, highs, lows, progress=None) -> PairLogprobs:
        n = len(prompts)
        jobs: list[tuple[int, int, list[int], int]] = []  # record, which, sequence, first scored
        n_tokens = np.zeros(n, np.int64)
        n_scored = np.zeros(n, np.int64)
        for i in range(n):
            rows = pair_rows(prompts[i], highs[i], lows[i])
            # the same cost accounting as in process: what the forward reads, where the head runs
            n_tokens[i] = sum(len(r.tokens) for r in rows)
            n_scored[i] = sum(max(len(t) for t in r.targets) for r in rows)
            for which, tail in enumerate((highs[i], lows[i])):
                jobs.append((i, which, [*prompts[i], *tail], rows[0].first + 1))
        sums = np.zeros((n, 2), np.float64)
        left = np.full(n, 2)
        chunks = [
            jobs[k : k + self.prompts_per_request]
            for k in range(0, len(jobs), self.prompts_per_request)
        ]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self._logprobs, [j[2] for j in c]): c for c in chunks}
            for future in concurrent.futures.as_completed(futures):
                done = 0
                for (i, which, _, first), lps in zip(futures[future], future.result(), strict=True):
                    sums[i, which] = float(np.sum(lps[first:]))  # lps[j] = log p(seq[j] | seq[:j])
                    left[i] -= 1
                    done += int(left[i] == 0)
                if progress is not None:
                    progress(done)
        return PairLogprobs(high=sums[:, 0], low=sums[:, 1], n_tokens=n_tokens, n_scored=n_scored)


def likelihood_rows(
    records: Sequence,
    dataset: str,
    *,
    template: str,
    tokenizer,
    config: ModelConfig,
    model_name: str,
    params=None,
    scorer: EchoScorer | None = None,
    max_conversation_tokens: int | None = None,
    token_budget: int = 8192,
    progress: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    """Score rows of one likelihood template over `records`: in process with `params`, or
    through `scorer` (a server)."""
    if (params is None) == (scorer is None):
        raise ValueError("give exactly one of params (in process) or scorer (a server)")
    spec = _template(template)
    prompts, high, low = template_prompts(
        tokenizer, records, spec, max_conversation_tokens=max_conversation_tokens
    )
    highs, lows = [high] * len(records), [low] * len(records)
    if scorer is not None:
        ll = scorer(prompts, highs, lows, progress=progress)
    else:
        ll = pair_logprobs(
            params, config, prompts, highs, lows, token_budget=token_budget, progress=progress
        )
    p = ll.p_high
    out = []
    for i, record in enumerate(records):
        out.append(
            score_row(
                id=record.id,
                dataset=dataset,
                label=label_of(record),
                score=float(p[i]),
                monitor=monitor_name(model_name, template),
                flops=llm_flops(config, int(ll.n_tokens[i]), logit_positions=int(ll.n_scored[i])),
                n_tokens=int(ll.n_tokens[i]),
                loglik_high=float(ll.high[i]),
                loglik_low=float(ll.low[i]),
            )
        )
    return out


def generative_rows(
    records: Sequence,
    dataset: str,
    *,
    model_name: str,
    tokenizer,
    config: ModelConfig,
    model=None,
    client=None,
    served_model: str | None = None,
    max_conversation_tokens: int | None = None,
    batch_size: int = 16,
    progress: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    """Score rows of the generative monitor: greedy answers of up to 32 tokens, the label read
    from the text (`valid: false` and score 0.5 when none can be read; never dropped)."""
    if (model is None) == (client is None):
        raise ValueError("give exactly one of model (in process) or client (a server)")
    chats = [
        GENERATIVE.messages(_conversation(tokenizer, r, max_conversation_tokens)) for r in records
    ]
    texts: list[str] = [""] * len(records)
    n_prompt = [0] * len(records)
    n_new = [0] * len(records)
    if model is not None:
        from mup.models import generate
        from mup.text import encode_prompts

        ids = encode_prompts(tokenizer, chats, add_generation_prompt=True)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths batch well
        for k in range(0, len(order), batch_size):
            part = [int(i) for i in order[k : k + batch_size]]
            gen = generate(model, [ids[i] for i in part], max_new_tokens=GENERATIVE_MAX_TOKENS)
            for j, i in enumerate(part):
                texts[i] = gen.texts[j]
                n_prompt[i] = len(ids[i])
                n_new[i] = len(gen.token_ids[j])
            if progress is not None:
                progress(len(part))
    else:
        for i, chat in enumerate(chats):
            response = client.chat.completions.create(
                model=served_model, messages=chat, max_tokens=GENERATIVE_MAX_TOKENS, temperature=0
            )
            texts[i] = response.choices[0].message.content or ""
            n_prompt[i] = response.usage.prompt_tokens
            n_new[i] = response.usage.completion_tokens
            if progress is not None:
                progress(1)
    out = []
    for i, record in enumerate(records):
        label, score = parse_generated_label(texts[i])
        n = n_prompt[i] + n_new[i]
        out.append(
            score_row(
                id=record.id,
                dataset=dataset,
                label=label_of(record),
                score=score,
                monitor=monitor_name(model_name, "generative"),
                flops=llm_flops(config, n, logit_positions=max(n_new[i], 1)),
                n_tokens=n,
                text=texts[i],
                answer=label,
                valid=label is not None,
            )
        )
    return out
