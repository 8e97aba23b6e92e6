"""One continuous-batching inference engine for serving, evals and batch jobs.

engine = Engine(model, vectors={"calm": (v, 12)}, probe=probe,
                config=EngineConfig(max_slots=16, max_len=2048)).start()
handle = engine.submit(Request(prompt_ids=ids, max_tokens=64, vector="calm", multiplier=-1.5,
                               temperature=0.7, seed=1, logprobs=True, top_logprobs=5))
for event in handle.events():        # tokens as they are decoded (async: `handle.stream()`)
    print(event.text, end="")
result = handle.result()             # text, token ids, logprobs, probe scores, finish reason

Rows decode in fixed slots of one KV cache; prompts are prefilled in length buckets (long ones
in chunks between decode steps) and join the running batch at the next step; every row has its
own steering vector and multiplier, sampler parameters, seed, stop tokens, budget and grammar,
and its output does not depend on what else runs.

JSON-constrained rows (llguidance matchers, one allowed-token mask per step):

grammar = json_schema_grammar({"type": "object", "properties": {"score": {"type": "integer"}},
                               "required": ["score"], "additionalProperties": False})
engine.submit(Request(prompt_ids=ids, max_tokens=32, grammar=grammar))   # or json_object_grammar()
"""

# Configuration and requests
from mup.engine._config import (
    MAX_TOP_LOGPROBS,
    EngineConfig,
    Request,
    Result,
    TokenEvent,
    TokenLogprob,
)

# isort: split
# Grammars that constrain a row's tokens
from mup.engine._grammar import Grammar, GrammarError, json_object_grammar, json_schema_grammar

# isort: split
# The engine, its handles and metrics
from mup.engine._engine import Engine, EngineClosed, Handle, check_probe, probe_site
from mup.engine._metrics import EngineMetrics

# isort: split
# Jitted building blocks
from mup.engine._steps import sample_rows

__all__ = [
    "MAX_TOP_LOGPROBS",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineMetrics",
    "Grammar",
    "GrammarError",
    "Handle",
    "Request",
    "Result",
    "TokenEvent",
    "TokenLogprob",
    "check_probe",
    "json_object_grammar",
    "json_schema_grammar",
    "probe_site",
    "sample_rows",
]
