"""`mup data`: fetch the published stakes data sets, inspect them, derive sets from them, and
make and label them with an LLM.

The command lives here, above mup.data, mup.text and the LLM commands it dispatches to
(`mup.datagen._llm_cli`); the library code of each tool is in mup.data.

mup data download [--dest DIR] [--sets NAME ...]
mup data stats FILE|NAME [--model SPEC | --no-tokens] [--json]
mup data balance FILE --out OUT [--n N] [--seed S]
mup data split FILE --out-train A --out-test B [--test-fraction F] [--seed S]
mup data overlap A B [--json] [--fail-on-overlap]
mup data label INPUT [...] --out FILE|DIR (--serve SPEC | --base-url URL) ...  (mup.datagen)
mup data agreement --a FILE --b FILE                                 (mup.datagen)
mup data generate --n-situations N --out FILE (--serve SPEC | --base-url URL) ... (mup.datagen)
mup data relabel --dataset FILE --out FILE (--serve SPEC | --base-url URL) ... (mup.datagen)

The root is laid out like shared/data (`mup/training/...`, `mup/evals/dev/...`,
`mup/evals/test/...`), so `MUP_DATA=DIR` or `--data DIR` finds every set afterwards.
balance and split keep the records of one `pair_id` together and write .jsonl files that
`load_records` reads; overlap exits 0 unless `--fail-on-overlap` and something is shared.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mup.data import DEFAULT_DOWNLOADS, HUB_REPO, SOURCES, HubUnavailable, download


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "download",
        help=f"download published sets from the hub dataset {HUB_REPO}",
        description=f"Download published sets from the hub dataset {HUB_REPO} into a data root.",
    )
    fetch.add_argument("--dest", default="data", help="data root to fill (default: ./data)")
    published = [name for name, source in SOURCES.items() if source.hub]
    fetch.add_argument(
        "--sets",
        nargs="+",
        default=list(DEFAULT_DOWNLOADS),
        choices=published,
        metavar="NAME",
        help="sets to fetch (default: training and the balanced dev and test sets); "
        f"one of: {', '.join(published)}",
    )
    _add_tools(commands)
    from mup.datagen._llm_cli import add_parsers  # label, relabel, generate, agreement

    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("label", "relabel", "generate", "agreement"):
        from mup.datagen._llm_cli import run

        return run(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if hasattr(args, "run"):
        return args.run(args)
    try:
        paths = download(args.dest, tuple(args.sets))
    except HubUnavailable as error:
        print(
            f"mup data download: cannot reach the hub dataset {HUB_REPO}: {error}", file=sys.stderr
        )
        return 1
    for name, path in zip(args.sets, paths, strict=True):
        print(f"{name:<24} {path}")
    print(f"\n{len(paths)} sets in {args.dest}; use them with MUP_DATA={args.dest} (or --data)")
    return 0


# --- data set tools: stats, balance, split, overlap (library code in _stats, _transform,
# _overlap). Every bad input is one line naming the command, exit 2, before any output.


def _add_tools(commands) -> None:
    stats = commands.add_parser(
        "stats",
        help="labels, lengths and variation fields of a set",
        description="Label counts; lengths in characters and tokens (min/median/p95/max, per "
        "label); counts and label balance per value of each variation field.",
    )
    stats.add_argument("data", metavar="FILE|NAME", help="a .jsonl/.csv file or a data set name")
    stats.add_argument("--model", default="smollm2-135m", help="tokenizer for token lengths")
    stats.add_argument("--no-tokens", action="store_true", help="skip token lengths")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    stats.set_defaults(run=_stats)
    bal = commands.add_parser(
        "balance",
        help="a label-balanced subsample keeping pairs whole",
        description="As many high- as low-stakes records, exactly, from whole pair_id groups "
        "(a record without one is its own group); ambiguous records are dropped and counted.",
    )
    bal.add_argument("data", metavar="FILE", help="a .jsonl/.csv file (or a data set name)")
    bal.add_argument("--out", required=True, help="the .jsonl file to write")
    bal.add_argument("--n", type=int, help="records in the sample, even (default: the most)")
    bal.add_argument("--seed", type=int, default=0)
    bal.set_defaults(run=_balance)
    split = commands.add_parser(
        "split",
        help="a train/test split by pair_id",
        description="Whole pair_id groups to each side, the test side within one group of the "
        "fraction; every record gets a split field (train / test).",
    )
    split.add_argument("data", metavar="FILE", help="a .jsonl/.csv file (or a data set name)")
    split.add_argument("--out-train", required=True, metavar="A", help=".jsonl file to write")
    split.add_argument("--out-test", required=True, metavar="B", help=".jsonl file to write")
    split.add_argument("--test-fraction", type=float, default=0.2, help="in (0, 1); default 0.2")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(run=_split)
    over = commands.add_parser(
        "overlap",
        help="records two sets share (exact / normalised text)",
        description="Records of A and B with the same rendered conversation, exactly and with "
        "case, whitespace and punctuation folded. Exit 0 (1 with --fail-on-overlap if any).",
    )
    over.add_argument("a", metavar="A", help="a .jsonl/.csv file or a data set name")
    over.add_argument("b", metavar="B", help="a .jsonl/.csv file or a data set name")
    over.add_argument("--json", action="store_true", help="print the counts as JSON")
    over.add_argument("--fail-on-overlap", action="store_true", help="exit 1 if any is shared")
    over.set_defaults(run=_overlap)


class _Refused(Exception):
    """A bad input: printed as `mup data COMMAND: message`, exit 2."""


def _tool(run):
    def wrapped(args) -> int:
        from mup.data import DataError, SampleError

        try:
            return run(args)
        except (_Refused, DataError, SampleError, OSError) as error:  # OSError: an unwritable --out
            print(f"mup data {args.command}: {error}", file=sys.stderr)
            return 2

    return wrapped


def _input(arg: str):
    from pathlib import Path

    from mup.data import dataset_names, find_dataset

    if Path(arg).is_file():
        return Path(arg)
    if arg in dataset_names():
        try:
            return find_dataset(arg)
        except FileNotFoundError as error:  # a benchmark set that is nowhere on this machine
            raise _Refused(str(error)) from None
    raise _Refused(f"{arg}: no such file, nor a data set name ({', '.join(dataset_names())})")


def _outputs(source, args, *names: str) -> None:
    from pathlib import Path

    flags = [f"--{n.replace('_', '-')}" for n in names]
    outs = [Path(getattr(args, n)) for n in names]
    for flag, out in zip(flags, outs, strict=True):
        if out.suffix.lower() != ".jsonl":
            raise _Refused(f"{flag} {out}: outputs are written as .jsonl")
        if out.resolve() == source.resolve():
            raise _Refused(f"{flag} {out} is the input file; write the output elsewhere")
    if len({o.resolve() for o in outs}) < len(outs):
        raise _Refused(f"{' and '.join(flags)} name the same file")


@_tool
def _stats(args) -> int:
    import json

    from mup.data import dataset_stats, format_stats, load_records

    dataset = load_records(_input(args.data))
    lengths = None
    if not args.no_tokens:
        from mup.text import encode_chats, load_tokenizer

        try:
            tokenizer = load_tokenizer(args.model)
        except (OSError, ValueError) as error:
            raise _Refused(f"--model {args.model}: {error}") from None
        lengths = encode_chats(tokenizer, dataset).lengths
    stats = dataset_stats(dataset, token_lengths=lengths, token_model=args.model)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


@_tool
def _balance(args) -> int:
    from mup.data import balance, load_records, write_records

    if args.n is not None and (args.n < 2 or args.n % 2):
        raise _Refused(f"--n {args.n}: must be an even number >= 2 (half of each label)")
    source = _input(args.data)
    _outputs(source, args, "out")
    dataset = load_records(source)
    result = balance(dataset, n=args.n, seed=args.seed)
    write_records(args.out, result.records)
    print(
        f"{args.out}: {len(result.records)} records ({result.n_high} high-stakes, "
        f"{result.n_low} low-stakes) in {result.n_groups} of {result.n_groups_total} pair groups, "
        f"seed {args.seed}; dropped {result.n_ambiguous_dropped} ambiguous and "
        f"{len(dataset) - result.n_ambiguous_dropped - len(result.records)} for balance "
        f"(largest balanced sample: {result.largest})"
    )
    return 0


@_tool
def _split(args) -> int:
    from mup.data import HIGH_STAKES, load_records, split_by_pair, write_records

    if not 0 < args.test_fraction < 1:
        raise _Refused(f"--test-fraction {args.test_fraction}: must lie strictly in (0, 1)")
    source = _input(args.data)
    _outputs(source, args, "out_train", "out_test")
    dataset = load_records(source)
    result = split_by_pair(dataset, test_fraction=args.test_fraction, seed=args.seed)
    write_records(args.out_train, result.train)
    write_records(args.out_test, result.test)
    for path, side, groups in (
        (args.out_train, result.train, result.n_groups_train),
        (args.out_test, result.test, result.n_groups_test),
    ):
        high = sum(r.label == HIGH_STAKES for r in side)
        print(f"{path}: {len(side)} records in {groups} pair groups, {high} high-stakes")
    print(
        f"test fraction {len(result.test) / len(dataset):.4f} (asked {args.test_fraction}; "
        f"largest pair group {result.largest_group}), seed {args.seed}"
    )
    return 0


@_tool
def _overlap(args) -> int:
    import json

    from mup.data import format_overlap, load_records, overlap

    paths = [_input(args.a), _input(args.b)]
    a, b = (load_records(p) for p in paths)
    result = overlap(a, b, a_name=str(paths[0]), b_name=str(paths[1]))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_overlap(result))
    return 1 if args.fail_on_overlap and result.any else 0


if __name__ == "__main__":
    sys.exit(main())
