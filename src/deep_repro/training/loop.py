"""Training protocol (config groups `train`, `optimizer`, `scheduler`, `augment`).

Speed without magic: the whole split lives on the target device as uint8 tensors; a batch is
an index into it, augmented and normalised as one tensor on the device. There is no per-sample
`Dataset.__getitem__`, no PIL and no worker process in the loop (see benchmarks/).

Reproducibility: one seed feeds python/numpy/torch and a dedicated generator for batch order and
augmentation; deterministic kernels and a fixed thread count make two runs on one machine
produce byte-identical checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deep_repro.config.model_base import TorchModelConfig
from deep_repro.config.schema import AugmentConfig, Config
from deep_repro.errors import TrainingError
from deep_repro.models.registry import build_model, get_spec
from deep_repro.training.augment import augment_batch, normalise
from deep_repro.training.device import (
    autocast_dtype,
    keep_freed_memory,
    resolve_device,
    seed_everything,
)
from deep_repro.training.optim import build_optimizer, build_scheduler
from deep_repro.training.protocol import (
    EpochCallback,
    EpochMetrics,
    TrainResult,
    evaluate_logits,
    logit_metrics,
)

log = logging.getLogger(__name__)


def check_trainable(cfg: Config, n_train: int) -> None:
    """Reject a configuration that cannot train, before any work is done."""
    if cfg.train.batch_size > n_train:
        raise TrainingError(
            f"train.batch_size = {cfg.train.batch_size} exceeds the {n_train} training images"
        )


def torch_model_config(cfg: Config) -> TorchModelConfig:
    """`cfg.model` as a network's config (with `lr`), or a TrainingError for other kinds."""
    if not isinstance(cfg.model, TorchModelConfig):
        raise TrainingError(
            f"model = {cfg.model.name} is not trained by gradient descent; use training.train_model"
        )
    return cfg.model


# --------------------------------------------------------------------------- one step, one epoch
@dataclass
class Stepper:
    """The moving parts of one gradient-descent run; `fit` and benchmarks/ share them."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    loss_fn: nn.Module
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    lr: float
    # The moving average of the weights (train.ema_decay > 0), updated after every step.
    ema: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def kept(self) -> nn.Module:
        """The network that is validated, kept and exported: the average if there is one."""
        return self.model if self.ema is None else self.ema.module


def make_stepper(
    cfg: Config, model: nn.Module, device: torch.device, epochs: int, steps_per_epoch: int
) -> Stepper:
    """Move `model` to the device (and memory format) and build optimizer, schedule and loss."""
    tc = cfg.train
    lr = torch_model_config(cfg).lr
    channels_last = tc.channels_last and get_spec(cfg.model.name).channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), cfg.optimizer, lr)
    ema = None
    if tc.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # use_buffers: BatchNorm's running statistics are averaged with the weights, so the
        # averaged net needs no extra pass over the data to re-estimate them.
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True
        )
    return Stepper(
        model=model,
        opt=opt,
        sched=build_scheduler(opt, cfg.scheduler, lr, epochs, steps_per_epoch),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        device=device,
        amp=autocast_dtype(tc, device),
        channels_last=channels_last,
        lr=lr,
        ema=ema,
    )


def device_batch(
    st: Stepper,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    augment: AugmentConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch from the on-device split: index, augment, normalise (as one tensor)."""
    xb = normalise(augment_batch(x_u8[idx], augment, gen))
    if st.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, y[idx]


def train_step(
    st: Stepper, xb: torch.Tensor, yb: torch.Tensor, on_phase: Callable[[str], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, optimizer and scheduler step on one batch; returns (loss, logits).

    `on_phase("forward" | "backward" | "optim")` is called as each phase ends (benchmarks time
    the phases of this very code)."""
    with torch.autocast(st.device.type, dtype=st.amp or torch.float32, enabled=st.amp is not None):
        logits = st.model(xb)
        loss = st.loss_fn(logits.float(), yb)
    if on_phase is not None:
        on_phase("forward")
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    if on_phase is not None:
        on_phase("backward")
    st.opt.step()
    if st.sched is not None:
        st.sched.step()
    if st.ema is not None:
        st.ema.update_parameters(st.model)
    if on_phase is not None:
        on_phase("optim")
    return loss, logits


class RunningTotals:
    """Loss and accuracy of the batches of an epoch, summed on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.correct += (logits.argmax(1) == yb).sum()
        self.steps += 1

    def check_finite(self, epoch: int, lr: float) -> float:
        """The running mean loss (a device sync); TrainingError if training diverged."""
        running = self.loss_sum.item() / self.steps
        if not math.isfinite(running):
            raise TrainingError(
                f"training diverged: loss is {running} at epoch {epoch}, "
                f"step {self.steps}; lower model.lr (now {lr}) or change "
                "the optimizer — no model was written"
            )
        return running


def train_epoch(
    st: Stepper,
    xt: torch.Tensor,
    yt: torch.Tensor,
    *,
    batch_size: int,
    augment: AugmentConfig,
    gen: torch.Generator,
    epoch: int,
    desc: str = "",
    progress: bool = True,
) -> RunningTotals:
    """One pass over a fresh permutation of the split, in full batches."""
    from tqdm import tqdm

    st.model.train()
    n = len(yt)
    # Drop the last incomplete batch: BatchNorm statistics from a handful of samples are noise.
    steps = n // batch_size
    check_every = 1 if st.device.type == "cpu" else 25
    perm = torch.randperm(n, generator=gen, device=st.device)
    totals = RunningTotals(st.device)
    bar = tqdm(
        range(steps), desc=desc, leave=False, disable=not progress, mininterval=1.0, unit="batch"
    )
    for step in bar:
        idx = perm[step * batch_size : (step + 1) * batch_size]
        xb, yb = device_batch(st, xt, yt, idx, augment, gen)
        loss, logits = train_step(st, xb, yb)
        totals.add(loss, logits, yb)
        if (step + 1) % check_every == 0 or step + 1 == steps:
            running = totals.check_finite(epoch, st.lr)
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    bar.close()
    return totals


def epoch_metrics(
    st: Stepper,
    epoch: int,
    totals: RunningTotals,
    batch_size: int,
    xv: torch.Tensor,
    yv: torch.Tensor,
) -> EpochMetrics:
    """Train metrics of the epoch's batches and validation metrics of the model now."""
    val_loss, val_accuracy = logit_metrics(
        evaluate_logits(st.kept, xv, channels_last=st.channels_last, amp=st.amp), yv
    )
    return EpochMetrics(
        step=epoch,
        train_loss=totals.loss_sum.item() / totals.steps,
        train_accuracy=totals.correct.item() / (totals.steps * batch_size),
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        lr=st.opt.param_groups[0]["lr"],
    )


# --------------------------------------------------------------------------- the loop
def fit(
    cfg: Config,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    on_epoch: EpochCallback | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the configured torch model; returns it with the best-val-accuracy weights."""
    tc = cfg.train
    epochs = epochs or tc.epochs
    torch_model_config(cfg)
    check_trainable(cfg, len(y_train))
    device = resolve_device(tc)
    seed_everything(cfg.seed, deterministic=tc.deterministic, num_threads=tc.num_threads)
    keep_freed_memory()  # every step reuses the last step's activation memory (no page faults)
    st = make_stepper(cfg, build_model(cfg.model), device, epochs, len(y_train) // tc.batch_size)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    xt = torch.from_numpy(x_train).to(device)
    yt = torch.from_numpy(y_train.astype(np.int64)).to(device)
    xv = torch.from_numpy(x_val).to(device)
    yv = torch.from_numpy(y_val.astype(np.int64)).to(device)

    result = TrainResult(model=st.model, device=str(device))
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    result.stop_reason = f"completed {epochs} epochs"
    for epoch in range(1, epochs + 1):
        totals = train_epoch(
            st,
            xt,
            yt,
            batch_size=tc.batch_size,
            augment=cfg.augment,
            gen=gen,
            epoch=epoch,
            desc=f"epoch {epoch}/{epochs}",
            progress=progress,
        )
        metrics = epoch_metrics(st, epoch, totals, tc.batch_size, xv, yv)
        result.history.append(metrics)
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e",
            epoch,
            epochs,
            metrics.train_loss,
            metrics.train_accuracy,
            metrics.val_loss,
            metrics.val_accuracy,
            metrics.lr,
        )
        if on_epoch is not None:
            on_epoch(metrics)
        if metrics.val_accuracy > result.best_val_accuracy:
            result.best_val_accuracy = metrics.val_accuracy
            result.best_epoch = epoch
            best_state = copy.deepcopy(st.kept.state_dict())
            bad_epochs = 0
        else:
            bad_epochs += 1
            if tc.patience and bad_epochs >= tc.patience:
                result.stop_reason = (
                    f"early stop at epoch {epoch}: val accuracy did not "
                    f"improve for {tc.patience} epochs"
                )
                break
    if best_state is not None:
        st.model.load_state_dict(best_state)
    st.model.eval()
    return result


def train_model(
    cfg: Config,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    on_epoch: EpochCallback | None = None,
    epochs: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train whichever architecture `cfg.model` names, with the trainer its registry entry names.

    `epochs` replaces train.epochs (a tuning trial trains for tune.epochs); `progress` shows
    the per-batch bar. Both concern epoch-wise (torch) training only: logreg is one lbfgs fit.
    `on_epoch` may raise (e.g. `optuna.TrialPruned`) to stop training.
    """
    if get_spec(cfg.model.name).trainer == "sklearn":
        from deep_repro.training.logreg import fit_logreg  # the registry's "sklearn" trainer

        return fit_logreg(cfg, x_train, y_train, x_val, y_val, on_epoch=on_epoch)
    return fit(
        cfg, x_train, y_train, x_val, y_val, on_epoch=on_epoch, epochs=epochs, progress=progress
    )
