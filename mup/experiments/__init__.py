"""Probe experiments: comparison across probe kinds, layer sweep, data efficiency, calibration,
dev-split training and the generalisation heatmap.

from mup import experiments
rows = experiments.compare(train_store, {"anthropic": dev_store}, layer=20, val=val_store)
print(experiments.markdown_table(rows))

Each experiment also runs end to end (extraction included) from `python -m mup.probes ...`.
"""

# Probe comparison (every kind, out-of-distribution dev sets).
from mup.experiments._compare import (  # isort: skip
    CompareConfig,
    CompareRow,
    compare,
    markdown_table,
    plot_compare,
    run_compare,
)

# Layer sweep with k-fold cross-validation grouped by pair_id.
from mup.experiments._sweep import (  # isort: skip
    SweepConfig,
    SweepRow,
    grouped_folds,
    plot_sweep,
    run_sweep,
    sweep,
)

# Data efficiency: AUROC against training-set size.
from mup.experiments._efficiency import (  # isort: skip
    EfficiencyConfig,
    EfficiencyRow,
    efficiency,
    plot_efficiency,
    run_efficiency,
    stratified_subsample,
)

# Calibration against the 1-10 stakes score.
from mup.experiments._calibration import (  # isort: skip
    CalibrationConfig,
    calibration,
    plot_calibration,
    reliability_bins,
    run_calibration,
    scale_bins,
    spearman,
)

# Dev-split training: k records of the target dev set (alone, added, or to fine-tune).
from mup.experiments._devsplit import (  # isort: skip
    MODES,
    DevParts,
    DevsplitConfig,
    DevsplitRow,
    dev_parts,
    devsplit,
    plan_ks,
    plot_devsplit,
    run_devsplit,
)

# Generalisation heatmap across one variation field of the synthetic set.
from mup.experiments._heatmap import (  # isort: skip
    FIELDS,
    Heatmap,
    HeatmapConfig,
    HeatmapRow,
    heatmap,
    plot_heatmap,
    run_heatmap,
)

# Shared pieces (the figure helpers serve mup.monitors' figures too).
from mup.experiments._common import (  # isort: skip
    DEV_SETS,
    ExtractOptions,
    new_figure,
    record_field,
    save_figure,
)

__all__ = [
    "DEV_SETS",
    "FIELDS",
    "MODES",
    "CalibrationConfig",
    "CompareConfig",
    "CompareRow",
    "DevParts",
    "DevsplitConfig",
    "DevsplitRow",
    "EfficiencyConfig",
    "EfficiencyRow",
    "ExtractOptions",
    "Heatmap",
    "HeatmapConfig",
    "HeatmapRow",
    "SweepConfig",
    "SweepRow",
    "calibration",
    "compare",
    "dev_parts",
    "devsplit",
    "efficiency",
    "grouped_folds",
    "heatmap",
    "markdown_table",
    "new_figure",
    "plan_ks",
    "plot_calibration",
    "plot_compare",
    "plot_devsplit",
    "plot_efficiency",
    "plot_heatmap",
    "plot_sweep",
    "record_field",
    "reliability_bins",
    "run_calibration",
    "run_compare",
    "run_devsplit",
    "run_efficiency",
    "run_heatmap",
    "run_sweep",
    "save_figure",
    "scale_bins",
    "spearman",
    "stratified_subsample",
    "sweep",
]
