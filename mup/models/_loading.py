"""`load_model`: a model spec -> config, parameters on device, and tokenizer.

The weights stream from the checkpoint reader straight into `params_from_hf`, which casts each
tensor to its final dtype and places it on its devices (sharded over a mesh when one is given)
before the next tensor is read: a 70B bfloat16 checkpoint never exists as float32 in host memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp

from mup._resolve import DEFAULT_MODEL, ResolvedSpec, resolve_spec
from mup.models._checkpoint import iter_hf_tensors, read_hf_config
from mup.models._config import ModelConfig
from mup.models._families import config_from_hf
from mup.models._params import params_from_hf

DType = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: everything `forward` and `generate` need.

    config:    the architecture (static under jit).
    params:    nested dict of jax arrays (see `mup.models.param_shapes`), in `dtype`.
    tokenizer: a transformers fast tokenizer with the model's chat template.
    spec:      where the weights came from.
    dtype:     "float32" | "bfloat16" | "float16", the parameter and activation dtype.
    """

    config: ModelConfig
    params: Any
    tokenizer: Any
    spec: ResolvedSpec
    dtype: str


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: DType = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> Model:
    """Load weights and tokenizer of `spec`.

    spec: a short name (``smollm2-135m``, the embedded default), a ``.gguf`` file, a local HF
    checkpoint directory (config.json + safetensors + tokenizer files) or a hub id.
    dtype: parameter and activation dtype. mesh: shard the parameters over this
    `jax.sharding.Mesh` (axes "data" and "model") as they load.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    resolved = resolve_spec(spec)
    config = config_from_hf(read_hf_config(resolved))
    params = load_params(resolved, config, dtype=dtype, mesh=mesh)
    tokenizer = _load_tokenizer(resolved)
    return Model(config=config, params=params, tokenizer=tokenizer, spec=resolved, dtype=dtype)


def load_params(
    resolved: ResolvedSpec,
    config: ModelConfig,
    *,
    dtype: DType = "float32",
    mesh: jax.sharding.Mesh | None = None,
):
    """The weights of `resolved` on device, streamed tensor by tensor: `load_model` without
    the config parse and the tokenizer, for callers that already hold both."""
    return params_from_hf(config, iter_hf_tensors(resolved), dtype=DTYPES[dtype], mesh=mesh)


def _load_tokenizer(resolved: ResolvedSpec):
    # mup.text owns tokenizer loading (shared cache, chat-template fallbacks for known GGUFs).
    from mup.text import load_tokenizer

    # Pass the resolved location, not the raw spec, so that a hub id is not resolved twice.
    return load_tokenizer(resolved.path)
