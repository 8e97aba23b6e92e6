"""LLM monitors (prompted and finetuned), the score files every monitor writes, and the
probe -> LLM monitoring cascade.

from mup import monitors
scores = monitors.read_scores("runs/probe_scores.jsonl")
scores.evaluate()                     # monitor -> dataset -> AUROC, TPR@1%FPR, mean FLOPs, ...
rows = monitors.cascade_curve(scores, monitors.read_scores("runs/prompted_scores.jsonl"))

result = monitors.finetune(model, train, val, "runs/ft", monitors.FinetuneConfig())
monitors.score_records(result.checkpoint.parent, records, dataset="dev/mt", out="mt.jsonl")
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

# isort: split
# The finetuned baseline: the LLM trained as a classifier (LoRA or full), and its scores.
from mup.monitors._finetune import (
    FinetuneCheckpointError,
    FinetuneConfig,
    Finetuned,
    FinetuneResult,
    check_training_data,
    classifier_logits,
    finetune,
    head_flops,
    init_head,
    last_token_index,
    load_finetuned,
    score_records,
)
from mup.monitors._finetune import monitor_name as finetuned_monitor_name
from mup.monitors._lora import LORA_TARGETS, LoraConfig, init_lora, lora_shapes, merge_lora

__all__ = [
    "DEFAULT_FRACTIONS",
    "LORA_TARGETS",
    "CascadeFileError",
    "CascadeStrategy",
    "FinetuneCheckpointError",
    "FinetuneConfig",
    "FinetuneResult",
    "Finetuned",
    "LoraConfig",
    "ScoreFileError",
    "Scores",
    "block_matmul_params",
    "cascade_curve",
    "cascade_name",
    "cascade_scores",
    "check_training_data",
    "classifier_logits",
    "figure_main",
    "finetune",
    "finetuned_monitor_name",
    "head_flops",
    "init_head",
    "init_lora",
    "label_of",
    "last_token_index",
    "llm_flops",
    "load_finetuned",
    "lora_shapes",
    "make_figures",
    "markdown_table",
    "merge_lora",
    "metrics_table",
    "probe_flops",
    "read_cascade",
    "read_scores",
    "score_records",
    "score_row",
    "write_cascade",
    "write_scores",
]
