"""`mup probes` (also `python -m mup.probes`): probe experiments from the command line.

The command line lives here, with the experiments it runs: `mup.probes` sits below them and
imports none of them (its `__main__` reaches this module through `mup.cli` by name).

Subcommands: compare, sweep, efficiency, calibration, devsplit, heatmap. Each extracts what it
needs (stores are content-keyed, so a re-run reuses them), writes a results JSONL and a PNG, and
prints where. Two more apply a saved probe: score (a `mup.monitors` score file per data set) and
view (one HTML page of its per-token scores); figure plots score files and has its own parser.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mup import _compile_cache
from mup._cli_args import comma_separated, config_from_args, zero_means_none
from mup._resolve import DEFAULT_MODEL


def _kinds(value: str) -> tuple[str, ...]:
    from mup.probes import PROBE_KINDS

    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown probe kind(s) {bad or value!r}; known: {','.join(PROBE_KINDS)}"
        )
    return kinds


_ints = comma_separated(int, "integers")
_strings = comma_separated(str, "ids")


def _names(known: tuple[str, ...], what: str):
    """A parser of a comma-separated list of names out of `known`."""

    def parse(value: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
        bad = [x for x in names if x not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {bad or value!r}; known: {','.join(known)}"
            )
        return names

    return parse


def _fraction(value: str) -> float:
    x = float(value)
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value!r}")
    return x


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default %(default)s)")
    p.add_argument("--out", default=out, help="output directory (default %(default)s)")
    p.add_argument("--data", default=None, help="data root laid out like shared/data")
    p.add_argument("--max-tokens", type=zero_means_none, default=512, help="0 = no truncation")
    p.add_argument("--limit", type=int, default=None, help="records per data set (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup probes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="every probe kind on the four dev sets")
    _common(p, "runs/compare")
    p.add_argument("--layer", type=int, default=None, help="default: configs/models/<model>")
    p.add_argument("--kinds", type=_kinds, default=None, help="comma-separated probe kinds")
    p.add_argument(
        "--train-limit", type=int, default=None, help="training-split records (default: --limit)"
    )

    p = sub.add_parser("sweep", help="grouped k-fold AUROC of one probe kind over layers")
    _common(p, "runs/sweep")
    p.add_argument("--layers", type=_ints, default=(5, 10, 15, 20, 25), help="e.g. 5,10,15,20")
    p.add_argument("--kind", type=_kind, default="logreg", help="probe kind (default %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="k, folds grouped by pair_id")

    p = sub.add_parser("efficiency", help="dev-set AUROC against training-set size")
    _common(p, "runs/efficiency")
    p.add_argument("--layer", type=int, default=None, help="default: configs/models/<model>")
    p.add_argument("--kinds", type=_kinds, default=("logreg",), help="comma-separated kinds")
    p.add_argument("--sizes", type=_ints, default=(16, 32, 64, 128, 256, 512))
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2))

    # Listed for --help; its own parser (mup.monitors._figures) reads the arguments.
    sub.add_parser(
        "figure",
        add_help=False,
        help="Figure 1 (mean AUROC vs FLOPs), per-set AUROC bars and ROC curves of score files",
    )

    p = sub.add_parser("calibration", help="predicted probability against scale_labels")
    _common(p, "runs/calibration")
    p.add_argument("--layer", type=int, default=None, help="default: configs/models/<model>")
    p.add_argument("--kind", type=_kind, default="attention")
    p.add_argument("--bins", type=int, default=10, help="reliability bins")

    p = sub.add_parser("score", help="a saved probe's score file per data set (mup.monitors)")
    _probe_input(p)
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="data set name (dev/anthropic, ..., mini) or .jsonl/.csv file; repeatable",
    )
    p.add_argument("--out", required=True, help="folder of the score files")
    p.add_argument("--limit", type=int, default=None, help="records per data set (quick runs)")
    p.add_argument("--name", default=None, help="monitor name (default probe:<kind>@<layer>)")

    p = sub.add_parser("view", help="an HTML page of a saved probe's per-token scores")
    _probe_input(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--store", help="an activation store holding the probe's layers")
    what.add_argument("--dataset", help="or a data set name / file, extracted as the probe reads")
    p.add_argument("--out", default="view.html", help="HTML file (default %(default)s)")
    p.add_argument(
        "--records", type=int, default=100, help="first N records (default %(default)s; 0 = all)"
    )
    p.add_argument("--ids", type=_strings, default=None, help="or these comma-separated ids")
    p.add_argument("--limit", type=int, default=None, help="records extracted from --dataset")
    from mup.experiments._common import DEV_SETS
    from mup.experiments._devsplit import DEFAULT_KS, MODES
    from mup.experiments._heatmap import FIELDS

    p = sub.add_parser(
        "devsplit", help="probes trained on k dev records: dev-only, combined, warm-start"
    )
    _common(p, "runs/devsplit")
    p.add_argument("--layer", type=int, default=None, help="default: configs/models/<model>")
    p.add_argument(
        "--kind", type=_kind, default="attention", help="probe kind (default %(default)s)"
    )
    p.add_argument(
        "--modes", type=_names(MODES, "mode"), default=MODES, help="default: " + ",".join(MODES)
    )
    p.add_argument(
        "--ks",
        type=_ints,
        default=DEFAULT_KS,
        help="dev records per probe; those a set cannot provide are skipped with a note",
    )
    p.add_argument("--repeats", type=int, default=5, help="repeats, seeds --seed + r")
    p.add_argument(
        "--sets", type=_names(DEV_SETS, "dev set"), default=DEV_SETS, help="comma-separated"
    )
    p.add_argument(
        "--val-fraction", type=_fraction, default=0.2, help="dev records for early stopping"
    )
    p.add_argument(
        "--eval-fraction", type=_fraction, default=0.4, help="dev records held out for scoring"
    )
    p.add_argument("--warm-epochs", type=int, default=10, help="warm-start fine-tuning epochs")

    p = sub.add_parser(
        "heatmap", help="AUROC trained on one value of a variation field x scored on each"
    )
    _common(p, "runs/heatmap")
    p.add_argument("--layer", type=int, default=None, help="default: configs/models/<model>")
    p.add_argument("--field", choices=FIELDS, default="prompt_style")
    p.add_argument(
        "--kind", type=_kind, default="attention", help="probe kind (default %(default)s)"
    )
    p.add_argument(
        "--min-per-class",
        type=int,
        default=5,
        help="records of each class a value needs in a split (else it is skipped)",
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="training records per value held out for early stopping (gradient kinds)",
    )
    return parser


def _probe_input(p: argparse.ArgumentParser) -> None:
    """Options of the commands that apply a saved probe file."""
    from mup.experiments._score import DEFAULT_STORE_DIR

    p.add_argument("--probe", required=True, help="probe file (.safetensors from Probe.save)")
    p.add_argument(
        "--store-dir",
        default=DEFAULT_STORE_DIR,
        help="content-keyed stores, reused when present (default %(default)s)",
    )
    p.add_argument("--data", default=None, help="data root laid out like shared/data")
    p.add_argument("--model", default=None, help="override the model the probe file records")
    # SUPPRESS: absent means "as the probe file records", which no --max-tokens value spells.
    p.add_argument(
        "--max-tokens",
        type=zero_means_none,
        default=argparse.SUPPRESS,
        help="truncation, 0 = none (default: the probe's training truncation)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _kind(value: str) -> str:
    (kind,) = _kinds(value) if "," not in value else (None,)
    if kind is None:
        raise argparse.ArgumentTypeError(f"one probe kind expected, got {value!r}")
    return kind


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["figure"]:
        from mup.monitors import figure_main

        return figure_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _compile_cache.enable()
    from mup import experiments
    from mup.store import StoreError

    try:
        if args.command == "compare":
            _, summary = experiments.run_compare(config_from_args(experiments.CompareConfig, args))
            print(summary["markdown"])
            print(f"wrote {summary['table']}, {summary['plot']}, {summary['results']}")
        elif args.command == "sweep":
            rows, summary = experiments.run_sweep(
                config_from_args(experiments.SweepConfig, args, k=args.folds)
            )
            for r in rows:
                print(f"layer {r.layer:>3}: AUROC {r.auroc_mean:.3f} +- {r.auroc_std:.3f}")
            print(f"wrote {summary['plot']}, {summary['results']}")
        elif args.command == "efficiency":
            rows, summary = experiments.run_efficiency(
                config_from_args(experiments.EfficiencyConfig, args)
            )
            for r in rows:
                print(f"{r.kind:<12} n={r.size:<5} seed={r.seed}: mean AUROC {r.mean_auroc:.3f}")
            print(f"wrote {summary['plot']}, {summary['results']}")
        elif args.command == "calibration":
            summary = experiments.run_calibration(
                config_from_args(experiments.CalibrationConfig, args, n_bins=args.bins)
            )
            for name, res in summary["sets"].items():
                print(
                    f"{name:<10} ECE {res['ece']:.3f}  Brier {res['brier']:.3f}  "
                    f"Spearman(prob, scale) {res['spearman_scale']:.3f}"
                )
            print(f"wrote {summary['plot']}, {summary['results']}")
        elif args.command == "score":
            from mup.experiments._score import ScoreConfig, run_score

            for part in run_score(
                config_from_args(ScoreConfig, args, datasets=tuple(args.dataset))
            ):
                print(
                    f"{part['dataset']:<16} {part['n']:>6} records, mean {part['mean_flops']:.3g} "
                    f"FLOPs -> {part['path']}"
                )
        elif args.command == "view":
            from mup.experiments._view import ViewConfig, run_view

            summary = run_view(config_from_args(ViewConfig, args, records=args.records or None))
            print(f"wrote {summary['path']} ({summary['n_records']} records)")
        elif args.command == "devsplit":
            _, summary = experiments.run_devsplit(
                config_from_args(experiments.DevsplitConfig, args)
            )
            for note in summary["notes"]:
                print(f"note: {note}")
            for t in summary["table"]:
                print(
                    f"{t['dataset']:<10} {t['mode']:<15} k={t['k']:<4} AUROC "
                    f"{t['auroc_mean']:.3f} +- {t['auroc_std']:.3f}  TPR@1%FPR "
                    f"{t['tpr_at_fpr_mean']:.3f}  ({t['repeats']} repeats)"
                )
            print(f"wrote {summary['plot']}, {summary['results']}")
        elif args.command == "heatmap":
            _, summary = experiments.run_heatmap(config_from_args(experiments.HeatmapConfig, args))
            for note in summary["notes"]:
                print(f"note: {note}")
            values = summary["values"]
            width = max(len(v) for v in values) + 2
            print("train \\ eval".ljust(width) + "".join(v[:12].rjust(14) for v in values))
            for v, row in zip(values, summary["auroc"], strict=True):
                cells = "".join(("-" if x is None else f"{x:.3f}").rjust(14) for x in row)
                print(v.ljust(width) + cells)
            print(f"wrote {summary['plot']}, {summary['results']}")
    except (ValueError, FileNotFoundError, KeyError, StoreError) as error:
        print(f"mup probes {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
