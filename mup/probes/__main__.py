"""`python -m mup.probes` == `mup probes`: the probe experiments.

Their command line lives with them in `mup.experiments._cli`; `mup.cli` dispatches to it by
name, so no module of `mup.probes` imports the experiments that sit above it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from mup import cli

    return cli.main(["probes", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
