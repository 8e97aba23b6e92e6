"""`mup cascade`: a first monitor in front of one or more second monitors, over fractions.

mup cascade --first probe.jsonl --second prompted.jsonl --second finetuned.jsonl \\
    --selection mid --merge mean --remaining first --out runs/cascade

Writes OUT/cascade.jsonl (one row per cascade, data set or "mean", and fraction: auroc,
tpr_at_1pct_fpr, mean_flops, fraction, n, n_escalated) and OUT/cascade.png (mean AUROC against
mean FLOPs per record, one line per cascade, each single monitor a point), and prints a table.
The --second files (or folders) are read together: each monitor in them is one cascade, its
rows gathered from every file (e.g. one file per data set).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mup._cli_args import comma_separated
from mup.monitors._cascade import (
    DEFAULT_FRACTIONS,
    MERGES,
    SELECTIONS,
    CascadeStrategy,
    cascade_curve,
    write_cascade,
)
from mup.monitors._scores import Scores, read_scores


def _fractions(value: str) -> tuple[float, ...]:
    out = comma_separated(float, "numbers in [0, 1]")(value)
    bad = [x for x in out if not 0.0 <= x <= 1.0]  # nan fails too
    if bad:
        raise argparse.ArgumentTypeError(f"fractions must be in [0, 1], got {bad}")
    return tuple(sorted(set(out)))


def _remaining(value: str) -> str:
    try:
        CascadeStrategy(remaining=value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mup cascade",
        description="Monitoring cascade: the first monitor scores every record, a fraction "
        "is escalated to the second; AUROC and FLOPs per record over fractions.",
    )
    parser.add_argument("--first", required=True, help="score file of the first monitor")
    parser.add_argument(
        "--second",
        required=True,
        action="append",
        help="score file of a second monitor (repeatable; one cascade per monitor in it)",
    )
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=DEFAULT_FRACTIONS,
        help="comma-separated fractions escalated, in [0, 1] (default "
        f"{','.join(f'{f:g}' for f in DEFAULT_FRACTIONS)})",
    )
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="mid",
        help="records escalated: highest, lowest or middle first-scores (default %(default)s)",
    )
    parser.add_argument(
        "--merge",
        choices=MERGES,
        default="mean",
        help="an escalated record's score: the second's, the mean or the max (%(default)s)",
    )
    parser.add_argument(
        "--remaining",
        type=_remaining,
        default="first",
        help="score of records not escalated: first, or fixed_<x> (default %(default)s)",
    )
    parser.add_argument("--out", default="runs/cascade", help="output directory (%(default)s)")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Read, validate and compute everything, then write; return rows, points, notes, paths."""
    import numpy as np

    from mup._plots import new_figure, save_figure
    from mup.monitors._figures import metrics_table, plot_tradeoff

    strategy = CascadeStrategy(selection=args.selection, merge=args.merge, remaining=args.remaining)
    first = read_scores(args.first)
    _ = first.monitor  # an error naming the file when it mixes monitors
    # All --second files read as one: a monitor's per-data-set files make one cascade, and
    # each distinct monitor in them makes its own.
    scores = read_scores(*args.second)
    seconds = [scores.select(monitor=m) for m in scores.monitors]
    rows, notes = [], []
    for second in seconds:
        rows += cascade_curve(first, second, args.fractions, strategy)
        a, _ = first.aligned_with(second)
        if len(a) < len(first):
            notes.append(
                f"{second.monitor}: {len(a)} of the {len(first)} records of {first.monitor} "
                f"are scored by both (data sets {', '.join(a.datasets)}); the cascade uses those"
            )
    datasets = list(dict.fromkeys(r["dataset"] for r in rows if r["dataset"] != "mean"))

    # Single monitors as points, over their own records of the data sets the cascades cover
    # (the cascades' "mean" averages those sets, so x and y average the same sets).
    points = {}
    for scores in [first, *seconds]:
        if not all(d in scores.datasets for d in datasets):
            notes.append(f"{scores.monitor} is not scored on every cascade data set: no point")
            continue
        part = Scores(tuple(r for r in scores.rows if r["dataset"] in datasets), scores.source)
        entry = metrics_table(part, mean_over=datasets)["monitors"][scores.monitor]
        points[scores.monitor] = (entry["mean"]["mean_flops"], entry["mean"]["auroc"])
    lines: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row["dataset"] == "mean":
            line = lines.setdefault(row["cascade"], {"mean_flops": [], "auroc": []})
            line["mean_flops"].append(row["mean_flops"])
            line["auroc"].append(row["auroc"])

    out = Path(args.out)
    path = write_cascade(out / "cascade.jsonl", rows)
    fig, ax = new_figure(figsize=(8, 5.5))
    arrays = {k: {key: np.array(v) for key, v in line.items()} for k, line in lines.items()}
    skipped = plot_tradeoff(ax, points, arrays)
    if skipped:
        notes.append(f"zero-FLOPs monitors left off the log axis: {skipped}")
    ax.set_title(f"cascade {strategy.describe()} (mean over {', '.join(datasets)})", fontsize=9)
    png = save_figure(fig, out / "cascade.png")
    return {"rows": rows, "points": points, "notes": notes, "paths": (path, png)}


def format_table(rows: list[dict], points: dict) -> str:
    lines = [f"{'monitor / cascade':<60} {'fraction':>8} {'AUROC':>6} {'TPR@1%':>6} {'FLOPs':>9}"]
    for monitor, (flops, auroc) in points.items():
        lines.append(f"{monitor[:60]:<60} {'':>8} {auroc:>6.3f} {'':>6} {flops:>9.3g}")
    for row in rows:
        if row["dataset"] == "mean":
            lines.append(
                f"{row['cascade'][:60]:<60} {row['fraction']:>8g} {row['auroc']:>6.3f} "
                f"{row['tpr_at_1pct_fpr']:>6.3f} {row['mean_flops']:>9.3g}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as error:  # ScoreFileError is a ValueError
        print(f"mup cascade: error: {error}", file=sys.stderr)
        return 1
    print(format_table(result["rows"], result["points"]))
    for note in result["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(map(str, result["paths"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
