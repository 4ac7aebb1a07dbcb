"""Monitoring the served model: is a batch of production inputs still like the validation data?

A batch (images, or the records of the prediction log that `deep-repro predict` and the served
pyfunc model write when `DEEP_REPRO_PREDICTION_LOG` is set) is compared with a reference (the
champion's validation split) through *features* both can provide: per-image intensity
statistics and the model's softmax outputs. Checks, each a two-sample test with a p-value:

* input drift: Kolmogorov-Smirnov on mean intensity, contrast (std) and dark-pixel fraction, and
  an RBF-kernel MMD between the softmax outputs (permutation test, fixed seed) — this catches
  changes the statistics cannot see, such as rotated images;
* output drift: chi-square on the predicted-class counts, Welch's t on the confidence;
* accuracy (labelled batches only): one-sided two-proportion z-test against the reference.

Drift is declared when any p-value is below `alpha / number of checks` (Bonferroni), so the
false-alarm rate of a clean batch is at most `alpha`. Everything is deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from deep_repro.errors import DataError

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 images [N, 28, 28] -> probs [N, 10]
STAT_NAMES = ("mean", "std", "dark")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Reference and batch sizes used in the kernel test: its cost is O(n^2 * permutations).
MMD_MAX_N = 500


def image_stats(images: np.ndarray) -> np.ndarray:
    """Per-image [mean, std, dark fraction] on the 0..1 scale (the prediction log's fields)."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / np.float32(255.0)
    # Same threshold as deep_repro/serving/pyfunc.py (which cannot import this package).
    return np.stack([x.mean(axis=1), x.std(axis=1), (x < 26 / 255.0).mean(axis=1)], axis=1)


@dataclass
class Features:
    """What the checks compare: stats [N, 3], probs [N, 10], optional labels [N]."""

    stats: np.ndarray
    probs: np.ndarray
    labels: np.ndarray | None = None
    models: list[dict[str, str]] = field(default_factory=list)  # log records: who predicted

    def __len__(self) -> int:
        return len(self.probs)


def features_from_images(
    images: np.ndarray, predictor: Predictor, labels: np.ndarray | None = None
) -> Features:
    return Features(image_stats(images), np.asarray(predictor(images), dtype=np.float64), labels)


# --------------------------------------------------------------------------- loading batches
def _check_images(images: np.ndarray, source: Path) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{source}: expected uint8 images [N, 28, 28], got {images.dtype} {list(images.shape)}"
        )
    if len(images) == 0:
        raise DataError(f"{source}: no images")
    return images


def load_npz(
    path: Path, keys: tuple[str, str] = ("images", "labels")
) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` uint8 [N, 28, 28] and optional `labels` from an .npz (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if keys[0] not in npz.files:
                raise DataError(f"{path}: no '{keys[0]}' array (has: {', '.join(npz.files)})")
            images = npz[keys[0]]
            labels = npz[keys[1]] if keys[1] in npz.files else None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz ({type(exc).__name__}: {exc})") from None
    images = _check_images(images, path)
    if labels is not None:
        labels = labels.astype(np.int64)
        if labels.shape != (len(images),) or labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{path}: '{keys[1]}' must be {len(images)} class indices 0..9")
    return images, labels


def load_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validation images and labels: `x_val`/`y_val` (data/split/train_val.npz) or
    `images`/`labels`."""
    if not path.exists():
        raise DataError(
            f"reference {path} not found: run `uv run dvc repro split` or pass --reference FILE.npz"
        )
    with np.load(path, allow_pickle=False) as npz:
        keys = ("x_val", "y_val") if "x_val" in npz.files else ("images", "labels")
    images, labels = load_npz(path, keys)
    if labels is None:
        raise DataError(f"reference {path}: needs labels ('{keys[1]}')")
    return images, labels


def log_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".jsonl" else []
    return sorted(path.glob("*.jsonl")) if path.is_dir() else []


def features_from_log(files: list[Path], since: str | None = None) -> Features:
    """Prediction-log records (see deep_repro/serving/pyfunc.py) -> features; `since`: ISO time."""
    rows, probs, models = [], [], {}
    for file in files:
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if since and rec["time"] < since:
                    continue
                rows.append([float(rec[k]) for k in STAT_NAMES])
                probs.append([float(v) for v in rec["probs"]])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{file}:{n}: not a prediction-log record ({exc})") from None
            models[json.dumps(rec.get("model", {}), sort_keys=True)] = rec.get("model", {})
    if not rows:
        raise DataError(
            f"no prediction-log records in {', '.join(map(str, files))}"
            + (f" since {since}" if since else "")
        )
    if any(len(p) != 10 for p in probs):
        raise DataError("prediction-log records must have 10 probabilities")
    return Features(np.asarray(rows), np.asarray(probs), None, list(models.values()))


def load_batch(path: Path, predictor: Predictor, since: str | None = None) -> Features:
    """A prediction log (dir or .jsonl), an .npz of images (+labels), or a dir of images."""
    from deep_repro.serving.predict import load_image  # the exact conversion `predict` applies

    if not path.exists():
        raise DataError(
            f"{path} not found: expected a prediction-log directory or .jsonl "
            "file, an .npz with 'images', or a directory of image files"
        )
    if path.suffix == ".npz":
        images, labels = load_npz(path)
        return features_from_images(images, predictor, labels)
    if files := log_files(path):
        return features_from_log(files, since)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            return features_from_images(np.stack([load_image(p) for p in paths]), predictor)
    raise DataError(f"{path}: no prediction-log (*.jsonl), .npz or image files found")


# --------------------------------------------------------------------------- tests
@dataclass(frozen=True)
class Check:
    name: str
    statistic: float
    p_value: float
    detail: str


def _rbf_mmd_test(
    x: np.ndarray, y: np.ndarray, gamma: float, permutations: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Biased MMD^2 with an RBF kernel and its permutation p-value. All permutations at once:
    with weights w (1/n on one sample, -1/m on the other), MMD^2 = w' K w, so P permutations
    are one matrix product K @ W."""
    z = np.concatenate([x, y]).astype(np.float32)
    sq = (z * z).sum(axis=1)
    kernel = np.exp(-gamma * np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0))
    n, m = len(x), len(y)
    observed = np.where(np.arange(n + m) < n, 1 / n, -1 / m).astype(np.float32)
    chosen = np.argsort(rng.random((n + m, permutations), dtype=np.float32), axis=0)[:n]
    weights = np.full((n + m, permutations), -1 / m, dtype=np.float32)
    np.put_along_axis(weights, chosen, np.float32(1 / n), axis=0)
    null = ((kernel @ weights) * weights).sum(axis=0)
    stat = float(observed @ kernel @ observed)
    # A small tolerance: float32 sums of the same permutation may differ in the last bit.
    p_value = (1 + int((null >= stat - 1e-7).sum())) / (1 + permutations)
    return stat, p_value


class Reference:
    """The reference features, prepared once; `compare` tests one batch against them."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        predictor: Predictor,
        *,
        max_model_n: int = 1000,
        seed: int = 0,
    ) -> None:
        self.seed = seed
        self.stats = image_stats(images)  # cheap: every reference image
        rng = np.random.default_rng(seed)
        # The model runs on a fixed subsample only (speed); same subsample every time.
        pick = np.sort(rng.permutation(len(images))[:max_model_n])
        self.features = features_from_images(images[pick], predictor, labels[pick])
        self.accuracy = float((self.features.probs.argmax(1) == self.features.labels).mean())
        mmd_ref = self.features.probs[:MMD_MAX_N]
        d2 = ((mmd_ref[:, None, :] - mmd_ref[None, :, :]) ** 2).sum(-1)
        # Median heuristic on the reference alone, so the kernel does not depend on the batch.
        self.gamma = 1.0 / max(float(np.median(d2[np.triu_indices(len(mmd_ref), 1)])), 1e-6)

    def compare(self, batch: Features, *, alpha: float = 0.01, permutations: int = 2000) -> Report:
        ref = self.features
        checks = []
        for j, name in enumerate(STAT_NAMES):
            res = stats.ks_2samp(batch.stats[:, j], self.stats[:, j])
            checks.append(
                Check(
                    name,
                    float(res.statistic),
                    float(res.pvalue),
                    f"{batch.stats[:, j].mean():.3f} vs {self.stats[:, j].mean():.3f}",
                )
            )
        rng = np.random.default_rng(self.seed)
        x = batch.probs[np.sort(rng.permutation(len(batch))[:MMD_MAX_N])]
        mmd, p = _rbf_mmd_test(x, ref.probs[:MMD_MAX_N], self.gamma, permutations, rng)
        checks.append(Check("mmd", mmd, p, f"MMD^2 {mmd:.4f} (softmax outputs)"))
        counts = np.stack(
            [
                np.bincount(batch.probs.argmax(1), minlength=10),
                np.bincount(ref.probs.argmax(1), minlength=10),
            ]
        )
        counts = counts[:, counts.sum(0) > 0]
        chi2, p = stats.chi2_contingency(counts)[:2] if counts.shape[1] > 1 else (0.0, 1.0)
        checks.append(Check("classes", float(chi2), float(p), "predicted-class counts"))
        conf_b, conf_r = batch.probs.max(1), ref.probs.max(1)
        res = stats.ttest_ind(conf_b, conf_r, equal_var=False)
        checks.append(
            Check(
                "confidence",
                float(res.statistic),
                _finite(res.pvalue),
                f"{conf_b.mean():.3f} vs {conf_r.mean():.3f}",
            )
        )
        if batch.labels is not None:
            checks.append(_accuracy_check(batch, ref))
        return Report(checks, alpha, len(batch), len(self.stats))


def _finite(p: float) -> float:
    return 1.0 if math.isnan(p) else float(p)  # identical constant samples: no evidence


def _accuracy_check(batch: Features, ref: Features) -> Check:
    """One-sided: is the batch accuracy *lower* than the reference's (pooled z-test)?"""
    assert batch.labels is not None and ref.labels is not None
    hits_b = int((batch.probs.argmax(1) == batch.labels).sum())
    hits_r = int((ref.probs.argmax(1) == ref.labels).sum())
    n_b, n_r = len(batch), len(ref)
    pooled = (hits_b + hits_r) / (n_b + n_r)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n_b + 1 / n_r), 1e-12))
    z = (hits_b / n_b - hits_r / n_r) / se
    return Check(
        "accuracy", z, float(stats.norm.cdf(z)), f"{hits_b / n_b:.3f} vs {hits_r / n_r:.3f}"
    )


@dataclass
class Report:
    checks: list[Check]
    alpha: float
    n_batch: int
    n_reference: int

    @property
    def threshold(self) -> float:  # Bonferroni
        return self.alpha / len(self.checks)

    @property
    def fired(self) -> list[Check]:
        return [c for c in self.checks if c.p_value < self.threshold]

    @property
    def drift(self) -> bool:
        return bool(self.fired)

    def verdict(self) -> str:
        if not self.drift:
            low = min(self.checks, key=lambda c: c.p_value)
            return (
                f"no drift ({self.n_batch} inputs, {len(self.checks)} checks, smallest p = "
                f"{low.p_value:.3g} ({low.name}) >= {self.threshold:.3g})"
            )
        return "DRIFT: " + ", ".join(f"{c.name} p={c.p_value:.2g} ({c.detail})" for c in self.fired)

    def metrics(self) -> dict[str, float]:
        out = {
            "drift": float(self.drift),
            "n_batch": float(self.n_batch),
            "threshold": self.threshold,
        }
        for c in self.checks:
            out[f"p_{c.name}"] = c.p_value
            out[f"stat_{c.name}"] = c.statistic
        return out
