"""Aggregate inspect logs into a CSV (one row per benchmark x subset x metric x multiplier) and a
plot.

For each (benchmark entry, multiplier) the newest log with status "success" is used; error and
cancelled logs are ignored. Scores are read per sample, so each sample subset
(``metadata["subset"]``, e.g. XSTest safe / unsafe) gets its own row next to the whole task.

Metrics: a plain score value is the metric "accuracy". A dict-valued score (IFEval's
prompt/instruction strict/loose accuracies, the sycophancy sub-metrics, log-likelihood MC's
acc and acc_norm) gives one metric per key, each averaged on its own - never collapsed into one
number. A score whose metadata says whether the response refused (XSTest) adds the metric
"refusal_rate" for every subset (safe and unsafe prompts separately).

stderr is the standard error of the mean (sample std with ddof=1 over sqrt(n)); the 95%
interval is accuracy +- 1.96 stderr, clipped to [0, 1]. The column "accuracy" holds the
metric's mean whatever the metric.
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
    "metric",
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
    "chance",
)
Z95 = 1.959963984540054


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def sample_metrics(score, to_float) -> dict[str, float]:
    """A sample's score as {metric: value}: "accuracy" for a plain value, one entry per key of a
    dict value, plus "refusal_rate" when the score's metadata records a refusal."""
    value = score.value
    if isinstance(value, dict):
        out = {str(k): to_float(v) for k, v in value.items()}
    elif isinstance(value, list):
        raise ValueError(f"list-valued scores are not supported (got {value!r})")
    else:
        out = {"accuracy": to_float(value)}
    refused = (score.metadata or {}).get("refused")
    if isinstance(refused, bool):
        out["refusal_rate"] = float(refused)
    return out


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
        # metric -> subset -> values, and metric -> every value
        by_subset: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        everything: dict[str, list[float]] = defaultdict(list)
        subsets: set[str] = set()
        for sample in log.samples or []:
            if not sample.scores:
                raise ValueError(f"{path}: sample {sample.id} has no score")
            score = next(iter(sample.scores.values()))
            subset = str((sample.metadata or {}).get("subset", ""))
            subsets.add(subset)
            for metric, value in sample_metrics(score, to_float).items():
                everything[metric].append(value)
                by_subset[metric][subset].append(value)
        if not everything:
            continue
        n_choices = [len(s.choices or []) for s in log.samples or []]
        # Multiple choice: what picking uniformly at random scores (blank for other tasks).
        chance = sum(1 / n for n in n_choices) / len(n_choices) if min(n_choices) > 1 else None
        for metric in everything:
            groups: list[tuple[str, list[float]]] = []
            if len(subsets) > 1:
                groups.append((base_subset or "all", everything[metric]))
                groups += sorted(by_subset[metric].items())
            else:
                only = next(iter(subsets))
                groups.append((base_subset or only or "all", everything[metric]))
            for subset, values in groups:
                mean, se = _mean_stderr(values)
                rows.append(
                    {
                        "benchmark": benchmark,
                        "subset": subset,
                        "metric": metric,
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
                        "chance": chance if metric != "refusal_rate" else None,
                    }
                )
    rows.sort(
        key=lambda r: (r["category"], r["benchmark"], r["subset"], r["metric"], r["multiplier"])
    )
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    return path


def _chance(rows: list[dict[str, Any]]) -> float | None:
    values = {r.get("chance") for r in rows}
    return values.pop() if len(values) == 1 and None not in values else None


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
        mine = [r for r in rows if r["benchmark"] == bench]
        subsets = sorted({r["subset"] for r in mine})
        whole = min(subsets, key=lambda s: (s not in ("all", "main"), s))
        # Per-subset lines only where there are few (XSTest safe / unsafe); else the whole task.
        shown = subsets if len(subsets) <= 3 else [whole]
        lines = sorted({(r["subset"], r["metric"]) for r in mine if r["subset"] in shown})
        for subset, metric in lines:
            pts = sorted(
                (r for r in mine if r["subset"] == subset and r["metric"] == metric),
                key=lambda r: r["multiplier"],
            )
            x = [r["multiplier"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [
                [r["accuracy"] - r["ci95_low"] for r in pts],
                [r["ci95_high"] - r["accuracy"] for r in pts],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{subset} {metric}")
        if chance := _chance(mine):
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(bench)
        ax.set_xlabel("steering multiplier")
        ax.set_ylabel("score")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
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
