"""`python -m mup.extract`: residual-stream activations of a model over chat data sets, written
to chunked zarr v3 stores (see `mup.store`) on local disk or S3 / R2.

Library use::

    from mup.extract import ExtractConfig, run
    summary = run(ExtractConfig(model="smollm2-135m", layers=(20,), datasets=("data.jsonl",),
                                out="acts/"))
"""

# The job description and its command line
from mup import _compile_cache
from mup.extract._config import ExtractConfig, build_parser, config_from_args

# Running it
from mup.extract._pipeline import Summary, default_layers, model_identity, run  # isort: skip

__all__ = [
    "ExtractConfig",
    "Summary",
    "build_parser",
    "config_from_args",
    "default_layers",
    "main",
    "model_identity",
    "run",
]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mup.extract` and `mup extract`."""
    import logging
    import sys

    from mup.store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
        _compile_cache.enable()
        run(config)
    except (StoreError, OSError, ValueError) as error:
        # One clear line, not a traceback, for problems with the user's input or storage
        # (OSError: a missing file, a full disk).
        print(f"mup.extract: error: {error}", file=sys.stderr)
        return 1
    return 0
