"""Low-rank adapters (LoRA) over the stacked block weights of `mup.models`.

Axis letters: L layers, I a weight's input width (D, or N*H for o, F for down), O its output
width, R the adapter rank.

An adapted weight is ``W + (alpha / R) * A @ B`` with A [L, I, R] and B [L, R, O] flattened over
the weight's input and output axes (q [L, D, N, H]: I = D, O = N*H). A starts uniform in
+-1/sqrt(I) and B at zero, as PEFT does, so an adapter at init leaves the model unchanged.

The adapters are merged into the weights inside the jitted step (`merge_lora`) rather than
added by a hook in the forward pass: the decoder in `mup.models` stays untouched, and autodiff
of the merge gives the LoRA gradients exactly. The price is the full-size weight gradient of
each adapted weight in the backward pass (one extra matmul per adapted weight, ~1/3 of its
cost), which is why the default adapts q and v only. In bfloat16 the merged weight is rounded
to bfloat16: updates below half a bf16 step of W move the gradient but not the forward pass.
float32, the CPU default, is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mup.models import ModelConfig

__all__ = ["LORA_TARGETS", "LoraConfig", "init_lora", "lora_shapes", "merge_lora"]

# Adaptable weights under params["layers"], with how many of their axes after L are inputs.
_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
LORA_TARGETS: tuple[str, ...] = tuple(_INPUT_AXES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which weights get adapters, and their size.

    rank:    R, the adapter rank (> 0).
    alpha:   the delta is scaled by alpha / rank (PEFT's convention), so changing the rank
             keeps the delta's size at init-time learning rates.
    targets: weights of every block to adapt, among q, k, v, o (attention) and gate, up,
             down (MLP).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be an int > 0, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)) or (
            self.alpha <= 0
        ):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        targets = tuple(self.targets)
        if not targets:
            raise ValueError(f"LoRA needs at least one target module among {LORA_TARGETS}")
        unknown = [t for t in targets if t not in _INPUT_AXES]
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {unknown}; choose among {', '.join(LORA_TARGETS)}"
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRA target modules repeat: {list(targets)}")
        # Canonical order, so that equal configs hash (and compile) alike.
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _in_out(config: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input axes, output axes) of one adapted weight, without the leading L."""
    from mup.models import param_shapes

    shape = param_shapes(config)["layers"][target][1:]
    k = _INPUT_AXES[target]
    return shape[:k], shape[k:]


def lora_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """target -> {"a": (L, I, R), "b": (L, R, O)}."""
    out = {}
    for t in lora.targets:
        ins, outs = _in_out(config, t)
        out[t] = {
            "a": (config.n_layers, math.prod(ins), lora.rank),
            "b": (config.n_layers, lora.rank, math.prod(outs)),
        }
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))  # one program, not one per eager op
def init_lora(config: ModelConfig, lora: LoraConfig, key: jax.Array) -> dict:
    """Adapters at init: A uniform in +-1/sqrt(I) (PEFT's kaiming-uniform bound), B = 0."""
    shapes = lora_shapes(config, lora)
    keys = jax.random.split(key, len(shapes))
    adapters = {}
    for k, (t, s) in zip(keys, shapes.items(), strict=True):
        bound = 1.0 / math.sqrt(s["a"][1])
        adapters[t] = {
            "a": jax.random.uniform(k, s["a"], jnp.float32, -bound, bound),
            "b": jnp.zeros(s["b"], jnp.float32),
        }
    return adapters


def merge_lora(params, adapters: dict, lora: LoraConfig):
    """The parameter pytree with each adapted weight replaced by W + scale * A @ B (in W's
    dtype; the product is taken in float32). `params` itself is not modified."""
    layers = dict(params["layers"])
    for t, ab in adapters.items():
        w = layers[t]  # [L, *in, *out]
        delta = jnp.einsum(
            "lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
        )  # [L, I, O]
        layers[t] = (w.astype(jnp.float32) + lora.scale * delta.reshape(w.shape)).astype(w.dtype)
    return {**params, "layers": layers}
