"""An OpenAI-compatible server over the continuous-batching engine: plain, or steered by any
number of named vectors, with per-request multipliers.

mup serve --model smollm2-135m [--vector [NAME=]FILE ...] [--probe p.safetensors]

client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
client.chat.completions.create(model="smollm2-135m", messages=[...],
                               extra_body={"steer_vector": "calm", "steer_multiplier": -1.5})

Concurrent requests (any mix of vectors, multipliers, samplers and max_tokens) decode together
in the slots of one `mup.engine.Engine`; tokens stream as they are decoded; responses echo the
applied `steer_multiplier` and, with a probe, the prompt's `probe_score` from the same prefill.
"""

# Configuration and the command line
from mup.serve._cli import build_parser, main, parse_args
from mup.serve._config import ServeConfig

# isort: split
# Loading: the command line's files, the model and the engine
from mup.serve._load import build_engine, check_files

# isort: split
# The HTTP application
from mup.serve._protocol import APIError
from mup.serve._routes import create_app

__all__ = [
    "APIError",
    "ServeConfig",
    "build_engine",
    "build_parser",
    "check_files",
    "create_app",
    "main",
    "parse_args",
]
