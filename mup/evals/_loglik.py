"""Log-likelihood multiple choice: an inspect solver that scores every choice under the model,
and a scorer that reports acc and acc_norm as lm-evaluation-harness defines them.

For a sample with prompt x and choices c_1..c_k, each choice is the continuation
``target_delimiter + c_i`` of the prompt text, and

    LL_i = sum_j log p(t_j | x, t_<j)   over the continuation's tokens t,
    acc      = [argmax_i LL_i == gold]
    acc_norm = [argmax_i LL_i / len(c_i) == gold]   (len = characters of the choice text,
                                                     without the delimiter, as lm-eval)

The prompt is plain text (no chat template), as lm-eval's loglikelihood tasks: a server's
/v1/completions scores raw text, so both routes read the same tokens. The prompt and the
prompt + continuation are tokenized as whole strings; the continuation's tokens are those
after the longest common prefix of the two token lists (a token that merges the prompt's last
characters with the continuation's first counts as continuation).

Two routes, picked by the model under evaluation:

- `mup/<spec>` (`MupModelAPI.score_continuations`): every (prompt + choice) is one engine row
  with ``max_tokens=0`` and prompt logprobs, steered by the model's multiplier, so the rows of
  all samples and all multipliers of a run are prefilled together in the shared engine;
- an OpenAI-compatible server (`openai-api/...`, e.g. a deployed `mup serve`):
  ``/v1/completions`` with ``echo``, ``max_tokens 0`` and ``logprobs 0`` on the prompt and on
  every prompt + choice, with the deployment's `extra_body` (``steer_multiplier``).

inspect has no log-likelihood call in its model API, so the solver reaches the provider through
`get_model().api` (inspect's documented way for a solver to use the model of the eval) and
records the per-choice log-likelihoods in the task state's store; the scorer reads them there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from inspect_ai.model import ModelOutput, get_model
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, accuracy, scorer, stderr
from inspect_ai.solver import Generate, Solver, TaskState, solver

STORE_KEY = "mup_loglik"
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class ContinuationScore:
    """A continuation's summed log-probability and how many tokens it spans."""

    logprob: float
    n_tokens: int


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def continuation_score(
    prompt_tokens: Sequence[Any], full_tokens: Sequence[Any], full_logprobs: Sequence[float | None]
) -> ContinuationScore:
    """Sum `full_logprobs[j]` (log p(full[j] | full[:j])) over the continuation's tokens."""
    if len(full_logprobs) != len(full_tokens):
        raise ValueError(f"{len(full_logprobs)} logprobs for {len(full_tokens)} tokens")
    start = max(1, common_prefix(prompt_tokens, full_tokens))  # token 0 has no logprob
    if start >= len(full_tokens):
        raise ValueError("the continuation adds no token to the prompt")
    lps = full_logprobs[start:]
    if any(lp is None for lp in lps):
        raise ValueError("a continuation token has no logprob")
    return ContinuationScore(float(sum(lps)), len(full_tokens) - start)


# ---------------------------------------------------------------------------------------------
# The server route: /v1/completions echo
# ---------------------------------------------------------------------------------------------


class EchoRoute:
    """Continuation scores from an OpenAI-compatible server's legacy completions echo."""

    def __init__(self, client, model: str, extra_body: dict | None = None):
        self.client = client  # openai.AsyncOpenAI
        self.model = model
        self.extra_body = dict(extra_body or {})

    async def score_continuations(
        self, prompt: str, continuations: Sequence[str]
    ) -> list[ContinuationScore]:
        texts = [prompt, *(prompt + c for c in continuations)]
        response = await self.client.completions.create(
            model=self.model,
            prompt=texts,
            max_tokens=0,
            echo=True,
            logprobs=0,
            temperature=0.0,
            extra_body=self.extra_body or None,
        )
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(texts):
            raise RuntimeError(
                f"the server at {self.client.base_url} answered {len(choices)} choices for "
                f"{len(texts)} prompts"
            )
        echoed = []
        for choice in choices:
            lp = choice.logprobs
            if lp is None or not lp.tokens or lp.token_logprobs is None:
                raise RuntimeError(
                    f"the server at {self.client.base_url} returned no echo logprobs; it must "
                    "support /v1/completions with echo and max_tokens 0 (mup serve and vLLM do)"
                )
            echoed.append((list(lp.tokens), list(lp.token_logprobs)))
        prompt_tokens = echoed[0][0]
        return [continuation_score(prompt_tokens, toks, lps) for toks, lps in echoed[1:]]


def continuation_route(model=None):
    """What scores continuations for the model under evaluation (or `model`)."""
    model = get_model(model)
    api = model.api
    if callable(getattr(api, "score_continuations", None)):  # mup/<spec> (MupModelAPI)
        return api
    client = getattr(api, "client", None)
    if client is not None and hasattr(client, "completions"):
        name = api.service_model_name() if hasattr(api, "service_model_name") else api.model_name
        return EchoRoute(client, name, model.config.extra_body)
    raise ValueError(
        f"log-likelihood multiple choice needs a mup/ model or an OpenAI-compatible server "
        f"(openai-api/...) with /v1/completions echo logprobs; {model} is neither"
    )


# ---------------------------------------------------------------------------------------------
# Solver and scorer
# ---------------------------------------------------------------------------------------------


def choice_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(question=question)


@solver
def loglik_choices(
    template: str = DEFAULT_TEMPLATE, target_delimiter: str = DEFAULT_DELIMITER
) -> Solver:
    """Score each of the sample's choices by its log-likelihood after the prompt.

    The prompt is `template` with ``{question}`` = the sample's input text; each choice is
    scored as ``target_delimiter + choice``. The output's completion is the best choice's
    text (by acc's rule), so logs read like a generated answer.
    """

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        if not state.choices or len(state.choices) < 2:
            raise ValueError(f"sample {state.sample_id}: log-likelihood MC needs >= 2 choices")
        texts = [c.value for c in state.choices]
        prompt = choice_prompt(state.input_text, template)
        scores = await continuation_route().score_continuations(
            prompt, [target_delimiter + t for t in texts]
        )
        lls = [s.logprob for s in scores]
        state.store.set(
            STORE_KEY,
            {
                "loglik": lls,
                "n_tokens": [s.n_tokens for s in scores],
                "n_chars": [len(t) for t in texts],
            },
        )
        best = max(range(len(lls)), key=lambda i: lls[i])
        state.output = ModelOutput.from_content(str(state.model), texts[best])
        return state

    return solve


def pick(lls: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """argmax of the log-likelihoods (each divided by its length with `lengths`); the first
    wins a tie, as numpy's argmax in lm-eval."""
    if lengths is None:
        values = list(lls)
    else:
        values = [ll / max(1, n) for ll, n in zip(lls, lengths, strict=True)]
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _letter(i: int) -> str:
    return chr(ord("A") + i)


@scorer(metrics={"acc": [accuracy(), stderr()], "acc_norm": [accuracy(), stderr()]})
def loglik_choice():
    """acc and acc_norm of the choice picked by `loglik_choices` (target: the gold letter)."""

    async def score(state: TaskState, target: Target) -> Score:
        found = state.store.get(STORE_KEY)
        if found is None:
            raise ValueError("loglik_choice needs the loglik_choices solver before it")
        lls, chars = found["loglik"], found["n_chars"]
        gold = ord(target.text.strip().upper()) - ord("A")
        if not 0 <= gold < len(lls):
            raise ValueError(f"sample {state.sample_id}: target {target.text!r} is not a choice")
        raw, norm = pick(lls), pick(lls, chars)
        if not all(math.isfinite(x) for x in lls):
            raise ValueError(f"sample {state.sample_id}: non-finite log-likelihoods {lls}")
        return Score(
            value={
                "acc": CORRECT if raw == gold else INCORRECT,
                "acc_norm": CORRECT if norm == gold else INCORRECT,
            },
            answer=_letter(raw),
            metadata={"loglik": lls, "n_chars": chars, "acc_norm_answer": _letter(norm)},
        )

    return score
