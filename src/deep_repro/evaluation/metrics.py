"""Metrics and plots of the inference model: what a number in a report means.

All functions are pure (arrays in, numbers/figures out); the evaluate stage decides where they go
(DVC metrics/plots files and MLflow).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep_repro.config.task import CLASS_NAMES, NUM_CLASSES, class_label
from deep_repro.files import pyplot


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (e.g. accuracy = correct / n).

    Why Wilson and not `p ± 1.96·sqrt(p(1-p)/n)`: it stays inside [0, 1] and keeps its coverage
    for accuracies near 1 and small validation sets, where the normal approximation is too narrow.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p_value(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact (binomial) McNemar test of two classifiers scored on the *same* images.

    Only the discordant images carry information: b01 = A wrong & B right, b10 = A right &
    B wrong. Under "equally accurate" each discordant image is a fair coin, so the two-sided
    p-value is P(min(b01, b10) or fewer heads in b01 + b10 tosses) x 2, capped at 1.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same images: {a.shape} vs {b.shape}")
    b01 = int((~a & b).sum())
    b10 = int((a & ~b).sum())
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    # log-space binomial tail: n can be thousands.
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    accuracy_ci95: tuple[float, float]  # Wilson interval of `accuracy`
    macro_f1: float
    top2_accuracy: float
    ece: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray
    calibration: list[dict[str, float]]  # per-confidence-bin table behind `ece`

    @property
    def accuracy_pm(self) -> float:
        """Half-width of the 95% interval, for `0.9235 ± 0.0052` displays."""
        return (self.accuracy_ci95[1] - self.accuracy_ci95[0]) / 2

    def headline(self, prefix: str) -> dict[str, float]:
        """Every number of this report as flat MLflow metrics (`val_accuracy`, ...)."""
        return {
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_accuracy_ci95_low": self.accuracy_ci95[0],
            f"{prefix}_accuracy_ci95_high": self.accuracy_ci95[1],
            f"{prefix}_macro_f1": self.macro_f1,
            f"{prefix}_top2_accuracy": self.top2_accuracy,
            f"{prefix}_ece": self.ece,
        }

    def summary(self) -> dict[str, float]:
        """The few numbers that go into the DVC metrics file (`dvc metrics show` / `exp show`
        stay narrow: the rest lives in MLflow and reports/eval/)."""
        return {
            "accuracy": round(self.accuracy, 6),
            "ci95": round(self.accuracy_pm, 4),
            "macro_f1": round(self.macro_f1, 6),
        }


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """ECE with equal-width confidence bins; also returns the per-bin table for the diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        count = int(in_bin.sum())
        acc = float(correct[in_bin].mean()) if count else 0.0
        conf = float(confidence[in_bin].mean()) if count else 0.0
        ece += abs(acc - conf) * count / max(1, len(confidence))
        table.append(
            {
                "bin_lower": round(float(lo), 4),
                "bin_upper": round(float(hi), 4),
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return ece, table


def classification_report(y_true: np.ndarray, logits: np.ndarray) -> ClassificationReport:
    probs = softmax(logits)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(axis=0))
        recall = np.nan_to_num(tp / cm.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    top2 = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    ece, bins = expected_calibration_error(probs.max(axis=1), y_pred == y_true)
    correct = int((y_pred == y_true).sum())
    return ClassificationReport(
        accuracy=correct / max(1, len(y_true)),
        accuracy_ci95=wilson_interval(correct, len(y_true)),
        macro_f1=float(f1.mean()),
        top2_accuracy=float((top2 == y_true[:, None]).any(axis=1).mean()),
        ece=float(ece),
        precision=precision,
        recall=recall,
        f1=f1,
        support=cm.sum(axis=1),
        confusion=cm,
        calibration=bins,
    )


# --------------------------------------------------------------------------- files
def per_class_rows(report: ClassificationReport) -> list[dict[str, Any]]:
    return [
        {
            "class": CLASS_NAMES[i],
            "precision": round(float(report.precision[i]), 6),
            "recall": round(float(report.recall[i]), 6),
            "f1": round(float(report.f1[i]), 6),
            "support": int(report.support[i]),
        }
        for i in range(NUM_CLASSES)
    ]


def prediction_rows(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict[str, Any]]:
    """Per-sample rows for DVC's `confusion` plot template."""
    return [
        {"actual": class_label(t), "predicted": class_label(p)}
        for t, p in zip(y_true.tolist(), y_pred.tolist(), strict=True)
    ]


def reliability_rows(table: list[dict[str, float]]) -> list[dict[str, float]]:
    """The calibration table without empty bins: an empty bin has no accuracy, and writing it
    as (0, 0) would draw the reliability line down to the origin."""
    return [row for row in table if row["count"] > 0]


# --------------------------------------------------------------------------- figures
def confusion_figure(cm: np.ndarray, title: str) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="row-normalised")
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: np.ndarray, y_true: np.ndarray, logits: np.ndarray, n: int = 24
) -> Any:
    """The most confidently wrong test images, with true and predicted class names."""
    plt = pyplot()
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y_true)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    cols = 6
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, idx in zip(np.atleast_1d(axes).ravel(), order, strict=False):
        ax.imshow(images[idx], cmap="gray_r")
        ax.set_title(
            f"true: {CLASS_NAMES[y_true[idx]]}\npred: {CLASS_NAMES[pred[idx]]} "
            f"({probs[idx, pred[idx]]:.2f})",
            fontsize=7,
        )
    fig.suptitle("Most confidently misclassified test images")
    fig.tight_layout()
    return fig


def reliability_figure(table: list[dict[str, float]], ece: float) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    centers = [(r["bin_lower"] + r["bin_upper"]) / 2 for r in table]
    width = table[0]["bin_upper"] - table[0]["bin_lower"]
    accs = [r["accuracy"] for r in table]
    ax.bar(centers, accs, width=width * 0.95, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (test), ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
