"""HumanEval from the data root, its completions run only in the contained subprocess."""

from __future__ import annotations

import asyncio
import json
import time

from inspect_ai.model import ChatMessageUser, ModelOutput
from inspect_ai.scorer import CORRECT, INCORRECT, Target
from inspect_ai.solver import TaskState

from mup.evals._sandbox import run_contained
from mup.evals._tasks import extract_code, humaneval_check, humaneval_offline, humaneval_program


def test_a_loop_that_never_ends_is_killed_with_its_children():
    t0 = time.perf_counter()
    # a forked grandchild would outlive a plain kill; fork is refused, and the group is killed
    result = run_contained("import os\ntry:\n    os.fork()\nexcept PermissionError:\n"
                           "    pass\nwhile True:\n    pass\n", timeout=1.0)  # fmt: skip
    assert result.timed_out and not result.ok and result.returncode is None
    assert time.perf_counter() - t0 < 10


def test_writes_outside_the_work_dir_and_programs_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    for source in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os; os.system('touch {target}')",
        f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
        f"import os; os.remove({str(tmp_path)!r})",
        "import socket; socket.create_connection(('127.0.0.1', 9))",
    ):
        result = run_contained(source, timeout=5)
        assert result.returncode != 0 and "sandbox:" in result.stderr, source
    assert not target.exists()
    # memory beyond the limit is refused inside the program, not taken from the machine
    assert "MemoryError" in run_contained("x = bytearray(4 << 30)").stderr
    # inside its own (temporary, then deleted) directory a program may write and read
    ok = run_contained("open('t.txt', 'w').write('hi'); print(open('t.txt').read())")
    assert ok.ok and ok.stdout == "hi\n"


def _items(shared_data, n=2):
    with (shared_data / "benchmarks" / "humaneval.jsonl").open() as file:
        return [json.loads(next(file)) for _ in range(n)]


def _state(task_sample, completion: str) -> TaskState:
    state = TaskState(
        model="mup/x",
        sample_id=task_sample.id,
        epoch=1,
        input=task_sample.input,
        messages=[ChatMessageUser(content=task_sample.input)],
        metadata=task_sample.metadata,
    )
    state.output = ModelOutput.from_content("mup/x", completion)
    return state


def test_humaneval_scores_canonical_solutions_and_contains_bad_ones(shared_data):
    task = humaneval_offline(data=str(shared_data))
    assert len(task.dataset) == 164
    items = _items(shared_data)
    score = humaneval_check(timeout=5.0)
    run = lambda sample, text: asyncio.run(score(_state(sample, text), Target("")))  # noqa: E731
    for sample, item in zip(task.dataset, items, strict=False):
        assert run(sample, item["canonical_solution"]).value == CORRECT
        fenced = f"```python\n{item['prompt']}{item['canonical_solution']}```"
        assert run(sample, fenced).value == CORRECT  # a whole function in a fenced block
        assert run(sample, "    return None\n").value == INCORRECT
    looping = run(task.dataset[0], "    while True:\n        pass\n")
    assert looping.value == INCORRECT and looping.metadata["timed_out"]


def test_program_layout():
    assert extract_code("Here:\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert extract_code("    return 1\n```\n\nThis returns one.") == "    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```python\ndef f():\n    return") == "def f():\n    return"
    body = humaneval_program("def f(a):\n", "    return a\n", "def check(c): pass", "f")
    assert body.startswith("def f(a):\n    return a\n") and body.endswith("check(f)\n")
