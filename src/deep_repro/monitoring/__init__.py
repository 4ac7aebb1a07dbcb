"""Monitoring: a served model's prediction log compared with its training data.

Owns the drift statistics and alarms (`drift`) and the HTML/JSON monitoring report (`report`).
"""

from deep_repro.monitoring.drift import (
    IMAGE_SUFFIXES,
    MMD_MAX_N,
    STAT_NAMES,
    Check,
    Features,
    Predictor,
    Reference,
    Report,
    features_from_images,
    features_from_log,
    image_stats,
    load_batch,
    load_npz,
    load_reference,
    log_files,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MMD_MAX_N",
    "STAT_NAMES",
    "Check",
    "Features",
    "Predictor",
    "Reference",
    "Report",
    "features_from_images",
    "features_from_log",
    "image_stats",
    "load_batch",
    "load_npz",
    "load_reference",
    "log_files",
]
