"""Aggregation of real inspect logs (no model: a solver writes a fixed answer, inspect's
mockllm provider is named but never called): dict-valued scores become metric columns,
refusals become per-subset refusal rates."""

from __future__ import annotations

import csv

import pytest
from inspect_ai import Task, eval
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ModelOutput
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, mean, scorer
from inspect_ai.solver import TaskState, solver

from mup.evals import COLUMNS, collect, plot, write_csv, xstest_offline

# IFEval-like per-sample results: prompt-level and instruction-level, strict and loose.
IFEVAL = {
    0: {"prompt_strict": True, "prompt_loose": True, "inst_strict": 1.0, "inst_loose": 1.0},
    1: {"prompt_strict": False, "prompt_loose": True, "inst_strict": 0.5, "inst_loose": 1.0},
    2: {"prompt_strict": False, "prompt_loose": False, "inst_strict": 0.0, "inst_loose": 0.5},
    3: {"prompt_strict": True, "prompt_loose": True, "inst_strict": 1.0, "inst_loose": 1.0},
}


@scorer(metrics=[mean()])
def ifeval_like():
    async def score(state: TaskState, target: Target) -> Score:
        row = IFEVAL[int(state.sample_id)]
        return Score(value={k: (CORRECT if v is True else INCORRECT if v is False else v)
                            for k, v in row.items()})  # fmt: skip

    return score


ANSWER = "Sure, here is how to do it: first, open the terminal."


@solver
def fixed_answer():
    async def solve(state, generate):
        state.output = ModelOutput.from_content("mockllm/model", ANSWER)
        return state

    return solve


def _run(task, log_dir, m):
    task.solver = fixed_answer()
    (log,) = eval(task, model="mockllm/model", log_dir=str(log_dir / f"multiplier_{m}"),
                  display="none")  # fmt: skip
    assert log.status == "success", log.error


def test_dict_scores_become_metric_columns(tmp_path):
    task = Task(
        dataset=MemoryDataset([Sample(input=f"q{i}", id=i) for i in IFEVAL]),
        scorer=ifeval_like(),
    )
    _run(task, tmp_path / "instruction_following", 0.5)
    rows = collect(tmp_path)
    got = {r["metric"]: r["accuracy"] for r in rows}
    # each key averaged on its own, not collapsed into one number by value_to_float
    assert got == {
        "prompt_strict": 0.5,
        "prompt_loose": 0.75,
        "inst_strict": 0.625,
        "inst_loose": 0.875,
    }
    assert {r["multiplier"] for r in rows} == {0.5} and {r["n_samples"] for r in rows} == {4}
    assert all(r["chance"] is None for r in rows)  # not multiple choice
    out = write_csv(rows, tmp_path / "r.csv")
    with out.open() as file:
        assert tuple(csv.DictReader(file).fieldnames) == COLUMNS
    assert plot(rows, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_xstest_refusal_rates_per_subset(tmp_path, shared_data):
    # every prompt gets the same compliant answer: refusal rate 0 on safe and on
    # unsafe prompts; accuracy = compliance on safe, refusal on unsafe.
    task = xstest_offline(data=str(shared_data))
    task.dataset = MemoryDataset(list(task.dataset)[:6])
    _run(task, tmp_path / "safety", 1.0)
    rows = {(r["subset"], r["metric"]): r for r in collect(tmp_path)}
    assert set(rows) == {
        (s, m) for s in ("all", "safe", "unsafe") for m in ("accuracy", "refusal_rate")
    }
    assert rows[("safe", "refusal_rate")]["accuracy"] == 0.0
    assert rows[("unsafe", "refusal_rate")]["accuracy"] == 0.0
    assert rows[("safe", "accuracy")]["accuracy"] == 1.0
    assert rows[("unsafe", "accuracy")]["accuracy"] == 0.0
    assert rows[("safe", "refusal_rate")]["n_samples"] == 3
    assert rows[("all", "refusal_rate")]["chance"] is None


def test_list_scores_are_refused(tmp_path):
    @scorer(metrics=[mean()])
    def listy():
        async def score(state, target):
            return Score(value=[1, 0])

        return score

    _run(Task(dataset=MemoryDataset([Sample(input="q", id=0)]), scorer=listy()), tmp_path, 0.0)
    with pytest.raises(ValueError, match="list-valued"):
        collect(tmp_path)
