"""Training protocol: from a split and a config to a trained checkpoint.

Owns the epoch loop (`loop`), the scikit-learn trainer of logistic regression (`logreg`), data
augmentation (`augment`), optimisers and schedules (`optim`), device, seeding and determinism
(`device`) and what one training run reports (`protocol`).
"""

from deep_repro.training.augment import augment_batch
from deep_repro.training.device import (
    keep_freed_memory,
    resolve_device,
    resolve_num_threads,
    seed_everything,
)
from deep_repro.training.loop import (
    RunningTotals,
    Stepper,
    check_trainable,
    device_batch,
    epoch_metrics,
    fit,
    make_stepper,
    torch_model_config,
    train_epoch,
    train_model,
    train_step,
)
from deep_repro.training.protocol import (
    EpochCallback,
    EpochMetrics,
    TrainResult,
    TTAChoice,
    choose_tta,
    evaluate_logits,
    logit_metrics,
)

__all__ = [
    "EpochCallback",
    "EpochMetrics",
    "RunningTotals",
    "Stepper",
    "TTAChoice",
    "TrainResult",
    "augment_batch",
    "check_trainable",
    "choose_tta",
    "device_batch",
    "epoch_metrics",
    "evaluate_logits",
    "fit",
    "keep_freed_memory",
    "logit_metrics",
    "make_stepper",
    "resolve_device",
    "resolve_num_threads",
    "seed_everything",
    "torch_model_config",
    "train_epoch",
    "train_model",
    "train_step",
]
