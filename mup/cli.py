"""The `mup` console script: one entry point, one subcommand per workflow.

Each subcommand is the `main(argv)` of a module that is also runnable on its own
(`mup extract ...` == `python -m mup.extract ...`), so the entry points stay thin and the
library code behind them is importable and tested on its own.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose main(argv) runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mup.demo", "run the end-to-end demo on the embedded default model"),
    "data": (
        "mup.datagen._cli",
        "download, inspect, balance, split and compare stakes data sets; label them with an LLM",
    ),
    "extract": ("mup.extract._cli", "extract residual-stream activations into a zarr store"),
    "store": ("mup.store._cli", "verify activation stores (every object and chunk checksum)"),
    "probes": ("mup.experiments._cli", "train, compare and sweep high-stakes probes"),
    "baselines": ("mup.monitors._cli", "prompted and finetuned LLM monitors, as score files"),
    "cascade": ("mup.monitors._cascade_cli", "the probe -> LLM monitoring cascade of score files"),
    "steering": ("mup.steering._cli", "build steering vectors (difference of means, BiPO)"),
    "serve": ("mup.serve._cli", "serve a plain or steered model behind an OpenAI-compatible API"),
    "evals": ("mup.evals._cli", "run the inspect-ai capability harness across multipliers"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mup COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`mup COMMAND --help` describes each command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mup import __version__

        print(f"mup {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mup: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
