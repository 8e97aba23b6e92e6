"""Log-likelihood multiple choice: acc / acc_norm, and the in-process route against an
independent torch forward of the same tiny checkpoint (steered by a forward hook)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from _support.loglik_reference import torch_logliks
from inspect_ai import Task, eval
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageUser, get_model
from inspect_ai.scorer import CORRECT, INCORRECT, Target
from inspect_ai.solver import Choices, TaskState

import mup.evals  # noqa: F401 - registers the mup/ provider
from mup.evals import collect, load_vector
from mup.evals._loglik import (
    STORE_KEY,
    common_prefix,
    continuation_score,
    loglik_choice,
    loglik_choices,
    pick,
)

STEER_LAYER = 1
MULTIPLIERS = (-1.0, 1.0)
TEMPLATE = "Question: {question}\nAnswer:"
ITEMS = [
    ("What is the capital city of France?", ["Oslo", "Paris", "Rome", "Lima"], "B"),
    ("What sound does a cow make?", ["moo", "quack", "a loud roar", "hiss"], "A"),
    ("What is the opposite of hot?", ["slow", "dark", "empty", "cold"], "D"),
]


def _state(choices, lls) -> TaskState:
    state = TaskState(
        model="mup/x", sample_id=1, epoch=1, input="q", messages=[ChatMessageUser(content="q")]
    )
    state.choices = Choices(choices)
    state.store.set(STORE_KEY, {"loglik": lls, "n_chars": [len(c) for c in choices]})
    return state


def test_acc_and_acc_norm_on_a_constructed_case():
    # "elephant" has the lower total log-likelihood (-6 < -4) but the higher per character
    # (-0.75 > -2): acc picks "ox", acc_norm (lm-eval: divided by the choice's characters)
    # picks "elephant".
    choices, lls = ["elephant", "ox"], [-6.0, -4.0]
    assert pick(lls) == 1 and pick(lls, [8, 2]) == 0
    score = asyncio.run(loglik_choice()(_state(choices, lls), Target("A")))
    assert score.value == {"acc": INCORRECT, "acc_norm": CORRECT}
    assert score.answer == "B" and score.metadata["acc_norm_answer"] == "A"
    score = asyncio.run(loglik_choice()(_state(choices, lls), Target("B")))
    assert score.value == {"acc": CORRECT, "acc_norm": INCORRECT}
    assert pick([-1.0, -1.0, -2.0]) == 0  # ties: the first, as numpy's argmax


def test_continuation_tokens_after_the_common_prefix():
    # The continuation's tokens start where prompt and prompt + continuation stop agreeing; a
    # token merging the prompt's end with the continuation counts as continuation.
    assert common_prefix([1, 2, 3], [1, 2, 3, 4, 5]) == 3
    got = continuation_score([1, 2, 3], [1, 2, 3, 4, 5], [None, -1.0, -2.0, -0.5, -0.25])
    assert got.logprob == -0.75 and got.n_tokens == 2
    merged = continuation_score([1, 2, 3], [1, 2, 9, 5], [None, -1.0, -3.0, -0.5])
    assert merged.logprob == -3.5 and merged.n_tokens == 2
    with pytest.raises(ValueError, match="adds no token"):
        continuation_score([1, 2], [1, 2], [None, -1.0])


def _torch_logliks(tiny_dir, vector, m, prompt, continuations) -> list[float]:
    return torch_logliks(tiny_dir, vector, STEER_LAYER, m, prompt, continuations)


@pytest.fixture(scope="module")
def ll_logs(tiny_dir, vector_file, tmp_path_factory):
    """One inspect eval of a 3-item log-likelihood task at multipliers -1 and +1."""
    samples = [
        Sample(input=q, choices=c, target=t, id=i, metadata={"subset": "s"})
        for i, (q, c, t) in enumerate(ITEMS)
    ]
    task = Task(
        dataset=MemoryDataset(samples),
        solver=loglik_choices(template=TEMPLATE),
        scorer=loglik_choice(),
    )
    models = [
        get_model(f"mup/{tiny_dir}", memoize=False, multiplier=m, vector=str(vector_file), layer=1)
        for m in MULTIPLIERS
    ]
    log_dir = tmp_path_factory.mktemp("ll_logs")
    logs = eval(task, model=models, log_dir=str(log_dir), display="none", max_tasks=2)
    assert [log.status for log in logs] == ["success", "success"], [log.error for log in logs]
    return log_dir, logs


@pytest.mark.slow  # ~20-40 s on 2 loaded cores: the engine's echo prefill programs compile
def test_in_process_logliks_equal_an_independent_torch_forward(ll_logs, tiny_dir, vector_file):
    _, logs = ll_logs
    vector, _ = load_vector(vector_file, STEER_LAYER)
    seen = set()
    for log in logs:
        m = float(log.eval.model_args["multiplier"])
        for sample in log.samples:
            q, choices, target = ITEMS[int(sample.id)]
            got = sample.scores["loglik_choice"].metadata["loglik"]
            want = _torch_logliks(
                tiny_dir, vector, m, TEMPLATE.format(question=q), [" " + c for c in choices]
            )
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
            value = sample.scores["loglik_choice"].value
            gold = ord(target) - ord("A")
            assert value["acc"] == (CORRECT if int(np.argmax(want)) == gold else INCORRECT)
            seen.add((m, tuple(np.round(got, 3))))
    assert len({m for m, _ in seen}) == 2
    # the vector matters: the two multipliers give different log-likelihoods
    assert len(seen) == 2 * len(ITEMS)


@pytest.mark.slow  # shares the eval above
def test_dict_scores_aggregate_into_metric_columns(ll_logs):
    log_dir, _ = ll_logs
    rows = collect(log_dir)
    metrics = {(r["metric"], r["multiplier"]) for r in rows}
    assert metrics == {(k, m) for k in ("acc", "acc_norm") for m in MULTIPLIERS}
    for r in rows:
        assert r["n_samples"] == len(ITEMS) and r["chance"] == pytest.approx(0.25)
