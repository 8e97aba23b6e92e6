"""Aggregate inspect logs into a CSV (one row per benchmark x subset x multiplier) and a plot.

For each (benchmark entry, multiplier) the newest log with status "success" is used; error and
cancelled logs are ignored. Scores are read per sample, so each sample subset
(``metadata["subset"]``, e.g. XSTest safe / unsafe) gets its own row next to the whole task.
stderr is the standard error of the mean (sample std with ddof=1 over sqrt(n)); the 95%
interval is accuracy +- 1.96 stderr, clipped to [0, 1].
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = (
    "benchmark",
    "subset",
    "multiplier",
    "category",
    "n_samples",
    "accuracy",
    "stderr",
    "ci95_low",
    "ci95_high",
    "task",
    "model",
    "log",
)
Z95 = 1.959963984540054


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _multiplier_from_folder(path: Path) -> float | None:
    name = path.parent.name
    if name.startswith("multiplier_"):
        try:
            return float(name.removeprefix("multiplier_"))
        except ValueError:
            return None
    return None


def collect(log_dir: str | Path) -> list[dict[str, Any]]:
    """CSV rows from every successful log under log_dir (newest per benchmark x multiplier)."""
    from inspect_ai.log import list_eval_logs, read_eval_log
    from inspect_ai.scorer import value_to_float

    from mup.evals._runner import STAGING, log_multiplier

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"log directory {log_dir} does not exist")
    newest: dict[tuple[str, float], tuple[str, Path, Any]] = {}
    for info in list_eval_logs(str(log_dir), recursive=True):
        path = Path(info.name.removeprefix("file://"))
        if STAGING in path.relative_to(log_dir.resolve()).parts[:1]:
            continue
        try:
            header = read_eval_log(str(path), header_only=True)
        except Exception:  # a truncated log of a killed run is not a result
            continue
        if header.status != "success":
            continue
        m = log_multiplier(header)
        m = _multiplier_from_folder(path) if m is None else m
        if m is None:
            raise ValueError(f"{path}: cannot tell its multiplier (no model arg, no folder)")
        meta = header.eval.metadata or {}
        key = (meta.get("mup_run", {}).get("benchmark") or header.eval.task, m)
        created = header.eval.created
        if key not in newest or created > newest[key][0]:
            newest[key] = (created, path, header)

    to_float = value_to_float()
    rows: list[dict[str, Any]] = []
    for (_, m), (_, path, header) in sorted(newest.items()):
        log = read_eval_log(str(path))
        meta = header.eval.metadata or {}
        benchmark = meta.get("mup_benchmark") or header.eval.task.split("/")[-1]
        base_subset = meta.get("mup_subset") or ""
        category = meta.get("mup_category") or path.parent.parent.name
        by_subset: dict[str, list[float]] = defaultdict(list)
        everything: list[float] = []
        for sample in log.samples or []:
            if not sample.scores:
                raise ValueError(f"{path}: sample {sample.id} has no score")
            score = next(iter(sample.scores.values()))
            value = to_float(score.value)
            everything.append(value)
            by_subset[str((sample.metadata or {}).get("subset", ""))].append(value)
        if not everything:
            continue
        groups: list[tuple[str, list[float]]] = []
        if len(by_subset) > 1:
            groups.append((base_subset or "all", everything))
            groups += [(s, v) for s, v in sorted(by_subset.items())]
        else:
            only = next(iter(by_subset))
            groups.append((base_subset or only or "all", everything))
        for subset, values in groups:
            mean, se = _mean_stderr(values)
            rows.append(
                {
                    "benchmark": benchmark,
                    "subset": subset,
                    "multiplier": m,
                    "category": category,
                    "n_samples": len(values),
                    "accuracy": mean,
                    "stderr": se,
                    "ci95_low": max(0.0, mean - Z95 * se),
                    "ci95_high": min(1.0, mean + Z95 * se),
                    "task": header.eval.task,
                    "model": header.eval.model,
                    "log": str(path),
                }
            )
    rows.sort(key=lambda r: (r["category"], r["benchmark"], r["subset"], r["multiplier"]))
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    return path


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Score vs multiplier, one panel per benchmark, one line per subset, 95% CI bars."""
    from mup._plots import new_figure, save_figure

    if not rows:
        raise ValueError("no results to plot (no successful logs found)")
    benchmarks = sorted({r["benchmark"] for r in rows})
    cols = min(3, len(benchmarks))
    nrows = math.ceil(len(benchmarks) / cols)
    fig, axes = new_figure(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, bench in zip(axes.flat, benchmarks, strict=False):
        subsets = sorted({r["subset"] for r in rows if r["benchmark"] == bench})
        for subset in subsets:
            pts = sorted(
                (r for r in rows if r["benchmark"] == bench and r["subset"] == subset),
                key=lambda r: r["multiplier"],
            )
            x = [r["multiplier"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [
                [r["accuracy"] - r["ci95_low"] for r in pts],
                [r["ci95_high"] - r["accuracy"] for r in pts],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=subset)
        ax.set_title(bench)
        ax.set_xlabel("steering multiplier")
        ax.set_ylabel("score")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if len(subsets) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(benchmarks) :]:
        ax.set_visible(False)
    fig.suptitle("capability vs steering multiplier (95% CI)")
    return save_figure(fig, path)


def aggregate(log_dir: str | Path, out: str | Path, plot_path: str | Path | None = None):
    """collect + write_csv (+ plot). Returns the rows."""
    rows = collect(log_dir)
    if not rows:
        raise ValueError(f"no successful inspect logs under {log_dir}")
    write_csv(rows, out)
    if plot_path is not None:
        plot(rows, plot_path)
    return rows
