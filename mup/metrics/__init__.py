"""Metrics for probe scores (numpy, float64; match scikit-learn).

from mup import metrics
metrics.evaluate(probe.predict(data), data.labels)   # labels == -1 are excluded
"""

# Ranking metrics (scores may be logits or probabilities).
# Metrics on probabilities in [0, 1].
# Everything at once, excluding unlabelled (-1) records.
from mup.metrics._metrics import accuracy, auroc, brier, ece, evaluate, roc_curve, tpr_at_fpr

__all__ = ["accuracy", "auroc", "brier", "ece", "evaluate", "roc_curve", "tpr_at_fpr"]
