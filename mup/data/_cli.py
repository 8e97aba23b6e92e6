"""`mup data`: fetch the published stakes data sets into a local data root, label data sets
with an LLM, and compare labellings.

mup data download [--dest DIR] [--sets NAME ...]
mup data label INPUT [...] --out FILE|DIR (--serve SPEC | --base-url URL) ...  (mup.datagen)
mup data agreement --a FILE --b FILE                                 (mup.datagen)

The root is laid out like shared/data (`mup/training/...`, `mup/evals/dev/...`,
`mup/evals/test/...`), so `MUP_DATA=DIR` or `--data DIR` finds every set afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mup.data._locate import DEFAULT_DOWNLOADS, HUB_REPO, SOURCES, HubUnavailable, download


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
    from mup.datagen._cli import add_parsers  # label, agreement

    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "download":
        from mup.datagen._cli import run

        return run(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
