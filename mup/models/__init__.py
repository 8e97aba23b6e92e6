"""JAX/Flax ports of llama-like and Gemma 2/3 decoders, checkpoint loading, steered generation.

model = load_model("smollm2-135m")                          # or a .gguf, HF dir or hub id
out = forward(model.params, tokens, positions, config=model.config, capture=(12,))
gen = generate(model, [[{"role": "user", "content": "Hi"}]] * 3,
               steering=Steering(12, vector), multipliers=[-1.0, 0.0, 1.0])  # block 12's output
"""

# Configs
from mup.models._config import ModelConfig, UnsupportedConfigError
from mup.models._families import config_from_hf
from mup.models._presets import NAMED_CONFIGS

# isort: split
# The forward pass, KV cache and steering hook
from mup.models._transformer import (
    ForwardOutput,
    ForwardSteering,
    KVCache,
    forward,
    jit_forward,
    lm_head,
    site_activation,
)

# isort: split
# Parameters and device layout
from mup.models._params import init_params, param_shapes, params_from_hf
from mup.models._sharding import batch_sharding, make_mesh, param_partition_specs, shard_params

# isort: split
# Checkpoints and loading
from mup.models._checkpoint import CheckpointError, iter_hf_tensors, read_hf_config
from mup.models._loading import DTYPES, Model, load_model, load_params

# isort: split
# Generation: samplers, steering, the jitted loop and its reference
from mup.models._generate import (
    STEER_PHASES,
    STEER_POSITIONS,
    Generation,
    Steering,
    default_stop_tokens,
    generate,
    generate_reference,
)
from mup.models._padding import pad_tokens, token_positions
from mup.models._sampling import Greedy, Sampler, Temperature, TopP

__all__ = [
    "DTYPES",
    "NAMED_CONFIGS",
    "STEER_PHASES",
    "STEER_POSITIONS",
    "CheckpointError",
    "ForwardOutput",
    "Generation",
    "Greedy",
    "KVCache",
    "Model",
    "ModelConfig",
    "config_from_hf",
    "Sampler",
    "ForwardSteering",
    "Steering",
    "Temperature",
    "TopP",
    "UnsupportedConfigError",
    "batch_sharding",
    "default_stop_tokens",
    "forward",
    "generate",
    "generate_reference",
    "init_params",
    "iter_hf_tensors",
    "jit_forward",
    "lm_head",
    "load_model",
    "load_params",
    "make_mesh",
    "param_partition_specs",
    "pad_tokens",
    "param_shapes",
    "params_from_hf",
    "read_hf_config",
    "shard_params",
    "site_activation",
    "token_positions",
]
