"""`python -m mup.store` / `mup store`: check activation stores.

verify URL...   every object present and non-empty, every chunk checksum; one line per store
                ("ok" or "FAULT" with what is wrong), exit status 1 if any store has a fault.
                A URL holding no store stands for every store below it (an --out location).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup store", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "verify", help="check every shard and chunk checksum of stores (exit 1 on any fault)"
    )
    p.add_argument("urls", nargs="+", metavar="URL", help="store, or --out location, local or s3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mup.store._verify import Verdict, verify_all

    faulty = False
    for url in args.urls:
        try:
            verdicts = verify_all(url)
        except Exception as error:  # noqa: BLE001 (unreachable location, bad URL: one line)
            fault = f"{type(error).__name__}: {' '.join(str(error).split())}"
            verdicts = [Verdict(url=str(url), faults=(fault,), summary="")]
        for verdict in verdicts:
            print(verdict.line(), flush=True)
            faulty |= not verdict.ok
    return 1 if faulty else 0


if __name__ == "__main__":
    sys.exit(main())
