"""Steering vectors: difference of means (CAA) from stores or paired prompts, BiPO training, and
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
    "SweepRow",
    "VectorFileError",
    "bradley_terry",
    "bundled_pairs_path",
    "difference_vector",
    "dom_from_pairs",
    "dom_from_store",
    "encode_pairs",
    "evaluate_vector",
    "import_pt",
    "judge_sweep",
    "load_pairs",
    "load_rubric",
    "load_sweep",
    "load_vector",
    "pair_margins",
    "pooled_responses",
    "read_pt",
    "response_logprobs",
    "save_vector",
    "split_pairs",
    "train_bipo",
    "train_bipo_blocks",
    "train_bipo_layers",
    "with_system_prompt",
    "wilson_interval",
]
