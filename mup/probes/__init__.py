"""Jitted probes that flag high-stakes interactions from residual-stream activations.

from mup import probes
probe = probes.fit("attention", train, layer=20, val=val, seed=0)   # store or Activations
probs = probe.predict(test)                    # float32 [N]
scores, offsets = probe.token_scores(test)     # ragged per-token logits
probe.save("probe.safetensors"); probe = probes.load("probe.safetensors")
"""

# Data: in-memory ragged activations (a store works wherever these do).
from mup.probes._data import Activations, concat  # isort: skip

# Configuration: kinds and their MUP-paper defaults (configs/probes/<kind>.yaml).
from mup.probes._config import (  # isort: skip
    GRADIENT_KINDS,
    PROBE_KINDS,
    ProbeConfig,
    default_config,
)

# Training, inference and files.
from mup.probes._probe import Probe, ProbeFileError, fit, load  # isort: skip

# Difference of class means, accumulated chunk by chunk (also steering's vectors).
from mup.probes._closed_form import ClassMeans  # isort: skip

# Results files.
from mup.probes._results import append_result  # isort: skip

__all__ = [
    "GRADIENT_KINDS",
    "PROBE_KINDS",
    "Activations",
    "ClassMeans",
    "Probe",
    "ProbeConfig",
    "ProbeFileError",
    "append_result",
    "concat",
    "default_config",
    "fit",
    "load",
]
