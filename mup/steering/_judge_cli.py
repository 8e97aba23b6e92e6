"""`mup steering judge`: rate the answers of a steering sweep with an LLM judge.

  mup steering judge --sweep DIR/sweep.jsonl --out DIR/judge.jsonl
                     (--base-url URL [--model NAME] [--api-key-env NAME] | --serve SPEC)
                     [--rubric coherence|relationship-seeking|FILE ...] [--pairwise]
                     [--concurrency N] [--limit N]

Writes DIR/judge.jsonl (one line per judgement, resumable), judge.rejects.jsonl (answers that
gave no judgement, with the raw text), judge.summary.csv / .json (per vector, block, epoch,
multiplier and rubric) and judge.png. Every check that needs no request (sweep file, rubrics,
pairwise baselines) is made before the endpoint is touched: a usage error exits 2, a failing
endpoint 1, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mup._cli_args import non_negative_int, positive_int

logger = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `judge` to the subparsers `sub` of `mup steering`."""
    from mup.datagen import add_answer_args, add_endpoint_args
    from mup.steering._judge import BUNDLED_RUBRICS

    p = sub.add_parser(
        "judge",
        help="rate a sweep's answers with an LLM judge (rubric ratings, pairwise vs m=0)",
        description="Rate each answer of a steering sweep 1-10 by each rubric (the expected "
        "rating over the judge's token probabilities when the endpoint returns top_logprobs), "
        "and with --pairwise compare each steered answer with the unsteered one in both "
        "orders. The output is appended judgement by judgement; a rerun continues where a run "
        "stopped, then the summary and figure are rewritten.",
    )
    p.add_argument("--sweep", required=True, type=Path, help="sweep.jsonl of mup steering sweep")
    p.add_argument("--out", required=True, type=Path, help="output judge.jsonl (resumable)")
    p.add_argument(
        "--rubric",
        action="extend",
        nargs="+",
        default=None,
        metavar="NAME|FILE",
        help=f"rubric, repeatable: {', '.join(BUNDLED_RUBRICS)} or a markdown file "
        "(default: coherence)",
    )
    p.add_argument("--pairwise", action="store_true", help="also compare with multiplier 0")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N judgements")
    add_endpoint_args(p, role="judge")
    ask = p.add_argument_group("requests and statistics")
    add_answer_args(
        ask, max_tokens=96, expected="expected ratings", seed_help="request and bootstrap seed"
    )
    ask.add_argument("--max-input-chars", type=positive_int, default=None, help="conversation cap")
    ask.add_argument("--bootstrap", type=non_negative_int, default=1000, help="BT resamples (1000)")
    ask.add_argument(
        "--bt-prior", type=float, default=0.5, help="BT pseudo-wins each way per pair (0.5)"
    )
    ask.add_argument("--retry-rejects", action="store_true", help="ask again for rejects")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `mup steering judge`: 0 done, 2 usage error, 1 endpoint failure, 130 interrupted."""
    from mup.datagen import EndpointError
    from mup.steering._judge import JudgeError, SweepError

    prog = "mup steering judge"
    try:
        prepared = _prepare(args)
    except (SweepError, JudgeError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    try:
        return _judge(args, *prepared)
    except JudgeError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        summary = getattr(error, "summary", None)
        if summary is not None:
            print(
                f"{prog}: {summary.n_judged_total} judgements and {summary.n_rejected_total} "
                f"rejects are kept in {summary.out}; rerun to continue",
                file=sys.stderr,
            )
        return 1
    except EndpointError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished judgements are kept, rerun", file=sys.stderr)
        return 130


def _prepare(args):
    """Everything that needs no request: a bad input costs nothing."""
    from mup.steering._judge import JudgeConfig, load_rubric, load_sweep, plan

    if (args.base_url is None) == (args.serve is None):
        raise ValueError("give exactly one of --base-url URL or --serve SPEC")
    if args.out.is_dir() or args.out.suffix != ".jsonl":
        raise ValueError(f"--out {args.out} must be a .jsonl file")
    rubrics = tuple(load_rubric(spec) for spec in (args.rubric or ["coherence"]))
    config = JudgeConfig(
        rubrics=rubrics,
        pairwise=args.pairwise,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        top_logprobs=args.top_logprobs,
        response_format=args.response_format,
        max_input_chars=args.max_input_chars,
        bootstrap=args.bootstrap,
        bt_prior=args.bt_prior,
        retry_rejects=args.retry_rejects,
    )
    rows = load_sweep(args.sweep)
    plan(rows, config)  # refuses a pairwise sweep without its multiplier-0 answers
    return rows, config


def _judge(args, rows, config) -> int:
    from mup.datagen import EndpointConfig, open_endpoint, quiet_http_logs
    from mup.steering._judge import judge_sweep

    quiet_http_logs()
    with open_endpoint(EndpointConfig.from_args(args)) as endpoint:
        logger.info(
            "judging %s (%d answers; rubrics %s%s) with %s into %s",
            args.sweep,
            len(rows),
            ", ".join(r.name for r in config.rubrics),
            "; pairwise" if config.pairwise else "",
            endpoint.model,
            args.out,
        )
        summary = judge_sweep(
            endpoint,
            rows,
            args.out,
            config,
            limit=args.limit,
            progress=not args.no_progress,
            plot=not args.no_plot,
        )
        print("\n".join(summary.lines()))
        print(f"endpoint: {endpoint.usage.summary()}")
    return 0
