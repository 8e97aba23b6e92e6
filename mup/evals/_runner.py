"""Run a suite of benchmarks across steering multipliers with inspect-ai.

Layout: one inspect log per (benchmark, multiplier) under
``{log_dir}/{category}/multiplier_{m}/``. A (benchmark, multiplier) is skipped only when that
folder holds a log with status "success" whose run identity (benchmark entry, task arguments,
model, vector file hash, steered block, limit) matches the requested run; error and cancelled
logs are left in place and the run is repeated.

All pending multipliers of one benchmark go to ONE `inspect_ai.eval` call (tasks x models,
run concurrently), so the in-process `mup/...` provider batches the multipliers' samples
together into shared `generate` calls. Logs are written to a staging folder and moved into
place when the call returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mup._renamed import old_keywords
from mup.evals._errors import TaskUnavailable
from mup.evals._suite import BenchmarkSpec, build_task, load_suites

logger = logging.getLogger(__name__)

STAGING = ".staging"  # under log_dir; holds logs of a call until they are moved into place


@old_keywords(layer="block")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What `python -m mup.evals run` runs.

    model:       "mup/<spec>" (in-process steered model); ignored with `deployments`.
    vector/block: steering vector file and steered block (mup route only; ``layer=`` is the
                 old name of ``block=``).
    multipliers: strengths to evaluate (empty = 0 only); with `deployments`, a filter on the
                 file's lines (empty = every line).
    limit:       samples per task (None = all).
    deployments: deployments.jsonl for the OpenAI route.
    config:      benchmarks YAML (None = configs/benchmarks.yaml).
    """

    suite: str
    model: str | None = "mup/smollm2-135m"
    vector: str | None = None
    block: int | None = None
    multipliers: tuple[float, ...] = ()
    limit: int | None = None
    deployments: str | None = None
    log_dir: Path = Path("logs")
    config: Path | None = None
    dtype: str = "float32"
    max_batch: int = 16


@dataclasses.dataclass(frozen=True)
class _Target:
    multiplier: float
    identity: dict[str, Any]  # the model part of a run's identity
    make: Any  # () -> inspect Model


def multiplier_dir(log_dir: Path, category: str, multiplier: float) -> Path:
    return Path(log_dir) / category / f"multiplier_{float(multiplier)}"


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _targets(cfg: RunConfig) -> list[_Target]:
    from inspect_ai.model import get_model

    if cfg.deployments:
        from mup.evals._deployments import read_deployments

        deployments = read_deployments(cfg.deployments)
        if cfg.multipliers:
            wanted = {float(m) for m in cfg.multipliers}
            missing = sorted(wanted - {d.multiplier for d in deployments})
            if missing:
                raise ValueError(f"{cfg.deployments}: no deployment for multipliers {missing}")
            deployments = [d for d in deployments if d.multiplier in wanted]
        deployments = [d.resolved() for d in deployments]  # lines without a model ask the server
        return [
            _Target(
                multiplier=d.multiplier,
                identity={"model": d.model_string(), "url": d.url},
                make=d.inspect_model,
            )
            for d in deployments
        ]

    if not cfg.model:
        raise ValueError("give --model mup/SPEC or --deployments FILE")
    model = cfg.model if cfg.model.startswith("mup/") else f"mup/{cfg.model}"
    multipliers = cfg.multipliers or (0.0,)
    if cfg.vector is None and any(m != 0 for m in multipliers):
        raise ValueError("non-zero multipliers need a steering vector (--vector FILE)")
    if cfg.vector is not None:
        from mup.steering import load_vector

        # a missing or unreadable file fails here, before any model loads
        load_vector(cfg.vector, block=cfg.block)
    identity = {
        "model": model,
        "dtype": cfg.dtype,
        "vector_sha256": None if cfg.vector is None else _file_sha256(cfg.vector),
        # the steered block, under the key that logs written before the rename carry, so that
        # they still count as this run's
        "layer": cfg.block,
    }
    targets = []
    for m in multipliers:
        args: dict[str, Any] = {"multiplier": float(m), "dtype": cfg.dtype}
        args["max_batch"] = cfg.max_batch
        if cfg.vector is not None:
            args["vector"] = str(Path(cfg.vector).resolve())
        if cfg.block is not None:
            args["block"] = int(cfg.block)

        def make(args=args):
            return get_model(model, memoize=False, **args)

        targets.append(_Target(multiplier=float(m), identity=identity, make=make))
    return targets


def run_identity(spec: BenchmarkSpec, target_identity: dict, limit: int | None) -> dict:
    """What must match for an existing successful log to stand for a requested run."""
    return {
        "benchmark": spec.name,
        "task": spec.task,
        "args": spec.args,
        "generate": spec.generate,
        "limit": limit,
        **target_identity,
    }


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def find_successful_log(folder: Path, identity: dict) -> Path | None:
    """The newest log in `folder` with status "success" and this run identity, if any."""
    from inspect_ai.log import list_eval_logs, read_eval_log

    if not folder.is_dir():
        return None
    want = _json_roundtrip(identity)
    for info in list_eval_logs(str(folder), recursive=False):  # newest first
        try:
            header = read_eval_log(info.name, header_only=True)
        except Exception as error:  # a truncated file from a killed run: not a success
            logger.warning("unreadable log %s (%s); ignoring it", info.name, error)
            continue
        meta = (header.eval.metadata or {}).get("mup_run")
        if header.status == "success" and meta is not None and _json_roundtrip(meta) == want:
            return Path(info.name.removeprefix("file://"))
    return None


def log_multiplier(log) -> float | None:
    """The multiplier an inspect log was run at (mup model arg or steer_multiplier body)."""
    args = log.eval.model_args or {}
    if "multiplier" in args:
        return float(args["multiplier"])
    extra = getattr(log.eval.model_generate_config, "extra_body", None) or {}
    if "steer_multiplier" in extra:
        return float(extra["steer_multiplier"])
    return None


def run_suite(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run every (benchmark, multiplier) of the suite that lacks a successful log.

    Returns one record per (benchmark, multiplier): status "skipped" (with the existing log),
    or the new log's status and path.
    """
    from inspect_ai import eval as inspect_eval

    import mup.evals._provider  # noqa: F401 - registers the mup/ model provider

    suites = load_suites(cfg.config)
    specs = suites.suite(cfg.suite)
    # Build every task first: a suite that cannot run here fails before any model is loaded.
    # Entries that need what this machine lacks (inspect_evals, the hub) are skipped, saying why.
    tasks, unavailable = {}, {}
    for spec in specs:
        try:
            tasks[spec.name] = build_task(spec)
        except TaskUnavailable as error:
            unavailable[spec.name] = str(error)
            logger.warning("skipping %s: %s", spec.name, error)
    targets = _targets(cfg)
    log_dir = Path(cfg.log_dir)
    report: list[dict[str, Any]] = []
    models: dict[float, Any] = {}
    for spec in specs:
        if spec.name in unavailable:
            report.append(
                {"benchmark": spec.name, "status": "unavailable", "reason": unavailable[spec.name]}
            )
            continue
        pending: list[_Target] = []
        for target in targets:
            identity = run_identity(spec, target.identity, cfg.limit)
            folder = multiplier_dir(log_dir, spec.category, target.multiplier)
            existing = find_successful_log(folder, identity)
            if existing is not None:
                report.append(_record(spec, target.multiplier, "skipped", existing))
                logger.info(
                    "%s @ %s: successful log %s exists", spec.name, target.multiplier, existing
                )
            else:
                pending.append(target)
        if not pending:
            continue
        for target in pending:
            if target.multiplier not in models:
                models[target.multiplier] = target.make()
        staging = log_dir / STAGING / spec.name
        staging.mkdir(parents=True, exist_ok=True)
        identity = run_identity(spec, pending[0].identity, cfg.limit)
        logs = inspect_eval(
            tasks[spec.name],
            model=[models[t.multiplier] for t in pending],
            log_dir=str(staging),
            limit=cfg.limit,
            max_tasks=len(pending),
            display="none",
            metadata={
                "mup_run": identity,
                "mup_benchmark": spec.benchmark,
                "mup_subset": spec.subset,
                "mup_category": spec.category,
            },
        )
        for log in logs:
            m = log_multiplier(log)
            if m is None:
                raise RuntimeError(f"cannot tell the multiplier of log {log.location}")
            source = Path(str(log.location).removeprefix("file://"))
            folder = multiplier_dir(log_dir, spec.category, m)
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / source.name
            shutil.move(str(source), dest)
            report.append(_record(spec, m, log.status, dest, error=log.error))
        shutil.rmtree(staging, ignore_errors=True)
    if (log_dir / STAGING).is_dir() and not any((log_dir / STAGING).iterdir()):
        (log_dir / STAGING).rmdir()
    return report


def _record(spec: BenchmarkSpec, m: float, status: str, path: Path, error=None) -> dict:
    out = {"benchmark": spec.name, "multiplier": m, "status": status, "log": str(path)}
    if error is not None:
        out["error"] = getattr(error, "message", str(error))
    return out


def parse_multipliers(text: str) -> tuple[float, ...]:
    """ "-1.5,-1,0,1" -> (-1.5, -1.0, 0.0, 1.0); a clear error names a bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--multipliers: {part!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"--multipliers: {part!r} is not finite")
        out.append(value)
    if len(set(out)) != len(out):
        raise ValueError(f"--multipliers: repeated values in {text!r}")
    return tuple(out)
