"""Steering vectors: difference of means (CAA) from stores or paired prompts, BiPO training,
behaviour sweeps across multipliers (`run_sweep`: perplexity, propensity, coherent range), and
LLM judges of steered answers (`judge_sweep`: rubric ratings, pairwise win rates, Bradley-Terry).

Words: a `block` is the decoder block whose OUTPUT a vector is added to (as
`mup.models.Steering(L, v)` does); a `layer` is a hidden_states index, as in stores and probes.
Block L's output is layer L + 1 (transformers' ``hidden_states[L + 1]``), so every vector built
here for block L is measured there (store layer L + 1, forward capture L + 1). The old keyword
``layer=`` (meaning the block) still works, with a DeprecationWarning.

res = dom_from_store("runs/stakes", block=11)             # reads store layer 12
res = dom_from_pairs(model, load_pairs(bundled_pairs_path()), 11, method="pca")
save_vector("v.safetensors", res.vector); v = load_vector("v.safetensors")
out = train_bipo(model, pairs_train, BiPOConfig(block=11), eval_pairs=pairs_test, out_dir="bipo")
by_block = train_bipo_blocks(model, pairs_train, BiPOConfig(block=0), [9, 11], out_dir="sweep")
sv = import_pt("vec_ep10_layer31.pt", block=31, model="llama-70b")    # the study's .pt files
rows = run_sweep(model, [SweepVector(name="v", vector=v)], prompts_from_pairs(pairs_test),
                 parse_multipliers("-4:4:2"), "sweep")       # appends sweep/sweep.jsonl
summary = summarise(rows); write_summary(summary, best_vectors(summary), "sweep")
plot_vector(summary, "v", "sweep/v.png")
"""

# Vector files
from mup.steering._vector import (
    REQUIRED_METADATA,
    SteeringVector,
    VectorFileError,
    load_vector,
    save_vector,
)

# isort: split
# Contrast / preference pairs
from mup.steering._pairs import (
    BUNDLED_PAIRS,
    EncodedPairs,
    PairsError,
    PreferencePair,
    bundled_pairs_path,
    encode_pairs,
    load_pairs,
    split_pairs,
    with_system_prompt,
)

# isort: split
# Difference of means
from mup.steering._dom import (
    PAIR_METHODS,
    DomResult,
    difference_vector,
    dom_from_pairs,
    dom_from_store,
    pooled_responses,
)

# isort: split
# BiPO training and margin evaluation (train_bipo_layers: the old name of train_bipo_blocks)
from mup.steering._bipo import (
    BiPOConfig,
    BiPOResult,
    evaluate_vector,
    pair_margins,
    response_logprobs,
    train_bipo,
    train_bipo_blocks,
    train_bipo_layers,
)

# isort: split
# torch .pt vector files (the BiPO study's), read without torch
from mup.steering._import import import_pt, read_pt

# isort: split
# Behaviour sweeps across multipliers (`mup steering sweep`)
from mup.steering._sweep import (
    DEFAULT_MULTIPLIERS,
    SweepPrompt,
    SweepVector,
    best_vectors,
    coherent_range,
    format_best,
    parse_multipliers,
    plot_best,
    plot_vector,
    prompts_from_pairs,
    prompts_from_records,
    run_sweep,
    summarise,
    with_zero,
    write_summary,
)

# isort: split
# LLM judges of steered answers (`mup steering judge`)
from mup.steering._judge import (
    BUNDLED_RUBRICS,
    JudgeConfig,
    JudgeError,
    JudgeSummary,
    Rubric,
    SweepError,
    SweepRow,
    bradley_terry,
    judge_sweep,
    load_rubric,
    load_sweep,
    wilson_interval,
)

__all__ = [
    "BUNDLED_PAIRS",
    "BUNDLED_RUBRICS",
    "DEFAULT_MULTIPLIERS",
    "PAIR_METHODS",
    "REQUIRED_METADATA",
    "BiPOConfig",
    "BiPOResult",
    "DomResult",
    "EncodedPairs",
    "JudgeConfig",
    "JudgeError",
    "JudgeSummary",
    "PairsError",
    "PreferencePair",
    "Rubric",
    "SteeringVector",
    "SweepError",
    "SweepPrompt",
    "SweepRow",
    "SweepVector",
    "VectorFileError",
    "best_vectors",
    "bradley_terry",
    "bundled_pairs_path",
    "coherent_range",
    "difference_vector",
    "dom_from_pairs",
    "dom_from_store",
    "encode_pairs",
    "evaluate_vector",
    "format_best",
    "import_pt",
    "judge_sweep",
    "load_pairs",
    "load_rubric",
    "load_sweep",
    "load_vector",
    "pair_margins",
    "parse_multipliers",
    "plot_best",
    "plot_vector",
    "pooled_responses",
    "prompts_from_pairs",
    "prompts_from_records",
    "read_pt",
    "response_logprobs",
    "run_sweep",
    "save_vector",
    "split_pairs",
    "summarise",
    "train_bipo",
    "train_bipo_blocks",
    "train_bipo_layers",
    "wilson_interval",
    "with_system_prompt",
    "with_zero",
    "write_summary",
]
