"""Figure 1 and friends from score files and cascade results (`mup probes figure`).

  * ``figure1.png``: mean AUROC over the evaluation sets against mean FLOPs per record (log x):
    every monitor a point, coloured and shaped by its kind (the part of ``monitor`` before
    ':': probe, prompted, finetuned, ...), every cascade a line over its fractions;
  * ``auroc_per_dataset.png``: AUROC of every monitor per data set, grouped bars;
  * ``roc_curves.png``: one panel of ROC curves per data set;
  * ``metrics.json`` and ``metrics.md``: monitor x data set AUROC and TPR at 1% FPR, their
    means and the mean FLOPs per record, the markdown ready to paste into a README.

Means are over the data sets that every monitor and cascade covers, so that two points on
Figure 1 average the same sets; the others still get their bars, curves and table cells.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mup import metrics
from mup.monitors._cascade import _FPR, check_two_classes, read_cascade
from mup.monitors._scores import Scores, read_scores

__all__ = [
    "cascade_means",
    "common_datasets",
    "figure_main",
    "make_figures",
    "markdown_table",
    "metrics_table",
    "plot_tradeoff",
]

# Colour and marker per monitor kind; kinds not listed share the last style.
KIND_STYLES: dict[str, tuple[str, str]] = {
    "probe": ("tab:blue", "o"),
    "prompted": ("tab:orange", "s"),
    "finetuned": ("tab:green", "^"),
    "cascade": ("tab:purple", "D"),
}
_OTHER_STYLE = ("tab:gray", "X")
KIND_ORDER = tuple(KIND_STYLES)


def kind_of(monitor: str) -> str:
    return monitor.partition(":")[0]


def _kind_rank(monitor: str) -> int:
    kind = kind_of(monitor)
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def common_datasets(coverage: Mapping[str, Iterable[str]]) -> list[str]:
    """The data sets every entry of `coverage` (name -> its data sets) has, in order of first
    appearance; a `ValueError` listing who covers what when there is none."""
    coverage = {name: list(sets) for name, sets in coverage.items()}
    ordered = list(dict.fromkeys(d for sets in coverage.values() for d in sets))
    common = [d for d in ordered if all(d in sets for sets in coverage.values())]
    if not common:
        lines = "; ".join(f"{name}: {', '.join(sets)}" for name, sets in coverage.items())
        raise ValueError(
            "no data set is covered by every monitor and cascade, so no mean over data sets "
            f"compares them ({lines}); pass score files scored on the same sets"
        )
    return common


def _monitor_parts(scores: Scores) -> dict[str, dict[str, Scores]]:
    return {
        m: {d: scores.select(monitor=m, dataset=d) for d in scores.select(monitor=m).datasets}
        for m in scores.monitors
    }


def metrics_table(scores: Scores, *, mean_over: Sequence[str] | None = None) -> dict[str, Any]:
    """Per monitor and data set: AUROC, TPR at 1% FPR, mean FLOPs per record, records; and per
    monitor the unweighted means over `mean_over` (default: the data sets every monitor has).

    Returns ``{"datasets": [...], "mean_over": [...], "monitors": {monitor: {"kind": ...,
    "datasets": {dataset: {...}}, "mean": {...}}}}``, monitors ordered by kind then FLOPs."""
    parts = _monitor_parts(scores)
    for monitor in parts:
        check_two_classes(scores.select(monitor=monitor), f"monitor {monitor!r}")
    if mean_over is None:
        mean_over = common_datasets({m: list(p) for m, p in parts.items()})
    missing = {m: [d for d in mean_over if d not in p] for m, p in parts.items()}
    missing = {m: ds for m, ds in missing.items() if ds}
    if missing:
        raise ValueError(f"monitors lack data sets the mean is over: {missing}")
    monitors: dict[str, Any] = {}
    for monitor, by_set in parts.items():
        per_set = {}
        for dataset, part in by_set.items():
            result = metrics.evaluate(part.scores, part.labels, fpr=_FPR)
            per_set[dataset] = {
                "auroc": result["auroc"],
                "tpr_at_1pct_fpr": result["tpr_at_fpr"],
                "mean_flops": float(part.flops.mean()),
                "n": result["n"],
                "n_invalid": int((~part.valid).sum()),
            }
        mean = {
            key: float(np.mean([per_set[d][key] for d in mean_over]))
            for key in ("auroc", "tpr_at_1pct_fpr", "mean_flops")
        }
        monitors[monitor] = {"kind": kind_of(monitor), "datasets": per_set, "mean": mean}
    order = sorted(monitors, key=lambda m: (_kind_rank(m), monitors[m]["mean"]["mean_flops"], m))
    return {
        "datasets": list(scores.datasets),
        "mean_over": list(mean_over),
        "monitors": {m: monitors[m] for m in order},
    }


def cascade_means(
    rows: Iterable[Mapping[str, Any]], datasets: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per cascade, arrays over its fractions (ascending) of the unweighted means over
    `datasets` of AUROC, TPR at 1% FPR and mean FLOPs, from the per-data-set rows of
    `cascade_curve` (not its "mean" rows, which average the cascade's own sets)."""
    table: dict[str, dict[float, dict[str, Mapping[str, Any]]]] = {}
    for row in rows:
        if row["dataset"] == "mean":
            continue
        cell = table.setdefault(row["cascade"], {}).setdefault(float(row["fraction"]), {})
        if row["dataset"] in cell:
            raise ValueError(
                f"cascade {row['cascade']!r} has two rows for data set {row['dataset']!r} at "
                f"fraction {row['fraction']}; pass each cascade file once"
            )
        cell[row["dataset"]] = row
    out = {}
    for name, by_fraction in table.items():
        fractions = sorted(by_fraction)
        lacking = sorted({d for f in fractions for d in datasets if d not in by_fraction[f]})
        if lacking:
            raise ValueError(f"cascade {name!r} has no rows for data sets {lacking}")
        line = {"fraction": np.array(fractions)}
        for key in ("auroc", "tpr_at_1pct_fpr", "mean_flops"):
            line[key] = np.array(
                [np.mean([by_fraction[f][d][key] for d in datasets]) for f in fractions]
            )
        out[name] = line
    return out


def _style(monitor: str) -> tuple[str, str]:
    return KIND_STYLES.get(kind_of(monitor), _OTHER_STYLE)


def plot_tradeoff(
    ax,
    points: Mapping[str, tuple[float, float]],
    lines: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[str]:
    """AUROC against FLOPs per record on a log x axis: `points` (monitor -> (flops, auroc)),
    coloured and shaped by kind, and `lines` (cascade -> `cascade_means` arrays). Returns the
    monitors left off because a log axis cannot place zero FLOPs."""
    import matplotlib.lines as mlines

    skipped = []
    kinds_seen: dict[str, tuple[str, str]] = {}
    for monitor, (flops, auroc) in points.items():
        if not flops > 0:
            skipped.append(monitor)
            continue
        colour, marker = _style(monitor)
        kinds_seen.setdefault(kind_of(monitor), (colour, marker))
        ax.scatter([flops], [auroc], color=colour, marker=marker, s=40, zorder=3)
        detail = monitor.partition(":")[2] or monitor
        ax.annotate(detail, (flops, auroc), xytext=(4, 3), textcoords="offset points", fontsize=7)
    handles = [
        mlines.Line2D([], [], color=c, marker=m, linestyle="", label=k)
        for k, (c, m) in kinds_seen.items()
    ]
    palette = ["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black"]
    for i, (name, line) in enumerate((lines or {}).items()):
        keep = line["mean_flops"] > 0
        (handle,) = ax.plot(
            line["mean_flops"][keep],
            line["auroc"][keep],
            "-",
            marker=".",
            color=palette[i % len(palette)],
            label=name,
            zorder=2,
        )
        handles.append(handle)
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per record (log scale)")
    ax.set_ylabel("mean AUROC")
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    return skipped


def _monitor_colours(monitors: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    # tab10's colours are the most distinct; tab20 (light/dark pairs) only when they run out.
    name, size = ("tab10", 10) if len(monitors) <= 10 else ("tab20", 20)
    cmap = matplotlib.colormaps[name]
    return {m: cmap(i % size) for i, m in enumerate(monitors)}


def plot_per_dataset(table: Mapping[str, Any], ax) -> None:
    """Grouped bars: one group per data set plus the mean, one bar per monitor."""
    monitors = list(table["monitors"])
    groups = [*table["datasets"], "mean"]
    colours = _monitor_colours(monitors)
    width = 0.8 / max(len(monitors), 1)
    lowest = 1.0
    for j, monitor in enumerate(monitors):
        entry = table["monitors"][monitor]
        xs, ys = [], []
        for i, group in enumerate(groups):
            cell = entry["mean"] if group == "mean" else entry["datasets"].get(group)
            if cell is not None:  # a monitor not scored on a set gets no bar there
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(cell["auroc"])
        lowest = min([lowest, *ys])
        ax.bar(xs, ys, width=width, color=colours[monitor], label=monitor)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    # AUROCs crowd near the top; starting the axis a little below the lowest bar shows the gaps.
    ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 10) / 10), 1.0)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("AUROC")
    ax.set_title(f"AUROC per data set (mean over {', '.join(table['mean_over'])})", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")


def plot_roc_curves(scores: Scores, table: Mapping[str, Any], axes) -> None:
    """One panel per data set, one ROC curve (labelled records only) per monitor."""
    colours = _monitor_colours(list(table["monitors"]))
    for ax, dataset in zip(axes, table["datasets"], strict=False):
        for monitor, entry in table["monitors"].items():
            if dataset not in entry["datasets"]:
                continue
            part = scores.select(monitor=monitor, dataset=dataset)
            keep = part.labels != -1
            fpr, tpr, _ = metrics.roc_curve(part.scores[keep], part.labels[keep])
            auroc = entry["datasets"][dataset]["auroc"]
            ax.plot(fpr, tpr, color=colours[monitor], label=f"{monitor} ({auroc:.3f})")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=6, loc="lower right")


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(table: Mapping[str, Any]) -> str:
    """AUROC and TPR at 1% FPR, monitor x data set, with means and mean FLOPs per record."""
    datasets = table["datasets"]
    over = ", ".join(table["mean_over"])
    out = []
    for key, title in (("auroc", "AUROC"), ("tpr_at_1pct_fpr", "TPR at 1% FPR")):
        head = ["monitor", *datasets, f"mean ({over})"]
        if key == "auroc":
            head.append("mean FLOPs / record")
        out += [f"### {title}", "", "| " + " | ".join(head) + " |"]
        out.append("|" + "---|" + "---:|" * (len(head) - 1))
        for monitor, entry in table["monitors"].items():
            cells = [f"`{monitor}`"]
            cells += [_fmt(entry["datasets"].get(d, {}).get(key)) for d in datasets]
            cells.append(_fmt(entry["mean"][key]))
            if key == "auroc":
                cells.append(_fmt(entry["mean"]["mean_flops"], ".3g"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def make_figures(
    scores: Scores,
    cascade_rows: Sequence[Mapping[str, Any]] = (),
    out: str | Path = "runs/figures",
) -> dict[str, Any]:
    """Write the three figures and the metrics table to `out`; return their paths, the table
    and notes (data sets left out of the means, monitors left off the log axis)."""
    from mup._plots import new_figure, save_figure

    out = Path(out)
    cascade_sets: dict[str, list[str]] = {}
    for row in cascade_rows:
        if row["dataset"] != "mean":
            cascade_sets.setdefault(f"cascade {row['cascade']}", []).append(row["dataset"])
    monitor_sets = {m: list(scores.select(monitor=m).datasets) for m in scores.monitors}
    # Everything is checked before the first figure is drawn.
    mean_over = common_datasets({**monitor_sets, **cascade_sets})
    table = metrics_table(scores, mean_over=mean_over)
    lines = cascade_means(cascade_rows, mean_over)
    notes = []
    left_out = [d for d in dict.fromkeys([*scores.datasets]) if d not in mean_over]
    if left_out:
        notes.append(f"data sets not in every monitor and cascade, left out of means: {left_out}")

    fig, ax = new_figure(figsize=(8, 5.5))
    points = {
        m: (e["mean"]["mean_flops"], e["mean"]["auroc"]) for m, e in table["monitors"].items()
    }
    skipped = plot_tradeoff(ax, points, lines)
    if skipped:
        notes.append(f"monitors with zero FLOPs, left off the log axis of figure 1: {skipped}")
    ax.set_title(f"AUROC vs compute (mean over {', '.join(mean_over)})", fontsize=9)
    paths = {"figure1": save_figure(fig, out / "figure1.png")}

    n_groups = len(table["datasets"]) + 1
    fig, ax = new_figure(figsize=(max(6.0, 0.3 * n_groups * len(table["monitors"]) + 2), 4.5))
    plot_per_dataset(table, ax)
    paths["per_dataset"] = save_figure(fig, out / "auroc_per_dataset.png")

    n = len(table["datasets"])
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.ravel())
    plot_roc_curves(scores, table, flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    paths["roc"] = save_figure(fig, out / "roc_curves.png")

    markdown = markdown_table(table)
    paths["metrics_md"] = out / "metrics.md"
    paths["metrics_md"].write_text(markdown + "\n", encoding="utf-8")
    paths["metrics_json"] = out / "metrics.json"
    cascades_json = {name: {k: v.tolist() for k, v in line.items()} for name, line in lines.items()}
    paths["metrics_json"].write_text(
        json.dumps({**table, "cascades": cascades_json}, indent=1) + "\n", encoding="utf-8"
    )
    return {"paths": paths, "table": table, "markdown": markdown, "notes": notes}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mup probes figure",
        description="Figure 1 (mean AUROC vs FLOPs per record, monitors and cascades), "
        "per-data-set AUROC bars, ROC curves and a metrics table, from score files.",
    )
    parser.add_argument(
        "scores", nargs="+", help="score files (jsonl) or folders of them, any monitors"
    )
    parser.add_argument(
        "--cascade",
        action="append",
        default=[],
        metavar="CASCADE_JSONL",
        help="a cascade.jsonl from `mup cascade` (repeatable): one line per cascade",
    )
    parser.add_argument("--out", default="runs/figures", help="output directory (%(default)s)")
    return parser


def figure_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scores = read_scores(*args.scores)
        cascade_rows = read_cascade(*args.cascade) if args.cascade else []
        result = make_figures(scores, cascade_rows, args.out)
    except ValueError as error:  # ScoreFileError and CascadeFileError are ValueErrors
        print(f"mup probes figure: error: {error}", file=sys.stderr)
        return 1
    print(result["markdown"])
    for note in result["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in result["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(figure_main())
