"""`mup evals` (also `python -m mup.evals`): run suites across multipliers, aggregate logs.

run        tasks x multipliers -> inspect logs under {log_dir}/{category}/multiplier_{m}/,
           then the CSV and plot (unless --no-aggregate)
aggregate  logs -> CSV (+ PNG)
list       the suites and benchmarks of the config
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mup import _compile_cache


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mup evals", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite across steering multipliers")
    run.add_argument("--suite", required=True, help="suite name (offline, reference) or entry")
    run.add_argument("--model", default="mup/smollm2-135m", help="mup/SPEC (in-process model)")
    run.add_argument("--vector", help="steering vector file (.safetensors, or .npy + --block)")
    run.add_argument(
        "--block",
        "--layer",
        dest="block",
        type=int,
        help="block whose output is steered (--layer: its old name)",
    )
    run.add_argument(
        "--multipliers",
        default=None,
        help="comma-separated, e.g. -1.5,-1,-0.5,0,0.5,1,1.5 (default 0; with --deployments: "
        "every line of the file)",
    )
    run.add_argument("--limit", type=int, help="samples per task")
    run.add_argument("--deployments", help="deployments.jsonl: the OpenAI route")
    run.add_argument("--log-dir", default="logs")
    run.add_argument("--config", help="benchmarks YAML (default: configs/benchmarks.yaml)")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    run.add_argument("--max-batch", type=int, default=16, help="rows per generate call")
    run.add_argument("--out", default=None, help="CSV path (default LOG_DIR/results.csv)")
    run.add_argument("--plot", default=None, help="PNG path (default LOG_DIR/scores.png)")
    run.add_argument("--no-aggregate", action="store_true")

    agg = sub.add_parser("aggregate", help="inspect logs -> CSV and plot")
    agg.add_argument("--log-dir", default="logs")
    agg.add_argument("--out", default="results.csv")
    agg.add_argument("--plot", default=None, help="PNG path (omit for no plot)")

    lst = sub.add_parser("list", help="show suites and benchmarks")
    lst.add_argument("--config", help="benchmarks YAML (default: configs/benchmarks.yaml)")
    return p


def _print_table(rows) -> None:
    print(
        f"{'benchmark':<16} {'subset':<12} {'metric':<13} {'mult':>6} {'n':>4} {'score':>6} "
        f"{'95% CI':>13}"
    )
    for r in rows:
        print(
            f"{r['benchmark']:<16} {r['subset']:<12} {r['metric']:<13} {r['multiplier']:>6g} "
            f"{r['n_samples']:>4} {r['accuracy']:>6.3f} "
            f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
        )


def _join_negative_lists(argv: list[str]) -> list[str]:
    # argparse takes "-1.5,-1,0" for an option flag; glue it to its option instead.
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--multipliers" and arg.startswith("-"):
            out[-1] = f"--multipliers={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_negative_lists(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _compile_cache.enable()
    from mup.evals import _aggregate, _runner, _suite
    from mup.evals._errors import SuiteError

    try:
        if args.command == "list":
            cfg = _suite.load_suites(args.config)
            for name, keys in cfg.suites.items():
                print(f"suite {name}: {', '.join(keys)}")
            for spec in cfg.benchmarks.values():
                print(f"  {spec.name:<16} {spec.task:<30} {spec.category:<22} args={spec.args}")
            return 0
        if args.command == "aggregate":
            rows = _aggregate.aggregate(args.log_dir, args.out, args.plot)
            _print_table(rows)
            print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
            return 0

        if args.multipliers is not None:
            multipliers = _runner.parse_multipliers(args.multipliers)
        else:
            multipliers = () if args.deployments else (0.0,)
        cfg = _runner.RunConfig(
            suite=args.suite,
            model=args.model,
            vector=args.vector,
            block=args.block,
            multipliers=multipliers,
            limit=args.limit,
            deployments=args.deployments,
            log_dir=Path(args.log_dir),
            config=Path(args.config) if args.config else None,
            dtype=args.dtype,
            max_batch=args.max_batch,
        )
        report = _runner.run_suite(cfg)
        for rec in report:
            print(json.dumps(rec))
        failed = [r for r in report if r["status"] not in ("success", "skipped", "unavailable")]
        if not args.no_aggregate:
            out = Path(args.out) if args.out else cfg.log_dir / "results.csv"
            png = Path(args.plot) if args.plot else cfg.log_dir / "scores.png"
            rows = _aggregate.aggregate(cfg.log_dir, out, png)
            _print_table(rows)
            print(f"wrote {out} and {png}")
        if failed:
            print(f"{len(failed)} run(s) did not succeed; rerun to retry them", file=sys.stderr)
            return 1
        return 0
    except (SuiteError, ValueError, FileNotFoundError) as error:
        print(f"mup evals: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
