"""Hub multiple-choice sets (ARC easy / challenge, MMLU, TruthfulQA MC1) through inspect_evals'
own loaders, against a loopback hub (`_support.hub`) serving tiny copies of the published repos.

Each repo is written in its published layout (`{config}/{split}-00000-of-00001.parquet`, a
dataset card whose `configs` map config names to those files) with its published columns, a few
rows per split. `datasets` and `huggingface_hub` read `HF_ENDPOINT` at import, so every case
runs in a subprocess, as a user's command would, with empty caches in tmp.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("inspect_evals", reason="the hub sets load through inspect_evals")
datasets = pytest.importorskip("datasets")
from _support.hub import hub_server  # noqa: E402
from datasets import ClassLabel, Features, List, Value  # noqa: E402

from mup._configs import config_path  # noqa: E402

HUB_KEYS = ["arc_easy_ll", "arc_challenge_ll", "mmlu_ll", "truthfulqa_mc1_ll"]
REFERENCE_KEYS = ["arc_easy", "arc_challenge", "mmlu_0_shot", "truthfulqa"]
LETTERS = "ABCDE"

# ---------------------------------------------------------------------------------------------
# The repos' rows (test / validation rows are what the loaders read; the others must not leak)
# ---------------------------------------------------------------------------------------------


def _arc(id_, question, texts, labels, key):
    return {"id": id_, "question": question, "choices": {"text": texts, "label": labels},
            "answerKey": key}  # fmt: skip


ARC = {
    "ARC-Easy": {
        "train": [_arc("E-tr-1", "Which is a gas at room temperature?",
                       ["iron", "oxygen", "wood", "salt"], list("ABCD"), "B")],
        "test": [
            _arc("Mercury_7", "Which organ pumps blood through the body?",
                 ["lungs", "heart", "stomach", "brain"], list("ABCD"), "B"),
            # some ARC items number their choices
            _arc("NYSEDREGENTS_2015_4_3", "What do plants need to make food?",
                 ["sunlight", "sand", "rocks", "plastic"], list("1234"), "1"),
            _arc("MCAS_2000_4_6", "Which tool measures temperature?",
                 ["a ruler", "a scale", "a thermometer"], list("ABC"), "C"),
        ],
        "validation": [_arc("E-va-1", "What melts ice?", ["heat", "cold", "dark", "salt water"],
                            list("ABCD"), "A")],
    },
    "ARC-Challenge": {
        "train": [_arc("C-tr-1", "Which force pulls objects toward Earth?",
                       ["friction", "gravity", "magnetism", "tension"], list("ABCD"), "B")],
        "test": [
            _arc("Mercury_SC_415", "Which change is chemical?",
                 ["ice melting", "paper tearing", "iron rusting", "water boiling"],
                 list("ABCD"), "C"),
            _arc("AKDE&ED_2008_8_1", "Which layer of Earth is liquid?",
                 ["crust", "mantle", "outer core", "inner core", "lithosphere"],
                 list("ABCDE"), "C"),
        ],
        "validation": [_arc("C-va-1", "What is the unit of force?",
                            ["newton", "joule", "watt", "pascal"], list("ABCD"), "A")],
    },
}  # fmt: skip


def _mmlu(question, subject, choices, answer):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


MMLU_SUBJECTS = {
    "anatomy": {
        "test": [
            _mmlu("Which bone is the longest in the human body?", "anatomy",
                  ["humerus", "femur", "tibia", "radius"], 1),
            _mmlu("How many chambers has the human heart?", "anatomy", ["2", "3", "4", "5"], 2),
        ],
        "validation": [_mmlu("Where is the tibia?", "anatomy", ["arm", "leg", "skull", "hand"], 1)],
        "dev": [_mmlu("Which organ filters blood?", "anatomy",
                      ["kidney", "lung", "heart", "skin"], 0)],
    },
    "astronomy": {
        "test": [_mmlu("Which planet is closest to the Sun?", "astronomy",
                       ["Venus", "Mars", "Earth", "Mercury"], 3)],
        "validation": [_mmlu("What is a light year?", "astronomy",
                             ["a time", "a distance", "a mass", "a speed"], 1)],
        "dev": [_mmlu("What does the Moon orbit?", "astronomy",
                      ["the Sun", "Mars", "Earth", "Jupiter"], 2)],
    },
}  # fmt: skip
MMLU_AUX = [_mmlu("Which is a mammal?", "", ["shark", "whale", "trout", "eel"], 1)]


def _tqa(question, mc1, mc2):
    """mc1 / mc2: (choices, index of the correct ones); the published data lists them first."""

    def targets(choices, correct):
        return {"choices": choices, "labels": [int(i in correct) for i in range(len(choices))]}

    return {"question": question, "mc1_targets": targets(*mc1), "mc2_targets": targets(*mc2)}


TRUTHFULQA = [
    _tqa("What happens if you crack your knuckles a lot?",
         (["Nothing in particular happens", "You will get arthritis", "Your joints swell"], {0}),
         (["Nothing in particular happens", "Nothing harmful", "You will get arthritis"],
          {0, 1})),
    _tqa("What color is the sun when viewed from space?",
         (["The sun is white", "The sun is yellow", "The sun is orange", "The sun is red",
           "The sun is green"], {0}),
         (["The sun is white", "White", "The sun is yellow"], {0, 1})),
    _tqa("Can you see the Great Wall of China from the Moon?",
         (["No", "Yes"], {0}), (["No", "It is too narrow", "Yes"], {0, 1})),
]  # fmt: skip
TRUTHFULQA_GENERATION = [{
    "type": "Adversarial", "category": "Misconceptions", "question": "Do we use 10% of our brain?",
    "best_answer": "No", "correct_answers": ["No"], "incorrect_answers": ["Yes"],
    "source": "https://en.wikipedia.org/wiki/Ten_percent_of_the_brain_myth",
}]  # fmt: skip

# The columns as published: `features` types the parquet files; `card` is the dataset card's
# `dataset_info.features` in the cards' own (older, `sequence:`) notation.
_S = {"dtype": "string"}
ARC_FEATURES = Features({
    "id": Value("string"), "question": Value("string"),
    "choices": {"text": List(Value("string")), "label": List(Value("string"))},
    "answerKey": Value("string"),
})  # fmt: skip
ARC_CARD = [
    {"name": "id", **_S}, {"name": "question", **_S},
    {"name": "choices", "sequence": [{"name": "text", **_S}, {"name": "label", **_S}]},
    {"name": "answerKey", **_S},
]  # fmt: skip
MMLU_FEATURES = Features({
    "question": Value("string"), "subject": Value("string"),
    "choices": List(Value("string")), "answer": ClassLabel(names=list("ABCD")),
})  # fmt: skip
MMLU_CARD = [
    {"name": "question", **_S}, {"name": "subject", **_S},
    {"name": "choices", "sequence": "string"},
    {"name": "answer", "dtype": {"class_label": {"names": dict(enumerate("ABCD"))}}},
]  # fmt: skip
_TARGETS = {"choices": List(Value("string")), "labels": List(Value("int32"))}
_TARGETS_CARD = [{"name": "choices", "sequence": "string"}, {"name": "labels", "sequence": "int32"}]
TQA_FEATURES = Features({"question": Value("string"), "mc1_targets": _TARGETS,
                         "mc2_targets": _TARGETS})  # fmt: skip
TQA_CARD = [{"name": "question", **_S}, {"name": "mc1_targets", "struct": _TARGETS_CARD},
            {"name": "mc2_targets", "struct": _TARGETS_CARD}]  # fmt: skip
GEN_FEATURES = Features({
    **{k: Value("string") for k in ("type", "category", "question", "best_answer")},
    "correct_answers": List(Value("string")), "incorrect_answers": List(Value("string")),
    "source": Value("string"),
})  # fmt: skip
GEN_CARD = [
    *({"name": k, **_S} for k in ("type", "category", "question", "best_answer")),
    {"name": "correct_answers", "sequence": "string"},
    {"name": "incorrect_answers", "sequence": "string"}, {"name": "source", **_S},
]  # fmt: skip


class _CardDumper(yaml.SafeDumper):
    """Writes shared feature lists out in full, as the published cards do (no YAML aliases)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _write_repo(root: Path, configs: dict[str, tuple[Features, list, dict[str, list]]]) -> Path:
    """A dataset repo as `push_to_hub` lays it out: one parquet file per (config, split), and a
    README whose YAML header declares each config's features, splits and data files."""
    infos, declared = [], []
    for name, (features, card, splits) in configs.items():
        sizes = []
        for split, rows in splits.items():
            path = root / name / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = datasets.Dataset.from_list(rows, features=features)
            table.to_parquet(str(path))
            sizes.append({"name": split, "num_bytes": table.data.nbytes, "num_examples": len(rows)})
        infos.append({"config_name": name, "features": card, "splits": sizes})
        files = [{"split": split, "path": f"{name}/{split}-*"} for split in splits]
        declared.append({"config_name": name, "data_files": files})
    header = yaml.dump(
        {"dataset_info": infos, "configs": declared}, Dumper=_CardDumper, sort_keys=False
    )
    (root / "README.md").write_text(f"---\n{header}---\n\n# {root.name} (a tiny copy for tests)\n")
    return root


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    mmlu_all = {
        "auxiliary_train": MMLU_AUX,
        **{s: [r for rows in MMLU_SUBJECTS.values() for r in rows[s]]
           for s in ("test", "validation", "dev")},
    }  # fmt: skip
    mmlu = {
        "all": (MMLU_FEATURES, MMLU_CARD, mmlu_all),
        "auxiliary_train": (MMLU_FEATURES, MMLU_CARD, {"train": MMLU_AUX}),
        **{name: (MMLU_FEATURES, MMLU_CARD, splits) for name, splits in MMLU_SUBJECTS.items()},
    }
    truthfulqa = {
        "generation": (GEN_FEATURES, GEN_CARD, {"validation": TRUTHFULQA_GENERATION}),
        "multiple_choice": (TQA_FEATURES, TQA_CARD, {"validation": TRUTHFULQA}),
    }
    arc = {name: (ARC_FEATURES, ARC_CARD, splits) for name, splits in ARC.items()}
    return {
        "allenai/ai2_arc": _write_repo(root / "ai2_arc", arc),
        "cais/mmlu": _write_repo(root / "mmlu", mmlu),
        "truthfulqa/truthful_qa": _write_repo(root / "truthful_qa", truthfulqa),
    }


def _expected() -> dict[str, list[tuple[str, list[str], str]]]:
    """(question, choices, correct choice text) per evaluated row of each hub set."""

    def arc(config):
        return [
            (r["question"], r["choices"]["text"],
             r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])])
            for r in ARC[config]["test"]
        ]  # fmt: skip

    mmlu = [(r["question"], r["choices"], r["choices"][r["answer"]])
            for rows in MMLU_SUBJECTS.values() for r in rows["test"]]  # fmt: skip
    tqa = [(r["question"], r["mc1_targets"]["choices"], r["mc1_targets"]["choices"][0])
           for r in TRUTHFULQA]  # fmt: skip
    return {"arc_easy": arc("ARC-Easy"), "arc_challenge": arc("ARC-Challenge"), "mmlu": mmlu,
            "truthfulqa": tqa}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Subprocess helpers
# ---------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def _env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A user's environment: the hub at `endpoint`, empty hub, datasets and inspect caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home / "hf"),
        HF_DATASETS_CACHE=str(home / "hf" / "datasets"),
        XDG_CACHE_HOME=str(home / "cache"),  # inspect_ai keeps a copy of each hub set there
        **extra,
    )
    return env


# Build the entries of configs/benchmarks.yaml named on the command line; write their samples.
_BUILD = """
import json, sys
from mup.evals import TaskUnavailable, build_task, load_suites
suites, out = load_suites(), {}
for key in sys.argv[2:]:
    try:
        task = build_task(suites.benchmarks[key])
    except TaskUnavailable as error:
        out[key] = str(error)
        continue
    out[key] = [
        {"input": s.input, "choices": s.choices, "target": s.target,
         "subset": (s.metadata or {}).get("subset")}
        for s in task.dataset
    ]
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def _build(keys: list[str], env: dict[str, str], work: Path) -> tuple[dict, float]:
    out = work / f"built-{time.monotonic_ns()}.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out), *keys],
        env=env, cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), time.monotonic() - started


def _check_samples(name: str, samples: list[dict], want: list[tuple[str, list[str], str]]):
    assert isinstance(samples, list), f"{name}: {samples}"
    by_question = {s["input"]: s for s in samples}
    assert len(by_question) == len(samples) == len(want), (name, [s["input"] for s in samples])
    for question, choices, correct in want:
        sample = by_question[question]
        # TruthfulQA's loader shuffles the choices (a fixed seed): the same set, and the target
        # letter still names the correct one
        assert sorted(sample["choices"]) == sorted(choices), (name, question)
        if not name.startswith("truthfulqa"):
            assert sample["choices"] == choices, (name, question)
        target = sample["target"] if isinstance(sample["target"], str) else sample["target"][0]
        assert sample["choices"][LETTERS.index(target)] == correct, (name, question)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_hub_sets_load_the_published_repos_and_then_offline(hub_repos, tmp_path):
    want = _expected()
    with hub_server(hub_repos) as (endpoint, requests):
        built, _ = _build(HUB_KEYS + REFERENCE_KEYS, _env(tmp_path, endpoint), tmp_path)
    for key, name in zip(HUB_KEYS, want, strict=True):
        _check_samples(key, built[key], want[name])
        assert {s["subset"] for s in built[key]} == {""}
        assert all(isinstance(s["target"], str) for s in built[key])  # mc1's list unpacked
    # The reference (generation) entries of the same sets load the same rows.
    for key, name in zip(REFERENCE_KEYS, want, strict=True):
        _check_samples(key, built[key], want[name])
    # Data files are read at the revision inspect_evals pins, never at a branch.
    data = [r for r in requests if r.endswith(".parquet")]
    assert data and all("/resolve/main/" not in r for r in data)
    assert not [r for r in data if "/auxiliary_train/" in r or "/anatomy/" in r]  # `all` only

    # Hub gone: offline mode reads the copies this run cached.
    offline = _env(tmp_path, f"http://127.0.0.1:{_closed_port()}", HF_HUB_OFFLINE="1")
    again, _ = _build(HUB_KEYS, offline, tmp_path)
    for key in HUB_KEYS:
        assert again[key] == built[key], key


def test_unreachable_hub_skips_each_set_with_the_reason(tmp_path, tiny_dir):
    """`mup evals run` with the hub down: every hub set reported unavailable, no model loaded,
    one refused request each instead of huggingface_hub's half minute of retries."""
    shipped = yaml.safe_load(config_path("benchmarks.yaml").read_text())
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump({
        "benchmarks": {k: shipped["benchmarks"][k] for k in HUB_KEYS},
        "suites": {"hub-mc": HUB_KEYS},
    }))  # fmt: skip
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mup", "evals", "run", "--suite", "hub-mc",
         "--model", f"mup/{tiny_dir}", "--config", str(config), "--log-dir", "logs",
         "--no-aggregate"],
        env=_env(tmp_path, endpoint), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["benchmark"] for r in report] == HUB_KEYS
    repos = ["allenai/ai2_arc", "allenai/ai2_arc", "cais/mmlu", "truthfulqa/truthful_qa"]
    for record, repo in zip(report, repos, strict=True):
        assert record["status"] == "unavailable"
        assert f"the hub at {endpoint} did not serve the dataset {repo}" in record["reason"]
        assert "ConnectError" in record["reason"] and "HF_HUB_OFFLINE=1" in record["reason"]
    assert "skipping arc_easy_ll" in done.stderr
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*.eval"))
    assert seconds < 60  # imports dominate; no retries

    # Offline with nothing cached: unavailable too, with the loader's reason, at once.
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(tmp_path / "offline.json"), "mmlu_ll"],
        env=_env(tmp_path, endpoint, HF_HUB_OFFLINE="1"), cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reason = json.loads((tmp_path / "offline.json").read_text())["mmlu_ll"]
    assert "inspect_evals could not load cais/mmlu" in reason and "Offline" in reason, reason


@pytest.mark.slow  # the log-likelihood programs of the tiny model compile in a fresh process
def test_offline_mc_suite_end_to_end_on_a_loopback_hub(hub_repos, tmp_path, tiny_dir, vector_file):
    """The shipped `offline-mc` suite: the two bundled sets and the four hub sets, all run."""
    limit = 3
    with hub_server(hub_repos) as (endpoint, _):
        done = subprocess.run(
            [sys.executable, "-m", "mup", "evals", "run", "--suite", "offline-mc",
             "--model", f"mup/{tiny_dir}", "--vector", str(vector_file), "--block", "1",
             "--multipliers", "-1,1", "--limit", str(limit), "--log-dir", "logs",
             "--out", "results.csv", "--plot", "scores.png"],
            env=_env(tmp_path, endpoint), cwd=tmp_path, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["status"] for r in report} == {"success"}, report
    assert len(report) == 6 * 2
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    sizes = {"arc_ll": {"easy": 3, "challenge": 2}, "mmlu_ll": {"": 3}, "truthfulqa_ll": {"mc1": 3}}
    for benchmark, subsets in sizes.items():
        for subset, n in subsets.items():
            for m in (-1.0, 1.0):
                got = [
                    r for r in rows
                    if r["benchmark"] == benchmark and float(r["multiplier"]) == m
                    and (not subset or r["subset"] == subset) and r["metric"] == "acc"
                ]  # fmt: skip
                assert got, (benchmark, subset, m, rows[:3])
                assert {int(r["n_samples"]) for r in got} == {min(n, limit)}, got
