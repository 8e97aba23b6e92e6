"""mup: read and steer what large language models compute.

Sub-packages, each one concern (see README.md for the data flow):
  mup.data      records and datasets          mup.text      chat -> tokens, roles, masks
  mup.native    pooling / batching core       mup.models    JAX/Flax model ports
  mup.store     zarr v3 activation store      mup.extract   `python -m mup.extract`
  mup.probes    jitted probes                 mup.metrics   AUROC, TPR@FPR, ECE, Brier
  mup.steering  steering vectors              mup.serve     OpenAI-compatible server
  mup.evals     inspect-ai harness
"""

from mup._resolve import DEFAULT_MODEL, resolve_spec
from mup._version import __version__

__all__ = ["DEFAULT_MODEL", "__version__", "load_model", "resolve_spec"]


def load_model(spec: str = DEFAULT_MODEL, **kwargs):
    """Load a model and its tokenizer; see `mup.models.load_model`."""
    # Imported lazily: `import mup` must stay cheap for the CLI and the data tools.
    from mup.models import load_model as _load_model

    return _load_model(spec, **kwargs)
