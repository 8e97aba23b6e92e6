"""Synthetic data generation and LLM labelling through any OpenAI-compatible endpoint.

with open_endpoint(EndpointConfig(serve="smollm2-135m")) as endpoint:
    summary = label_dataset(endpoint, load_records(path), "labelled.jsonl",
                            LabelConfig(rubric=find_rubric().read_text()))
print(agreement(load_records("labelled.jsonl"), load_records(path)).kappa)

On the command line: `mup data` (mup.datagen._cli; `python -m mup.datagen`), whose label,
relabel, generate and agreement subcommands are in mup.datagen._llm_cli.
"""

# Endpoints: the openai client, a rate limit, accounting, a local `mup serve`
from mup.datagen._endpoint import (
    Endpoint,
    EndpointConfig,
    EndpointError,
    LocalServer,
    RateLimiter,
    Usage,
    open_endpoint,
)

# isort: split
# The rubric labeller
from mup.datagen._label import (
    CONTEXTS,
    Answer,
    LabelConfig,
    LabelError,
    LabelSummary,
    ScoreDistribution,
    find_rubric,
    label_dataset,
    parse_answer,
    rejects_path,
    resolve_context,
    score_distribution,
    system_prompt,
)

# isort: split
# Agreement between labellings
from mup.datagen._agreement import (
    Agreement,
    agreement,
    cohen_kappa,
    confusion_matrix,
    pooled_agreement,
    spearman,
)

__all__ = [
    "CONTEXTS",
    "Agreement",
    "Answer",
    "Endpoint",
    "EndpointConfig",
    "EndpointError",
    "LabelConfig",
    "LabelError",
    "LabelSummary",
    "LocalServer",
    "RateLimiter",
    "ScoreDistribution",
    "Usage",
    "agreement",
    "cohen_kappa",
    "confusion_matrix",
    "find_rubric",
    "label_dataset",
    "open_endpoint",
    "parse_answer",
    "pooled_agreement",
    "rejects_path",
    "resolve_context",
    "score_distribution",
    "spearman",
    "system_prompt",
]
