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
    add_endpoint_args,
    open_endpoint,
    quiet_http_logs,
    usage_line,
)

# isort: split
# The structured request layer every LLM call goes through (also the steering judge's):
# response-format negotiation, validated answers, logprob reading, resumable JSONL logs
from mup.datagen._label import FORMAT_CHAIN, JsonlLog, ResponseFormat, messages_text
from mup.datagen._structured import (
    Negotiator,
    Refused,
    add_answer_args,
    choice_logprobs,
    first_valid,
    request_options,
    send,
    value_token,
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
    "FORMAT_CHAIN",
    "Agreement",
    "Answer",
    "Endpoint",
    "EndpointConfig",
    "EndpointError",
    "JsonlLog",
    "LabelConfig",
    "LabelError",
    "LabelSummary",
    "LocalServer",
    "Negotiator",
    "RateLimiter",
    "Refused",
    "ResponseFormat",
    "ScoreDistribution",
    "Usage",
    "add_answer_args",
    "add_endpoint_args",
    "agreement",
    "choice_logprobs",
    "cohen_kappa",
    "confusion_matrix",
    "find_rubric",
    "first_valid",
    "label_dataset",
    "messages_text",
    "open_endpoint",
    "parse_answer",
    "pooled_agreement",
    "quiet_http_logs",
    "rejects_path",
    "request_options",
    "resolve_context",
    "score_distribution",
    "send",
    "spearman",
    "system_prompt",
    "usage_line",
    "value_token",
]
