"""The inspect-ai capability harness across steering multipliers.

    python -m mup.evals run --suite offline --model mup/smollm2-135m --vector v.npy --block 12 \
        --multipliers -1,0,1 --limit 20 --log-dir logs
    python -m mup.evals aggregate --log-dir logs --out results.csv --plot scores.png

Importing this package registers the inspect model provider `mup/<spec>` (in-process steered
generation and log-likelihood scoring, rows batched across samples and multipliers) and the
offline tasks, among them the log-likelihood multiple-choice ones (acc and acc_norm):

    python -m mup.evals run --suite offline-mc --model mup/smollm2-135m --vector v.safetensors \
        --multipliers -3,-2,-1,0,1,2,3 --log-dir logs-mc
"""

# The inspect model provider and steering vector files
from mup.evals._provider import MupModelAPI, load_vector

# isort: split
# Offline tasks and their scorers
from mup.evals._tasks import (
    OFFLINE_TASKS,
    extract_choice,
    extract_code,
    extract_final_number,
    gsm8k_match,
    gsm8k_offline,
    hub_mc_ll,
    humaneval_check,
    humaneval_offline,
    is_refusal,
    load_mc_items,
    mc_easy_ll,
    mc_general,
    mc_general_ll,
    mc_letter,
    refusal_scorer,
    xstest_offline,
)

# isort: split
# Log-likelihood multiple choice (solver, scorer, the echo route) and the HumanEval sandbox
from mup.evals._loglik import EchoRoute, continuation_route, loglik_choice, loglik_choices
from mup.evals._sandbox import RunResult, run_contained

# isort: split
# Suites (configs/benchmarks.yaml) and the OpenAI route for deployed servers
from mup.evals._deployments import Deployment, read_deployments
from mup.evals._errors import SuiteError, TaskUnavailable
from mup.evals._suite import BenchmarkSpec, SuiteConfig, build_task, load_suites

# isort: split
# Running across multipliers and aggregating
from mup.evals._aggregate import COLUMNS, aggregate, collect, plot, write_csv
from mup.evals._runner import RunConfig, find_successful_log, parse_multipliers, run_suite

__all__ = [
    "COLUMNS",
    "EchoRoute",
    "RunResult",
    "TaskUnavailable",
    "continuation_route",
    "extract_code",
    "hub_mc_ll",
    "humaneval_check",
    "humaneval_offline",
    "loglik_choice",
    "loglik_choices",
    "mc_easy_ll",
    "mc_general_ll",
    "run_contained",
    "OFFLINE_TASKS",
    "BenchmarkSpec",
    "Deployment",
    "MupModelAPI",
    "RunConfig",
    "SuiteConfig",
    "SuiteError",
    "aggregate",
    "build_task",
    "collect",
    "extract_choice",
    "extract_final_number",
    "find_successful_log",
    "gsm8k_match",
    "gsm8k_offline",
    "is_refusal",
    "load_mc_items",
    "load_suites",
    "load_vector",
    "mc_general",
    "mc_letter",
    "parse_multipliers",
    "plot",
    "read_deployments",
    "refusal_scorer",
    "run_suite",
    "write_csv",
    "xstest_offline",
]
