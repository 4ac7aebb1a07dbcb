"""The registry's "sklearn" trainer: multinomial logistic regression, served as a torch module."""

from __future__ import annotations

import logging

import numpy as np
import torch

from deep_repro.config.schema import (
    Config,
)
from deep_repro.models import LogRegConfig
from deep_repro.models.registry import build_model
from deep_repro.training.augment import normalise
from deep_repro.training.device import seed_everything
from deep_repro.training.protocol import (
    EpochCallback,
    EpochMetrics,
    TrainResult,
    evaluate_logits,
    logit_metrics,
)

log = logging.getLogger(__name__)


def fit_logreg(
    cfg: Config,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Multinomial logistic regression (scikit-learn, lbfgs) on standardised pixels.

    The fitted coefficients become the weights of the equivalent `models.linear_classifier()`:
    the scikit-learn model is kept as arrays (no pickle) and served through the same inference
    path as the networks. One "epoch" = the whole lbfgs fit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    assert isinstance(cfg.model, LogRegConfig)
    seed_everything(cfg.seed, num_threads=cfg.train.num_threads)
    features = normalise(torch.from_numpy(x_train)).flatten(1).numpy()
    clf = LogisticRegression(
        C=cfg.model.C, max_iter=cfg.model.max_iter, random_state=cfg.seed, tol=1e-4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(features, y_train)
    converged = clf.n_iter_[0] < cfg.model.max_iter
    if not converged:
        log.warning("logreg stopped at model.max_iter = %d before converging", cfg.model.max_iter)
    model = build_model(cfg.model)
    model.load_state_dict(
        {
            "1.weight": torch.from_numpy(clf.coef_.astype(np.float32)),
            "1.bias": torch.from_numpy(clf.intercept_.astype(np.float32)),
        }
    )
    train_loss, train_accuracy = logit_metrics(
        evaluate_logits(model, torch.from_numpy(x_train)),
        torch.from_numpy(y_train.astype(np.int64)),
    )
    val_loss, val_accuracy = logit_metrics(
        evaluate_logits(model, torch.from_numpy(x_val)), torch.from_numpy(y_val.astype(np.int64))
    )
    metrics = EpochMetrics(
        step=1,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        lr=0.0,
    )
    if on_epoch is not None:
        on_epoch(metrics)
    log.info(
        "logreg: %d lbfgs iterations, train acc %.4f, val acc %.4f",
        clf.n_iter_[0],
        metrics.train_accuracy,
        metrics.val_accuracy,
    )
    return TrainResult(
        model=model,
        history=[metrics],
        best_epoch=1,
        best_val_accuracy=metrics.val_accuracy,
        stop_reason=f"lbfgs {'converged' if converged else 'hit model.max_iter'} "
        f"after {clf.n_iter_[0]} iterations",
    )
