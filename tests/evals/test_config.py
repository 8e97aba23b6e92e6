"""configs/benchmarks.yaml: every entry well-formed, offline tasks build, errors are clear."""

from __future__ import annotations

import importlib.util
import inspect as pyinspect

import pytest
from inspect_ai.model import GenerateConfig

from mup.evals import SuiteError, build_task, load_suites
from mup.evals._suite import check_args, task_function

REFERENCE = {
    "mmlu_0_shot", "ifeval", "arc_easy", "arc_challenge", "gpqa_diamond", "humaneval", "mbpp",
    "gsm8k", "commonsense_qa", "truthfulqa", "sycophancy", "xstest_safe", "xstest_unsafe",
}  # fmt: skip
HAVE_INSPECT_EVALS = importlib.util.find_spec("inspect_evals") is not None


@pytest.fixture(scope="module")
def suites():
    return load_suites()


def test_suites_and_entries_are_well_formed(suites):
    assert set(suites.suites) == {"offline", "reference", "offline-mc"}
    assert set(suites.suites["reference"]) == REFERENCE
    assert set(suites.suites["offline"]) == {"gsm8k_offline", "xstest_offline", "mc_general"}
    for spec in suites.benchmarks.values():
        assert spec.task.startswith(("inspect_evals/", "mup/")), spec
        assert spec.category and spec.benchmark
        GenerateConfig(**spec.generate)  # valid settings
    gsm8k = suites.benchmarks["gsm8k"]
    assert gsm8k.args == {"fewshot": 8} and gsm8k.generate["max_tokens"] == 512


OFFLINE = ["gsm8k_offline", "xstest_offline", "mc_general", "humaneval_offline"]


@pytest.mark.parametrize("name", [*OFFLINE, "mc_easy_ll", "mc_general_ll"])
def test_offline_entries_build_with_their_settings(suites, shared_data, name):
    spec = suites.benchmarks[name]
    fn = task_function(spec)
    assert set(spec.args) <= set(pyinspect.signature(fn).parameters)
    task = build_task(spec)
    assert len(task.dataset) > 0
    if "max_tokens" in spec.args:
        assert task.config.max_tokens == spec.args["max_tokens"]  # honoured, not ignored
    assert all("subset" in (s.metadata or {}) for s in list(task.dataset)[:20])


def test_offline_mc_suite_skips_hub_sets_with_the_reason(suites):
    from mup.evals import TaskUnavailable

    specs = suites.suite("offline-mc")
    assert [s.name for s in specs][:2] == ["mc_easy_ll", "mc_general_ll"]
    hub = [s for s in specs if s.task == "mup/hub_mc_ll"]
    assert {s.args["benchmark"] for s in hub} == {
        "arc_easy",
        "arc_challenge",
        "mmlu",
        "truthfulqa_mc1",
    }
    if importlib.util.find_spec("inspect_evals") is not None:
        pytest.skip("inspect_evals is installed: the hub sets may load here")
    for spec in hub:
        with pytest.raises(TaskUnavailable, match=r"needs the package 'inspect_evals'"):
            build_task(spec)


def test_gsm8k_offline_exemplars_never_evaluated(suites, shared_data):
    from mup.evals._tasks import FEWSHOT_POOL, _gsm8k_path, _read_gsm8k

    rows = _read_gsm8k(_gsm8k_path(None))
    task = build_task(suites.benchmarks["gsm8k_offline"])
    assert len(task.dataset) == len(rows) - FEWSHOT_POOL
    first = task.dataset[0]
    shots = suites.benchmarks["gsm8k_offline"].args["fewshot"]
    assert first.input.count("Question:") == shots + 1
    assert rows[FEWSHOT_POOL][0] in first.input and first.target == rows[FEWSHOT_POOL][2]
    # exemplar questions appear only as exemplars, never as an evaluated question
    asked = {s.input.rsplit("Question: ", 1)[1] for s in task.dataset}
    assert not any(q in a for q, _, _ in rows[:FEWSHOT_POOL] for a in asked)


@pytest.mark.skipif(HAVE_INSPECT_EVALS, reason="inspect_evals is installed here")
def test_reference_suite_names_the_missing_package(suites):
    with pytest.raises(SuiteError, match=r"inspect_evals.*pip install inspect-evals.*hub"):
        build_task(suites.benchmarks["gsm8k"])


def _write(tmp_path, text):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    return path


def test_unknown_task_argument_is_refused(tmp_path, shared_data):
    path = _write(
        tmp_path,
        "benchmarks:\n  g:\n    task: mup/gsm8k_offline\n    category: math\n"
        "    args: {shots: 8}\nsuites:\n  s: [g]\n",
    )
    spec = load_suites(path).suite("s")[0]
    with pytest.raises(SuiteError, match=r"takes no arguments \['shots'\]"):
        build_task(spec)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("benchmarks:\n  g:\n    task: gsm8k\n    category: math\n", "task must be"),
        ("benchmarks:\n  g:\n    task: mup/mc_general\n", "'category' must be"),
        (
            "benchmarks:\n  g:\n    task: mup/mc_general\n    category: k\n    shots: 3\n",
            r"unknown fields \['shots'\]",
        ),
        (
            "benchmarks:\n  g:\n    task: mup/mc_general\n    category: k\n"
            "    generate: {max_token: 3}\n",
            r"generate fields \['max_token'\]",
        ),
    ],
)
def test_malformed_entries_name_the_entry(tmp_path, body, message):
    path = _write(tmp_path, body + "suites:\n  s: [g]\n")
    with pytest.raises(SuiteError, match=message) as info:
        load_suites(path)
    assert "benchmarks.g" in str(info.value)


def test_suite_with_unknown_benchmark(tmp_path):
    path = _write(
        tmp_path,
        "benchmarks:\n  g:\n    task: mup/mc_general\n    category: k\nsuites:\n  s: [g, nope]\n",
    )
    with pytest.raises(SuiteError, match=r"suites.s names unknown benchmarks \['nope'\]"):
        load_suites(path)
    assert (
        load_suites(
            _write(
                tmp_path,
                "benchmarks:\n  g:\n    task: mup/mc_general\n    category: k\nsuites:\n  s: [g]\n",
            )
        )
        .suite("g")[0]
        .name
        == "g"
    )


@pytest.mark.skipif(not HAVE_INSPECT_EVALS, reason="inspect_evals is not installed")
def test_reference_entries_name_inspect_evals_tasks(suites):
    # Most live in a module named otherwise (arc_easy in inspect_evals.arc, mmlu_0_shot in
    # inspect_evals.mmlu): found through inspect_evals' registry, without loading any data.
    for name in sorted(REFERENCE):
        spec = suites.benchmarks[name]
        fn = task_function(spec)
        assert fn.__name__ == spec.task.removeprefix("inspect_evals/"), name
        check_args(spec, fn)  # the config's arguments are the task's
