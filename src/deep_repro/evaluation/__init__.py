"""Metrics: accuracy with confidence intervals, macro-F1, calibration, McNemar's test, the
evaluation report's tables and figures.
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

__all__ = [
    "ClassificationReport",
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
    "wilson_interval",
]
