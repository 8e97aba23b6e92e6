"""The `mup/<spec>` inspect provider: real inspect evals over a tiny random llama.

Two models (multipliers -1 and +1) run in ONE `inspect_ai.eval` call; their samples must
decode together in the shared engine's slots, and every completion must equal what
`mup.models.generate` returns for that prompt and multiplier directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from inspect_ai import Task, eval
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import GenerateConfig, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import generate

import mup.evals  # noqa: F401 - registers the mup/ provider
from mup.evals import load_vector
from mup.evals._provider import _ENGINES, _load

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three."]
MAX_TOKENS = 6
STEER_LAYER = 1  # a block of the 2-block tiny model (conftest)


def _model(tiny_dir, vector_file, m):
    return get_model(
        f"mup/{tiny_dir}", memoize=False, multiplier=m, vector=str(vector_file), block=STEER_LAYER
    )


def test_multipliers_batched_and_equal_direct_generate(tiny_dir, vector_file, tmp_path):
    from mup.models import Steering
    from mup.models import generate as mup_generate

    task = Task(
        dataset=MemoryDataset([Sample(input=p, target="4", id=i) for i, p in enumerate(PROMPTS)]),
        solver=generate(),
        scorer=includes(),
        config=GenerateConfig(max_tokens=MAX_TOKENS, temperature=0.0),
    )
    multipliers = (-1.0, 1.0)
    models = [_model(tiny_dir, vector_file, m) for m in multipliers]
    # Other tests of the session may have used the same shared engine: count from here.
    engine = next(e for k, e in _ENGINES.items() if k[0] == str(tiny_dir) and k[2] is not None)
    mixed, requests = engine.stats["mixed_steps"], engine.metrics.requests
    logs = eval(
        task,
        model=models,
        log_dir=str(tmp_path),
        display="none",
        max_tasks=2,
    )
    assert [log.status for log in logs] == ["success", "success"]
    got = {
        (float(log.eval.model_args["multiplier"]), s.input): s.output.completion
        for log in logs
        for s in log.samples
    }
    assert len(got) == 8

    # 4 samples x 2 multipliers: some decode steps ran both multipliers together.
    assert engine.stats["mixed_steps"] > mixed
    assert engine.metrics.requests - requests == 8

    model = _load(str(tiny_dir), "float32")
    vector, block = load_vector(vector_file, STEER_LAYER)
    rows = [(m, p) for m in multipliers for p in PROMPTS]
    direct = mup_generate(
        model,
        [[{"role": "user", "content": p}] for _, p in rows],
        max_new_tokens=MAX_TOKENS,
        steering=Steering(block, vector),
        multipliers=[m for m, _ in rows],
        seed=list(range(len(rows))),
    )
    for (m, p), text in zip(rows, direct.texts, strict=True):
        assert got[(m, p)] == text, (m, p)
    # the vector matters: some prompt's completion differs between -1 and +1
    assert any(got[(-1.0, p)] != got[(1.0, p)] for p in PROMPTS)


def test_logprobs_reach_inspect(tiny_dir, vector_file):
    """GenerateConfig(logprobs=True, top_logprobs=k): every completion token carries its
    logprob and k alternatives; they equal the engine's for the same row."""
    import asyncio

    from inspect_ai.model import ChatMessageUser

    model = _model(tiny_dir, vector_file, 1.0)
    config = GenerateConfig(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True, top_logprobs=3)
    out = asyncio.run(model.generate([ChatMessageUser(content=PROMPTS[0])], config=config))
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.output_tokens == MAX_TOKENS or out.stop_reason == "stop"
    assert "".join(t.token for t in content) == out.completion
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.logprob <= 0


def test_bad_model_args_are_refused(tiny_dir, vector_file):
    with pytest.raises(ValueError, match=r"unknown model args \['strength'\]"):
        get_model(f"mup/{tiny_dir}", memoize=False, strength=1.0)
    with pytest.raises(ValueError, match="needs a steering vector"):
        get_model(f"mup/{tiny_dir}", memoize=False, multiplier=1.0)
    # -M layer=: the old name of -M block=, still known (else "unknown model args ['layer']")
    with pytest.raises(ValueError, match="multiplier must be a number"):
        get_model(
            f"mup/{tiny_dir}", memoize=False, multiplier="big", vector=str(vector_file), layer=1
        )
    with pytest.raises(ValueError, match="layer must be an int"):
        get_model(f"mup/{tiny_dir}", memoize=False, vector=str(vector_file), layer="x")
    with pytest.raises(ValueError, match="give block"):
        get_model(f"mup/{tiny_dir}", memoize=False, vector=str(vector_file), block=1, layer=1)


def test_vector_files(tmp_path):
    from mup.steering import SteeringVector, save_vector

    v = np.arange(1, 5, dtype=np.float32)
    save_vector(tmp_path / "v.safetensors", SteeringVector(vector=v, block=3, method="npy"))
    got, block = load_vector(tmp_path / "v.safetensors")
    assert block == 3 and np.array_equal(got, v)
    with pytest.raises(ValueError, match="3"):
        load_vector(tmp_path / "v.safetensors", 2)
    np.save(tmp_path / "v.npy", v)
    assert load_vector(tmp_path / "v.npy", 1)[1] == 1
    with pytest.raises(ValueError, match="block"):
        load_vector(tmp_path / "v.npy")
    with pytest.warns(DeprecationWarning, match="layer= is deprecated"):
        assert load_vector(tmp_path / "v.npy", layer=2)[1] == 2
    with pytest.raises(ValueError, match="d_model=8"):
        load_vector(tmp_path / "v.npy", 1, d_model=8)
