"""`python -m mup.extract`: residual-stream activations of a model over chat data sets, written
to chunked zarr v3 stores (see `mup.store`) on local disk or S3 / R2.

Library use::

    from mup.extract import ExtractConfig, run
    summary = run(ExtractConfig(model="smollm2-135m", layers=(20,), datasets=("data.jsonl",),
                                out="acts/"))
"""

# The job description and its command line
from mup.extract._cli import build_parser, config_from_args, main
from mup.extract._config import ExtractConfig

# Running it
from mup.extract._identity import model_identity  # isort: skip
from mup.extract._plan import default_layers  # isort: skip
from mup.extract._run import Summary, run  # isort: skip

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
