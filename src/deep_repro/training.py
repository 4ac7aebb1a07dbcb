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
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deep_repro.config import (
    AugmentConfig,
    Config,
    LogRegConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)
from deep_repro.errors import TrainingError
from deep_repro.models import PIXEL_MEAN, PIXEL_STD, build_model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- environment
def seed_everything(seed: int, *, deterministic: bool = True, num_threads: int | None = None
                    ) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (must be set before first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        # Deterministic mode also NaN-fills every new tensor (20-35% of CPU time in a CNN
        # profile); nothing here reads uninitialised memory, so skip the fill.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(train: TrainConfig) -> torch.device:
    """`auto` -> cuda if available else cpu; an explicit CUDA request without CUDA is an error."""
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"train.device = {train.device!r} but CUDA is not available on "
                                "this machine; use 'auto' or 'cpu'")
        index = int(train.device.split(":")[1]) if ":" in train.device else 0
        if index >= torch.cuda.device_count():
            raise TrainingError(f"train.device = {train.device!r} but only "
                                f"{torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(train.device)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (fast, no loss scaling needed); fp32 on CPU."""
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------- batches on device
def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] or [N,1,28,28] -> float [N,1,28,28], standardised."""
    x = images_u8.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random translation (crop of a zero-padded image), horizontal flip, random erasing, done
    on a whole uint8 batch `[N, 28, 28]` at once on its device. Clothing stays clothing when
    mirrored, so flips are label-preserving here (they would not be for digits)."""
    if cfg.name == "none":
        return x
    n, h, w = x.shape
    dev = x.device
    if cfg.crop_padding > 0:
        p = cfg.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, :, None]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, :]
        x = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]
    if cfg.hflip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    if cfg.random_erasing > 0:
        erase = torch.rand(n, generator=gen, device=dev) < cfg.random_erasing
        size = torch.randint(4, 13, (n, 2), generator=gen, device=dev)
        top = (torch.rand(n, generator=gen, device=dev) * (h - size[:, 0] + 1)).long()
        left = (torch.rand(n, generator=gen, device=dev) * (w - size[:, 1] + 1)).long()
        r = torch.arange(h, device=dev)[None, :, None]
        c = torch.arange(w, device=dev)[None, None, :]
        box = ((r >= top[:, None, None]) & (r < (top + size[:, 0])[:, None, None])
               & (c >= left[:, None, None]) & (c < (left + size[:, 1])[:, None, None]))
        x = x.masked_fill(box & erase[:, None, None], 0)
    return x


# --------------------------------------------------------------------------- optimisation
def build_optimizer(params: Any, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay,
                                 betas=(cfg.betas[0], cfg.betas[1]))
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise TrainingError(f"optimizer.name = {cfg.name!r} unknown")  # pragma: no cover


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedulerConfig, lr: float, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedulers (stepped after every batch)."""
    total = epochs * steps_per_epoch
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                   pct_start=cfg.pct_start)
    if cfg.name == "cosine":
        warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return None


# --------------------------------------------------------------------------- the loop
@dataclass
class EpochMetrics:
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float

    def as_dict(self) -> dict[str, float]:
        return {"train_loss": self.train_loss, "train_accuracy": self.train_accuracy,
                "val_loss": self.val_loss, "val_accuracy": self.val_accuracy, "lr": self.lr}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stop_reason: str = ""
    device: str = "cpu"


EpochCallback = Callable[[EpochMetrics], None]


@torch.no_grad()
def evaluate_logits(model: nn.Module, x_u8: torch.Tensor, batch_size: int = 1024, *,
                    channels_last: bool = False, amp: torch.dtype | None = None) -> torch.Tensor:
    """Logits of a training-space model (float input) over uint8 images, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch_size):
        xb = normalise(x_u8[start:start + batch_size])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out.append(model(xb).float())
    return torch.cat(out) if out else torch.empty(0, 10)


def check_trainable(cfg: Config, n_train: int) -> None:
    """Reject a configuration that cannot train, before any work is done."""
    if cfg.train.batch_size > n_train:
        raise TrainingError(f"train.batch_size = {cfg.train.batch_size} exceeds the "
                            f"{n_train} training images")


def fit(cfg: Config, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
        y_val: np.ndarray, *, on_epoch: EpochCallback | None = None, epochs: int | None = None,
        progress: bool = True) -> TrainResult:
    """Train the configured torch model; returns it with the best-val-accuracy weights."""
    from tqdm import tqdm

    tc = cfg.train
    epochs = epochs or tc.epochs
    check_trainable(cfg, len(y_train))
    device = resolve_device(tc)
    seed_everything(cfg.seed, deterministic=tc.deterministic, num_threads=tc.num_threads)
    amp = autocast_dtype(tc, device)
    model = build_model(cfg.model).to(device)
    conv = cfg.model.name in ("cnn", "resnet")
    channels_last = tc.channels_last and conv
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.model.lr  # type: ignore[union-attr]
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    xt = torch.from_numpy(x_train).to(device)
    yt = torch.from_numpy(y_train.astype(np.int64)).to(device)
    xv = torch.from_numpy(x_val).to(device)
    yv = torch.from_numpy(y_val.astype(np.int64)).to(device)
    n = len(yt)
    # Drop the last incomplete batch: BatchNorm statistics from a handful of samples are noise.
    steps = n // tc.batch_size
    opt = build_optimizer(model.parameters(), cfg.optimizer, lr)
    sched = build_scheduler(opt, cfg.scheduler, lr, epochs, steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    check_every = 1 if device.type == "cpu" else 25

    result = TrainResult(model=model, device=str(device))
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    result.stop_reason = f"completed {epochs} epochs"
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress,
                   mininterval=1.0, unit="batch")
        for step in bar:
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            xb = normalise(augment_batch(xt[idx], cfg.augment, gen))
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = yt[idx]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(xb)
                loss = loss_fn(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == yb).sum()
            if (step + 1) % check_every == 0 or step + 1 == steps:
                running = loss_sum.item() / (step + 1)
                if not math.isfinite(running):
                    raise TrainingError(f"training diverged: loss is {running} at epoch {epoch}, "
                                        f"step {step + 1}; lower model.lr (now {lr}) or change "
                                        "the optimizer — no model was written")
                if (step + 1) % 10 == 0:
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        bar.close()
        val_logits = evaluate_logits(model, xv, channels_last=channels_last, amp=amp)
        metrics = EpochMetrics(
            step=epoch,
            train_loss=loss_sum.item() / steps,
            train_accuracy=correct.item() / (steps * tc.batch_size),
            val_loss=nn.functional.cross_entropy(val_logits, yv).item(),
            val_accuracy=(val_logits.argmax(1) == yv).float().mean().item(),
            lr=opt.param_groups[0]["lr"],
        )
        result.history.append(metrics)
        log.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e",
                 epoch, epochs, metrics.train_loss, metrics.train_accuracy, metrics.val_loss,
                 metrics.val_accuracy, metrics.lr)
        if on_epoch is not None:
            on_epoch(metrics)
        if metrics.val_accuracy > result.best_val_accuracy:
            result.best_val_accuracy = metrics.val_accuracy
            result.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            bad_epochs = 0
        else:
            bad_epochs += 1
            if tc.patience and bad_epochs >= tc.patience:
                result.stop_reason = (f"early stop at epoch {epoch}: val accuracy did not "
                                      f"improve for {tc.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


# --------------------------------------------------------------------------- logistic regression
def fit_logreg(cfg: Config, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
               y_val: np.ndarray, *, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Multinomial logistic regression (scikit-learn, lbfgs) on standardised pixels.

    The fitted coefficients become the weights of the equivalent `models.linear_classifier()`:
    the scikit-learn model is kept as arrays (no pickle) and served through the same inference
    path as the networks. One "epoch" = the whole lbfgs fit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from deep_repro.models import linear_classifier

    assert isinstance(cfg.model, LogRegConfig)
    seed_everything(cfg.seed, num_threads=cfg.train.num_threads)
    features = normalise(torch.from_numpy(x_train)).flatten(1).numpy()
    clf = LogisticRegression(C=cfg.model.C, max_iter=cfg.model.max_iter, random_state=cfg.seed,
                             tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(features, y_train)
    converged = clf.n_iter_[0] < cfg.model.max_iter
    if not converged:
        log.warning("logreg stopped at model.max_iter = %d before converging", cfg.model.max_iter)
    model = linear_classifier()
    model.load_state_dict({"1.weight": torch.from_numpy(clf.coef_.astype(np.float32)),
                           "1.bias": torch.from_numpy(clf.intercept_.astype(np.float32))})
    y_t = torch.from_numpy(y_train.astype(np.int64))
    y_v = torch.from_numpy(y_val.astype(np.int64))
    train_logits = evaluate_logits(model, torch.from_numpy(x_train))
    val_logits = evaluate_logits(model, torch.from_numpy(x_val))
    metrics = EpochMetrics(
        step=1, train_loss=nn.functional.cross_entropy(train_logits, y_t).item(),
        train_accuracy=(train_logits.argmax(1) == y_t).float().mean().item(),
        val_loss=nn.functional.cross_entropy(val_logits, y_v).item(),
        val_accuracy=(val_logits.argmax(1) == y_v).float().mean().item(), lr=0.0)
    if on_epoch is not None:
        on_epoch(metrics)
    log.info("logreg: %d lbfgs iterations, train acc %.4f, val acc %.4f", clf.n_iter_[0],
             metrics.train_accuracy, metrics.val_accuracy)
    return TrainResult(model=model, history=[metrics], best_epoch=1,
                       best_val_accuracy=metrics.val_accuracy,
                       stop_reason=f"lbfgs {'converged' if converged else 'hit model.max_iter'} "
                                   f"after {clf.n_iter_[0]} iterations")


def train_model(cfg: Config, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                y_val: np.ndarray, *, on_epoch: EpochCallback | None = None,
                epochs: int | None = None, progress: bool = True) -> TrainResult:
    """Train whichever architecture `cfg.model` names.

    `epochs` replaces train.epochs (a tuning trial trains for tune.epochs); `progress` shows
    the per-batch bar. Both concern epoch-wise (torch) training only: logreg is one lbfgs fit.
    `on_epoch` may raise (e.g. `optuna.TrialPruned`) to stop training.
    """
    if not cfg.is_torch_model:
        return fit_logreg(cfg, x_train, y_train, x_val, y_val, on_epoch=on_epoch)
    return fit(cfg, x_train, y_train, x_val, y_val, on_epoch=on_epoch, epochs=epochs,
               progress=progress)
