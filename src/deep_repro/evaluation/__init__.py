"""Metrics: accuracy with confidence intervals, macro-F1, calibration, McNemar's test, the
evaluation report's tables and figures, and the per-image predictions file every check reads.
"""

from deep_repro.evaluation.metrics import (
    ClassificationReport,
    classification_report,
    confusion_figure,
    confusion_matrix,
    expected_calibration_error,
    mcnemar_p_value,
    misclassified_figure,
    per_class_rows,
    prediction_rows,
    reliability_figure,
    reliability_rows,
    softmax,
    wilson_interval,
)
from deep_repro.evaluation.predictions import (
    Predictions,
    SplitPredictions,
    split_predictions,
)

__all__ = [
    "ClassificationReport",
    "Predictions",
    "SplitPredictions",
    "classification_report",
    "confusion_figure",
    "confusion_matrix",
    "expected_calibration_error",
    "mcnemar_p_value",
    "misclassified_figure",
    "per_class_rows",
    "prediction_rows",
    "reliability_figure",
    "reliability_rows",
    "softmax",
    "split_predictions",
    "wilson_interval",
]
