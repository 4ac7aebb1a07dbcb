"""Optimisers and learning-rate schedules (config groups `optimizer` and `scheduler`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from deep_repro.config.schema import (
    AdamWConfig,
    CosineConfig,
    OneCycleConfig,
    OptimizerConfig,
    SchedulerConfig,
    SGDConfig,
)
from deep_repro.errors import TrainingError


def build_optimizer(params: Any, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if isinstance(cfg, AdamWConfig):
        return torch.optim.AdamW(
            params, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.betas[0], cfg.betas[1])
        )
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    raise TrainingError(f"optimizer.name = {cfg.name!r} unknown")  # pragma: no cover


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: SchedulerConfig, lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedulers (stepped after every batch)."""
    total = epochs * steps_per_epoch
    if isinstance(cfg, OneCycleConfig):
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=cfg.pct_start
        )
    if isinstance(cfg, CosineConfig):
        warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return None
