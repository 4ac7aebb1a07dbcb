"""What one training run reports, and how a trained network is scored on validation.

Shared by both trainers (`loop.fit` for networks, `logreg.fit_logreg` for scikit-learn) and by
postprocessing, which decides the test-time augmentation on the validation split (never on test).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from deep_repro.training.augment import normalise, tta_logits

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one run's record
@dataclass
class EpochMetrics:
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float

    def as_dict(self) -> dict[str, float]:
        return {
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "lr": self.lr,
        }


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
def evaluate_logits(
    model: nn.Module,
    x_u8: torch.Tensor,
    batch_size: int = 64,  # as inference.predict_logits, for the same reason
    *,
    channels_last: bool = False,
    amp: torch.dtype | None = None,
    tta: str = "none",
) -> torch.Tensor:
    """Logits of a training-space model (float input) over uint8 images, in eval mode; with
    `tta` ("hflip", "hflip_shift") what the inference model with that test-time augmentation
    computes."""
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch_size):
        xb = normalise(x_u8[start : start + batch_size])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out.append(tta_logits(model, xb, tta).float())
    return torch.cat(out) if out else torch.empty(0, 10)


# --------------------------------------------------------------------------- test-time augmentation
# What `postprocess.tta: auto` chooses between, cheapest first (a key of TTA_VIEWS each).
AUTO_TTA = ("none", "hflip", "hflip_shift")


@dataclass(frozen=True)
class TTAChoice:
    """The test-time augmentation baked into the program, and the evidence it was chosen on."""

    tta: str  # a key of TTA_VIEWS: what the exported program computes
    rule: str  # postprocess.tta as configured: "auto" or a key of TTA_VIEWS
    val_accuracy: dict[str, float]  # the trained network's val accuracy under each candidate
    reference: torch.Tensor  # the trained network's val logits under the chosen `tta`


def choose_tta(net: nn.Module, x_val: np.ndarray, y_val: np.ndarray, rule: str) -> TTAChoice:
    """Decide the test-time augmentation on the validation set (never on test).

    Mirroring an image is label-preserving for clothing, but a model only benefits if it learnt
    to see mirrored clothes: a CNN trained with flips and crops gains from the flip and from the
    one-pixel shifts, a linear model trained without them loses 17 points. `auto` takes the most
    accurate of one pass, the flip and the 6 views on validation (a tie keeps the richer one:
    views the net was trained on do not hurt on average). An explicit choice that loses to one
    pass is kept (the user asked) but warned about and recorded."""

    x = torch.from_numpy(x_val)
    y = torch.as_tensor(y_val.astype(np.int64))
    # Scored in the layout the exported program runs in (inference.build_inference_module).
    net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    candidates = AUTO_TTA if rule == "auto" else tuple(dict.fromkeys(("none", rule)))
    logits = {tta: evaluate_logits(net, x, tta=tta, channels_last=True) for tta in candidates}
    accuracy = {tta: float((out.argmax(1) == y).float().mean()) for tta, out in logits.items()}
    # max() keeps the first of equals: scanning the richest first breaks ties towards it.
    chosen = max(reversed(candidates), key=accuracy.__getitem__) if rule == "auto" else rule
    summary = "val accuracy " + ", ".join(f"{t} {a:.4f}" for t, a in accuracy.items())
    if rule != "auto" and accuracy[rule] < accuracy["none"]:
        log.warning(
            "postprocess.tta = %s lowers validation accuracy (%s); "
            "postprocess.tta=none would keep one pass",
            rule,
            summary,
        )
    else:
        log.info("postprocess.tta = %s -> %s (%s)", rule, chosen, summary)
    return TTAChoice(chosen, rule, accuracy, logits[chosen])


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against integer labels."""
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()
