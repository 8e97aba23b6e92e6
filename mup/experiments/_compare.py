"""`mup probes compare`: every probe kind trained on the synthetic set, evaluated on the dev sets.

Axis letters: N records, P probe kinds, S evaluation sets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from mup._resolve import DEFAULT_MODEL
from mup.experiments._common import (
    ExtractOptions,
    config_layer,
    describe,
    extract_train_val_dev,
    find_training_and_dev,
    new_figure,
    progress_bar,
    save_figure,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """One `compare` run."""

    model: str = DEFAULT_MODEL  # model spec whose activations are probed
    layer: int | None = None  # None = configs/models/<model>.yaml
    out: str = "runs/compare"  # stores, results.jsonl, compare.md, compare.png
    data: str | None = None  # data root laid out like shared/data (default: mup.data search)
    kinds: tuple[str, ...] | None = None  # None = every kind in mup.probes.PROBE_KINDS
    max_tokens: int | None = 512  # longer chats keep their last max_tokens tokens
    limit: int | None = None  # records per data set (and per training split)
    train_limit: int | None = None  # training-split records, if not `limit` (a longer curve)
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareRow:
    """One probe kind evaluated on one data set."""

    kind: str
    dataset: str
    auroc: float
    tpr_at_fpr: float
    metrics: dict
    train_seconds: float


def compare(
    train,
    evals: dict,
    *,
    layer: int,
    val=None,
    kinds=None,
    seed: int = 0,
    model: str = "",
    results=None,
    progress: bool = True,
    overrides: dict | None = None,
) -> list[CompareRow]:
    """Train each probe kind on `train` and evaluate it on every set in `evals`.

    Args:
      train, val: activation stores (or `mup.probes.Activations`) for training and early stopping.
      evals: evaluation set name -> store / Activations, labelled.
      layer: the layer probes read.
      kinds: probe kinds (default: all of `mup.probes.PROBE_KINDS`).
      results: JSONL path; one `mup.probes.append_result` line per (kind, set) when given.
      overrides: per-kind hyperparameter overrides, kind -> dict (e.g. fewer epochs in tests).
    """
    from mup import probes

    kinds = tuple(probes.PROBE_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in probes.PROBE_KINDS]
    if unknown:
        raise ValueError(f"unknown probe kind(s) {unknown}; known: {', '.join(probes.PROBE_KINDS)}")
    if not evals:
        raise ValueError("compare: no evaluation sets")
    overrides = overrides or {}
    rows: list[CompareRow] = []
    with progress_bar(len(kinds), "compare: probes", progress) as bar:
        for kind in kinds:
            bar.set_postfix_str(kind)
            t0 = time.perf_counter()
            probe = probes.fit(
                kind, train, layer=layer, val=val, seed=seed, **overrides.get(kind, {})
            )
            seconds = time.perf_counter() - t0
            for name, data in evals.items():
                scores = probe.predict(data)
                labels = np.asarray(data.labels)
                metrics = _metrics(scores, labels)
                rows.append(
                    CompareRow(
                        kind=kind,
                        dataset=name,
                        auroc=float(metrics["auroc"]),
                        tpr_at_fpr=float(metrics["tpr_at_fpr"]),
                        metrics=metrics,
                        train_seconds=seconds,
                    )
                )
                if results is not None:
                    probes.append_result(
                        results,
                        probe=probe,
                        model=model,
                        layer=layer,
                        train=describe(train, "training"),
                        eval=describe(data, name),
                        metrics=metrics | {"train_seconds": seconds},
                        scores=scores,
                        labels=labels,
                        ids=getattr(data, "ids", None),
                    )
            bar.update(1)
    return rows


def _metrics(scores, labels) -> dict:
    from mup import metrics

    return metrics.evaluate(scores, labels)


def markdown_table(rows: list[CompareRow]) -> str:
    """AUROC and TPR@1%FPR per probe kind (rows) x data set (columns), plus their means."""
    kinds = list(dict.fromkeys(r.kind for r in rows))
    sets = list(dict.fromkeys(r.dataset for r in rows))
    cell = {(r.kind, r.dataset): r for r in rows}
    lines = []
    for title, attr in (("AUROC", "auroc"), ("TPR at 1% FPR", "tpr_at_fpr")):
        lines.append(f"**{title}**\n")
        lines.append("| probe | " + " | ".join(sets) + " | mean |")
        lines.append("|---" * (len(sets) + 2) + "|")
        for kind in sorted(kinds, key=lambda k: -_mean(cell, k, sets, attr)):
            values = [getattr(cell[kind, s], attr) for s in sets]
            lines.append(
                f"| {kind} | "
                + " | ".join(f"{v:.3f}" for v in values)
                + f" | **{float(np.mean(values)):.3f}** |"
            )
        lines.append("")
    return "\n".join(lines)


def _mean(cell, kind, sets, attr) -> float:
    return float(np.mean([getattr(cell[kind, s], attr) for s in sets]))


def plot_compare(rows: list[CompareRow], path) -> Path:
    """Grouped bars: AUROC (top) and TPR@1%FPR (bottom) per data set, one bar per probe kind."""
    kinds = list(dict.fromkeys(r.kind for r in rows))
    sets = list(dict.fromkeys(r.dataset for r in rows)) + ["mean"]
    cell = {(r.kind, r.dataset): r for r in rows}
    fig, axes = new_figure(2, 1, figsize=(max(9, 1.6 * len(sets) + 3), 8), sharex=True)
    width = 0.8 / len(kinds)
    x = np.arange(len(sets))  # [S]
    for ax, (title, attr) in zip(
        axes, (("AUROC", "auroc"), ("TPR at 1% FPR", "tpr_at_fpr")), strict=True
    ):
        for i, kind in enumerate(kinds):
            values = [getattr(cell[kind, s], attr) for s in sets[:-1]]
            values.append(float(np.mean(values)))
            ax.bar(x + (i - (len(kinds) - 1) / 2) * width, values, width, label=kind)
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        if attr == "auroc":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x, sets)
    # Outside the axes: with ten kinds a legend inside would hide bars.
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title("probes trained on the synthetic set, evaluated out of distribution")
    return save_figure(fig, path)


def run_compare(config: CompareConfig) -> tuple[list[CompareRow], dict]:
    """Extract, train, evaluate and write results.jsonl, compare.md and compare.png under out."""
    layer = config_layer(config)
    out = Path(config.out)
    options = ExtractOptions.of(config, out)
    training, dev = find_training_and_dev(config.data)
    train_limit = config.limit if config.train_limit is None else config.train_limit
    train_options = dataclasses.replace(options, limit=train_limit)
    train, val, evals = extract_train_val_dev(
        training, dev, layer=layer, options=options, train_options=train_options
    )
    results = out / "results.jsonl"
    rows = compare(
        train,
        evals,
        layer=layer,
        val=val,
        kinds=config.kinds,
        seed=config.seed,
        model=config.model,
        results=results,
        progress=config.progress,
    )
    table = markdown_table(rows)
    header = (
        f"# Probe comparison: {config.model}, layer {layer}\n\n"
        f"Training: {training.name} (train split, {train.n_records} records; test split "
        f"{val.n_records} records for early stopping). Evaluation: "
        + ", ".join(f"{k} ({v.n_records})" for k, v in evals.items())
        + f". max_tokens={config.max_tokens}, limit={config.limit}, train_limit={train_limit}, "
        f"seed={config.seed}.\n\n"
    )
    (out / "compare.md").write_text(header + table)
    plot_compare(rows, out / "compare.png")
    summary = {
        "layer": layer,
        "results": str(results),
        "table": str(out / "compare.md"),
        "plot": str(out / "compare.png"),
        "n_train": train.n_records,
        "n_val": val.n_records,
        "n_eval": {k: v.n_records for k, v in evals.items()},
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    return rows, summary | {"markdown": table}
