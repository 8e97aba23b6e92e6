"""`python -m mup.probes` == `mup probes`; the command lives with the experiments it runs
(`mup.experiments._cli`), reached through `mup.cli` by name so that `mup.probes` imports nothing
above it."""

import sys

from mup import cli

if __name__ == "__main__":
    raise SystemExit(cli.main(["probes", *sys.argv[1:]]))
