"""Probe kinds and their hyperparameters (defaults in configs/probes/<kind>.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from mup import _configs

ProbeKind = Literal[
    "mean",
    "max",
    "last",
    "softmax",
    "rolling",
    "attention",
    "linear_mean",
    "dom",
    "lda",
    "logreg",
]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
# Kinds whose score is a linear function of one pooled vector per record: activations are
# pooled ONCE (mup.native.pool) and training runs on [N, D]. The value is the pooling method.
POOLED_KINDS = {
    "mean": "mean",
    "last": "last",
    "linear_mean": "mean",
    "dom": "mean",
    "lda": "mean",
    "logreg": "mean",
}
# Kinds whose aggregation depends on learned per-token scores: they train on bucketed, padded
# [B, P, D] batches.
SEQUENCE_KINDS = ("max", "softmax", "rolling", "attention")
# Kinds trained by gradient descent (the others are closed form or Newton).
GRADIENT_KINDS = ("mean", "max", "last", "softmax", "rolling", "attention", "linear_mean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Hyperparameters of one probe; unused fields are ignored by kinds that do not need them.

    Attributes:
      kind: one of PROBE_KINDS.
      batch_size: records per optimiser step (MUP: 16; attention 128).
      lr: peak AdamW learning rate, decayed with a cosine to `final_lr` over all steps.
      final_lr: learning rate at the last step.
      weight_decay: AdamW decoupled weight decay.
      epochs: maximum passes over the training records.
      patience: stop after this many epochs without a better validation AUROC (0 disables).
      grad_clip: global gradient-norm clip.
      temperature: softmax probe temperature T in softmax(score / T).
      window: rolling probe window (tokens); shorter records use one window of their length.
      c: logreg inverse L2 strength, as scikit-learn's `C` (objective |w|^2 / 2 + C * sum loss).
      max_newton_steps: logreg Newton iteration cap.
      shrinkage: LDA covariance shrinkage: "ledoit_wolf" or a fixed intensity in [0, 1].
      min_bucket: smallest padded length for sequence batches (buckets are powers of two).
    """

    kind: ProbeKind
    batch_size: int = 16
    lr: float = 5e-3
    final_lr: float = 1e-4
    weight_decay: float = 1e-3
    epochs: int = 200
    patience: int = 50
    grad_clip: float = 1.0
    temperature: float = 5.0
    window: int = 40
    c: float = 1e-3
    max_newton_steps: int = 50
    shrinkage: str | float = "ledoit_wolf"
    min_bucket: int = 16

    def __post_init__(self):
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {self.kind!r}; expected one of {PROBE_KINDS}")
        for name in ("batch_size", "epochs", "window", "max_newton_steps", "min_bucket"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "final_lr", "temperature", "c", "grad_clip"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ProbeConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.patience < 0:
            raise ValueError("ProbeConfig.weight_decay and patience must be >= 0")
        if isinstance(self.shrinkage, str):
            if self.shrinkage != "ledoit_wolf":
                raise ValueError(
                    f"ProbeConfig.shrinkage must be 'ledoit_wolf' or a float in [0, 1], got "
                    f"{self.shrinkage!r}"
                )
        elif not 0.0 <= float(self.shrinkage) <= 1.0:
            raise ValueError(f"ProbeConfig.shrinkage must be in [0, 1], got {self.shrinkage}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config(kind: str, **overrides) -> ProbeConfig:
    """The MUP defaults for `kind` from configs/probes/<kind>.yaml, with keyword overrides."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; expected one of {PROBE_KINDS}")
    raw = _configs.load_config("probes", f"{kind}.yaml")
    fields = {f.name for f in dataclasses.fields(ProbeConfig)}
    for source, values in (("configs/probes/" + kind + ".yaml", raw), ("overrides", overrides)):
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"{source}: unknown probe config field(s) {unknown}; known: {sorted(fields)}"
            )
    if raw.get("kind", kind) != kind:
        raise ValueError(f"configs/probes/{kind}.yaml declares kind {raw['kind']!r}")
    merged = {**raw, **overrides, "kind": kind}
    return ProbeConfig(**merged)
