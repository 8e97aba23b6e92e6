"""LLM monitors (prompted and finetuned), the score files every monitor writes, and the
probe -> LLM monitoring cascade.

from mup import monitors
scores = monitors.read_scores("runs/probe_scores.jsonl")
scores.evaluate()                     # monitor -> dataset -> AUROC, TPR@1%FPR, mean FLOPs, ...
"""

# Score files: one per-record format for every monitor.
from mup.monitors._scores import (
    ScoreFileError,
    Scores,
    label_of,
    read_scores,
    score_row,
    write_scores,
)

# What a monitor costs per record (2 x matmul weights x tokens).
from mup.monitors._flops import block_matmul_params, llm_flops, probe_flops  # isort: skip

__all__ = [
    "ScoreFileError",
    "Scores",
    "block_matmul_params",
    "label_of",
    "llm_flops",
    "probe_flops",
    "read_scores",
    "score_row",
    "write_scores",
]
