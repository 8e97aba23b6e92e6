"""An OpenAI-compatible server for a steered model, with per-request multipliers.

python -m mup.serve --model smollm2-135m --vector v.safetensors [--probe p.safetensors]

client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
client.chat.completions.create(model="smollm2-135m", messages=[...],
                               extra_body={"steer_multiplier": -1.5})

Concurrent requests (any mix of multipliers and max_tokens) are batched into one
`mup.models.generate` call with per-row multipliers; responses echo the applied
`steer_multiplier` and, with a probe, the prompt's `probe_score`.
"""

# Configuration and the command line
from mup.serve._config import ServeConfig, build_parser, parse_args

# isort: split
# Engine and dynamic batching
from mup.serve._engine import Batcher, Engine, Row, RowResult

# isort: split
# The HTTP application and the entry point
from mup.serve._app import create_app
from mup.serve._main import build_engine, main
from mup.serve._protocol import APIError

__all__ = [
    "APIError",
    "Batcher",
    "Engine",
    "Row",
    "RowResult",
    "ServeConfig",
    "build_engine",
    "build_parser",
    "create_app",
    "main",
    "parse_args",
]
