"""Shared-prefix log-likelihood multiple choice (`mup.evals._prefix`): each sample's prompt is
prefilled once and every choice scored from its cache. Checked against an independent torch
forward of every prompt + choice (steered by a hook) and against the engine-rows route."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from _support.loglik_reference import torch_logliks
from inspect_ai import Task, eval
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import get_model

import mup.evals  # noqa: F401 - registers the mup/ provider
from mup.evals import load_vector
from mup.evals._loglik import continuation_score, loglik_choice, loglik_choices
from mup.evals._prefix import PrefixItem, PrefixScorer

STEER_BLOCK = 1
TEMPLATE = "Question: {question}\nAnswer:"
ITEMS = [
    ("What is the capital city of France?", ["Oslo", "Paris", "Rome", "Lima"], "B"),
    ("What sound does a cow make?", ["moo", "quack", "a loud roar", "hiss"], "A"),
    ("Name a primary colour.", ["red", "green and blue, in that order", "pink"], "A"),
]
# One sample whose choices merge with the prompt's last characters: the prompt ends in "Par",
# so " Paris" tokenizes differently from "Par" + "is" and the shared prefix is shorter than the
# prompt (the merged token counts as continuation, as in `continuation_score`).
MERGED = ("The capital of France is Par", ["is", "ased", "king lot"])


@pytest.fixture(scope="module")
def tiny(tiny_dir, vector_file):
    from mup.models import load_model

    model = load_model(str(tiny_dir))
    vector, _ = load_vector(vector_file, STEER_BLOCK)
    return model, vector


def _item(tokenizer, prompt: str, continuations, m: float) -> PrefixItem:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    fulls = [tokenizer(prompt + c, add_special_tokens=True)["input_ids"] for c in continuations]
    return PrefixItem(prompt_ids=tuple(ids), full_ids=tuple(tuple(f) for f in fulls), multiplier=m)


def _cases():
    """(prompt, continuations) of the three test items and the merged case."""
    out = [(TEMPLATE.format(question=q), [" " + c for c in choices]) for q, choices, _ in ITEMS]
    return [*out, MERGED]


def test_prefix_scores_equal_an_independent_torch_forward(tiny, tiny_dir):
    model, vector = tiny
    scorer = PrefixScorer(model, vector, STEER_BLOCK)
    cases = _cases()
    tok = model.tokenizer
    merged = _item(tok, *MERGED, 0.0)
    assert merged.shared < len(merged.prompt_ids)  # the case does exercise a merged token
    for m in (-1.0, 1.0):
        got = scorer.score_batch([_item(tok, p, cs, m) for p, cs in cases])  # one batch
        for (prompt, conts), scores in zip(cases, got, strict=True):
            want = torch_logliks(tiny_dir, vector, STEER_BLOCK, m, prompt, conts)
            np.testing.assert_allclose([s.logprob for s in scores], want, rtol=1e-4, atol=1e-4)
            # token counts as continuation_score counts them
            ids = tok(prompt)["input_ids"]
            for c, s in zip(conts, scores, strict=True):
                full = tok(prompt + c)["input_ids"]
                assert s.n_tokens == continuation_score(ids, full, [0.0] * len(full)).n_tokens


def test_a_sample_scores_the_same_alone_and_in_any_batch(tiny):
    # Padding (prompt buckets, choice buckets, padded sample and row counts) and the other
    # samples of a batch leave a sample's scores unchanged; so do multipliers of other rows.
    model, vector = tiny
    scorer = PrefixScorer(model, vector, STEER_BLOCK)
    tok = model.tokenizer
    strengths = (-1.0, 0.0, 1.0, 2.0)
    items = [_item(tok, p, cs, m) for (p, cs), m in zip(_cases(), strengths, strict=True)]
    together = scorer.score_batch(items)
    reversed_ = scorer.score_batch(items[::-1])[::-1]
    for item, a, b in zip(items, together, reversed_, strict=True):
        alone = scorer.score_batch([item])[0]
        for x, y, z in zip(alone, a, b, strict=True):
            assert x.n_tokens == y.n_tokens == z.n_tokens
            np.testing.assert_allclose([y.logprob, z.logprob], x.logprob, rtol=1e-5, atol=1e-5)


def test_the_async_worker_batches_concurrent_samples(tiny):
    model, vector = tiny
    scorer = PrefixScorer(model, vector, STEER_BLOCK)
    tok = model.tokenizer
    items = [_item(tok, p, cs, 1.0) for p, cs in _cases()]

    async def run():
        return await asyncio.gather(*(scorer.score(it) for it in items))

    got = asyncio.run(run())
    want = scorer.score_batch(items)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], rtol=1e-5)


def test_bad_items_are_refused_before_any_work(tiny):
    model, vector = tiny
    tok = model.tokenizer
    with pytest.raises(ValueError, match="needs its block"):
        PrefixScorer(model, vector, None)
    unsteered = PrefixScorer(model)
    with pytest.raises(ValueError, match="without a steering vector"):
        unsteered.check(_item(tok, "Question: x\nAnswer:", [" a", " b"], 1.0))
    with pytest.raises(ValueError, match="adds no token"):
        unsteered.check(_item(tok, "Question: x\nAnswer:", ["", " b"], 0.0))
    with pytest.raises(ValueError, match="no choices"):
        unsteered.check(PrefixItem(prompt_ids=(1, 2), full_ids=(), multiplier=0.0))
    long = PrefixItem(prompt_ids=(1,) * 4000, full_ids=((1,) * 4001,), multiplier=0.0)
    with pytest.raises(ValueError, match="longer than the model's 2048 positions"):
        unsteered.check(long)


def _eval_logliks(model_spec, vector_file, route, samples, log_dir, multipliers):
    task = Task(
        dataset=MemoryDataset(samples),
        solver=loglik_choices(template=TEMPLATE),
        scorer=loglik_choice(),
    )
    models = [
        get_model(
            f"mup/{model_spec}",
            memoize=False,
            multiplier=m,
            vector=str(vector_file),
            block=STEER_BLOCK,
            loglik=route,
        )
        for m in multipliers
    ]
    logs = eval(task, model=models, log_dir=str(log_dir), display="none", max_tasks=2)
    assert [log.status for log in logs] == ["success"] * len(models), [x.error for x in logs]
    return {
        (float(log.eval.model_args["multiplier"]), s.id): (
            s.scores["loglik_choice"].metadata["loglik"],
            s.scores["loglik_choice"].value,
        )
        for log in logs
        for s in log.samples
    }


@pytest.mark.slow  # two inspect evals on the tiny model: the engine's echo programs compile
def test_the_prefix_route_equals_the_engine_rows_route_in_an_eval(tiny_dir, vector_file, tmp_path):
    samples = [Sample(input=q, choices=c, target=t, id=i) for i, (q, c, t) in enumerate(ITEMS)]
    args = (tiny_dir, vector_file)
    rows = _eval_logliks(*args, "rows", samples, tmp_path / "rows", (-1.0, 1.0))
    prefix = _eval_logliks(*args, "prefix", samples, tmp_path / "prefix", (-1.0, 1.0))
    assert rows.keys() == prefix.keys() and len(rows) == 2 * len(ITEMS)
    for key, (lls, value) in rows.items():
        np.testing.assert_allclose(prefix[key][0], lls, rtol=1e-4, atol=1e-4)
        assert prefix[key][1] == value


@pytest.mark.slow  # the default model, both routes over mc_easy_ll's first items
def test_the_prefix_route_equals_the_rows_route_on_mc_easy_with_the_default_model(tmp_path):
    from mup.evals import mc_easy_ll

    samples = list(mc_easy_ll().dataset)[:12]
    rng = np.random.default_rng(0)
    v = rng.standard_normal(576).astype(np.float32)
    vector = tmp_path / "v.npy"
    np.save(vector, v / np.linalg.norm(v) * 8.0)

    def run(route):
        task = Task(
            dataset=MemoryDataset(samples),
            solver=loglik_choices(),
            scorer=loglik_choice(),
        )
        models = [
            get_model(
                "mup/smollm2-135m", memoize=False, multiplier=m, vector=str(vector), block=12,
                loglik=route,
            )
            for m in (0.0, 4.0)
        ]  # fmt: skip
        logs = eval(task, model=models, log_dir=str(tmp_path / route), display="none")
        assert [log.status for log in logs] == ["success", "success"]
        return {
            (float(log.eval.model_args["multiplier"]), s.id): s.scores["loglik_choice"]
            for log in logs
            for s in log.samples
        }

    rows, prefix = run("rows"), run("prefix")
    assert rows.keys() == prefix.keys() and len(rows) == 2 * len(samples)
    for key, score in rows.items():
        np.testing.assert_allclose(
            prefix[key].metadata["loglik"], score.metadata["loglik"], rtol=1e-4, atol=1e-4
        )
        assert prefix[key].value == score.value


def test_an_unknown_loglik_route_is_refused_before_the_model_loads(tmp_path):
    # the check comes before any load: the spec need not even exist
    with pytest.raises(ValueError, match=r"loglik must be one of \['prefix', 'rows'\]"):
        get_model(f"mup/{tmp_path / 'absent'}", memoize=False, loglik="pairs")
