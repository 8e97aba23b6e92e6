"""Benchmark suites from configs/benchmarks.yaml: parse, validate, and build inspect Tasks.

Every task argument and generate setting in the config is checked against the task function's
signature and inspect's GenerateConfig fields, so a shot count or a token budget is either
applied or refused - never silently dropped.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect as pyinspect
import re
from pathlib import Path
from typing import Any

import yaml
from inspect_ai.model import GenerateConfig

from mup.evals._errors import SuiteError

CONFIG_NAME = "benchmarks.yaml"
_KEY = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_ENTRY_FIELDS = {"task", "category", "benchmark", "subset", "args", "generate"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    """One config entry: a task, its arguments, and where its logs and CSV rows go.

    name:      the entry's key (unique; names the (task, multiplier) runs).
    task:      "inspect_evals/<function>" or "mup/<offline task>".
    category:  log folder level and CSV column.
    benchmark: CSV benchmark name; subset: CSV subset name ("" when the task has one).
    args:      task function keyword arguments.
    generate:  GenerateConfig fields applied over the task's own config.
    """

    name: str
    task: str
    category: str
    benchmark: str
    subset: str = ""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    generate: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    benchmarks: dict[str, BenchmarkSpec]
    suites: dict[str, tuple[str, ...]]

    def suite(self, name: str) -> list[BenchmarkSpec]:
        """The entries of a suite, or of one benchmark key given instead of a suite name."""
        if name in self.suites:
            return [self.benchmarks[key] for key in self.suites[name]]
        if name in self.benchmarks:
            return [self.benchmarks[name]]
        raise SuiteError(
            f"unknown suite {name!r}; suites: {', '.join(self.suites)}; "
            f"benchmarks: {', '.join(self.benchmarks)}"
        )


def default_config_path() -> Path:
    from mup._configs import config_path

    return config_path(CONFIG_NAME)


def load_suites(path: str | Path | None = None) -> SuiteConfig:
    """Parse and validate a benchmarks config (default: configs/benchmarks.yaml)."""
    path = Path(path) if path is not None else default_config_path()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SuiteError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict) or set(data) != {"benchmarks", "suites"}:
        raise SuiteError(f"{path}: expected exactly the top-level keys 'benchmarks' and 'suites'")
    raw = data["benchmarks"]
    if not isinstance(raw, dict) or not raw:
        raise SuiteError(f"{path}: 'benchmarks' must be a non-empty mapping")
    gen_fields = set(GenerateConfig.model_fields)
    benchmarks: dict[str, BenchmarkSpec] = {}
    for key, entry in raw.items():
        where = f"{path}: benchmarks.{key}"
        if not isinstance(key, str) or not _KEY.match(key):
            raise SuiteError(f"{where}: keys are lower-case letters, digits, '_' and '-'")
        if not isinstance(entry, dict):
            raise SuiteError(f"{where}: expected a mapping, got {type(entry).__name__}")
        if unknown := sorted(set(entry) - _ENTRY_FIELDS):
            raise SuiteError(f"{where}: unknown fields {unknown}; known: {sorted(_ENTRY_FIELDS)}")
        for field in ("task", "category"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise SuiteError(f"{where}: '{field}' must be a non-empty string")
        task = entry["task"]
        if not task.startswith(("inspect_evals/", "mup/")):
            raise SuiteError(
                f"{where}: task must be 'inspect_evals/NAME' or 'mup/NAME', got {task!r}"
            )
        if not _KEY.match(entry["category"]):
            raise SuiteError(f"{where}: category {entry['category']!r} is not a folder-safe name")
        args = entry.get("args") or {}
        generate = entry.get("generate") or {}
        for field, value in (("args", args), ("generate", generate)):
            if not isinstance(value, dict):
                raise SuiteError(f"{where}: '{field}' must be a mapping")
        if bad := sorted(set(generate) - gen_fields):
            raise SuiteError(
                f"{where}: generate fields {bad} are not inspect GenerateConfig fields"
            )
        try:
            GenerateConfig(**generate)
        except Exception as error:  # pydantic ValidationError: say which entry
            raise SuiteError(f"{where}: bad generate settings: {error}") from None
        benchmarks[key] = BenchmarkSpec(
            name=key,
            task=task,
            category=entry["category"],
            benchmark=str(entry.get("benchmark") or key),
            subset=str(entry.get("subset") or ""),
            args=dict(args),
            generate=dict(generate),
        )
    suites_raw = data["suites"]
    if not isinstance(suites_raw, dict) or not suites_raw:
        raise SuiteError(f"{path}: 'suites' must be a non-empty mapping of name -> [benchmark]")
    suites: dict[str, tuple[str, ...]] = {}
    for name, keys in suites_raw.items():
        if not isinstance(keys, list) or not keys:
            raise SuiteError(f"{path}: suites.{name} must be a non-empty list of benchmark keys")
        if missing := [k for k in keys if k not in benchmarks]:
            raise SuiteError(f"{path}: suites.{name} names unknown benchmarks {missing}")
        suites[name] = tuple(keys)
    return SuiteConfig(benchmarks=benchmarks, suites=suites)


def task_function(spec: BenchmarkSpec):
    """The task function an entry names (imports inspect_evals for the reference tasks)."""
    source, _, name = spec.task.partition("/")
    if source == "mup":
        from mup.evals._tasks import OFFLINE_TASKS

        if name not in OFFLINE_TASKS:
            raise SuiteError(
                f"benchmark {spec.name!r}: unknown offline task {name!r}; "
                f"known: {', '.join(OFFLINE_TASKS)}"
            )
        return OFFLINE_TASKS[name]
    try:
        module = importlib.import_module("inspect_evals")
    except ImportError:
        raise SuiteError(
            f"benchmark {spec.name!r} ({spec.task}) needs the package 'inspect_evals' "
            "(pip install inspect-evals) and access to the Hugging Face hub for its data set; "
            "use --suite offline on machines without them"
        ) from None
    try:
        return getattr(importlib.import_module(f"inspect_evals.{name}"), name)
    except (ImportError, AttributeError):
        pass
    # Most tasks live in a module named otherwise (arc_easy in inspect_evals.arc): the module
    # that inspect_evals registers with inspect_ai as its entry point imports them all.
    entry = importlib.metadata.entry_points(group="inspect_ai", name="inspect_evals")
    registry = next(iter(entry)).load() if entry else module
    fn = getattr(registry, name, None)
    if fn is None:
        raise SuiteError(f"benchmark {spec.name!r}: inspect_evals has no task {name!r}")
    return fn


def check_args(spec: BenchmarkSpec, fn) -> None:
    """Refuse config arguments that the task function does not take."""
    params = pyinspect.signature(fn).parameters
    if any(p.kind is pyinspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    if unknown := sorted(set(spec.args) - set(params)):
        raise SuiteError(
            f"benchmark {spec.name!r}: task {spec.task} takes no arguments {unknown} "
            f"(it takes {sorted(params)}); fix configs/{CONFIG_NAME}"
        )


def build_task(spec: BenchmarkSpec):
    """An inspect Task for an entry, with its args applied and its generate settings merged."""
    fn = task_function(spec)
    check_args(spec, fn)
    task = fn(**spec.args)
    if spec.generate:
        task.config = task.config.merge(GenerateConfig(**spec.generate))
    return task
