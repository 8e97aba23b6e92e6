"""LLM monitors (prompted and finetuned), the score files every monitor writes, and the
probe -> LLM monitoring cascade.

from mup import monitors
scores = monitors.read_scores("runs/probe_scores.jsonl")
scores.evaluate()                     # monitor -> dataset -> AUROC, TPR@1%FPR, mean FLOPs, ...
rows = monitors.cascade_curve(scores, monitors.read_scores("runs/prompted_scores.jsonl"))
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

# The monitoring cascade: a first monitor escalates a fraction of records to a second.
from mup.monitors._cascade import (  # isort: skip
    DEFAULT_FRACTIONS,
    CascadeFileError,
    CascadeStrategy,
    cascade_curve,
    cascade_name,
    cascade_scores,
    read_cascade,
    write_cascade,
)

# Figure 1 (AUROC vs FLOPs), per-data-set bars, ROC curves and the metrics table.
from mup.monitors._figures import (  # isort: skip
    figure_main,
    make_figures,
    markdown_table,
    metrics_table,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "CascadeFileError",
    "CascadeStrategy",
    "ScoreFileError",
    "Scores",
    "block_matmul_params",
    "cascade_curve",
    "cascade_name",
    "cascade_scores",
    "figure_main",
    "label_of",
    "llm_flops",
    "make_figures",
    "markdown_table",
    "metrics_table",
    "probe_flops",
    "read_cascade",
    "read_scores",
    "score_row",
    "write_cascade",
    "write_scores",
]
