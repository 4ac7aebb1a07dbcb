"""The data report: checks, class balance, intensities, mean images and train/test duplicates.

It reads the split files (data/split/*.npz), i.e. the train / val / test arrays exactly as the
model sees them (after `data.subset` and the validation hold-out), so the report describes the
data a run actually used. Everything here is a pure function of those arrays and the `analyze`
params: no timestamps, no run ids, no absolute paths, so a rerun writes byte-identical files.

Duplicates between the official training set (train + val) and the test set:

* exact: the test image's 784 bytes equal those of a training image;
* near: the root-mean-square pixel difference to its nearest training image is at most
  `analyze.near_duplicate_threshold` gray levels (0..255 scale); exact copies (RMS 0) count too.

Finding each test image's nearest training image at full resolution is 10,000 x 60,000 x 784
operations, too slow for a cheap stage. The search is exact anyway: the RMS difference of the
4x4-mean-pooled (7x7) images is never larger than that of the full images (the square of a mean
is at most the mean of the squares), so only pairs whose pooled RMS is within the threshold can
be near-duplicates. One float32 matrix product per chunk of test images finds those candidates;
their full-resolution distance is then computed exactly, in integers. Ties are broken by the
lowest index, so the result does not depend on BLAS rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deep_repro.config.task import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES, class_label
from deep_repro.data.dataset import load_arrays
from deep_repro.errors import DataError
from deep_repro.files import pyplot, save_figure, write_csv, write_json
from deep_repro.pipeline import (
    CLASS_BALANCE,
    DATA_SUMMARY,
    DUPLICATES_PNG,
    INTENSITY_HIST,
    MEAN_IMAGES_PNG,
    SPLIT_TEST,
    SPLIT_TRAIN_VAL,
)

SPLITS = ("train", "val", "test")
SOURCES = {"train": SPLIT_TRAIN_VAL, "val": SPLIT_TRAIN_VAL, "test": SPLIT_TEST}
REPORT_FILES = (DATA_SUMMARY, CLASS_BALANCE, INTENSITY_HIST, MEAN_IMAGES_PNG, DUPLICATES_PNG)
HIST_BIN_WIDTH = 8  # 32 bins of 8 gray levels: fine enough to compare splits, short enough to read
POOL = 4  # 28x28 -> 7x7 means for the candidate search
CHUNK = 512  # test images per matrix product: 512 x 60,000 float32 = 120 MB
PAIR_BATCH = 1 << 14  # candidate pairs compared at full resolution at once (50 MB of int32)
CHECKS = (
    "images are an array of shape (n, 28, 28), n > 0",
    "images have dtype uint8",
    "pixel values within 0..255",
    "labels are an integer array of shape (n,), one per image",
    "labels within 0..9",
    "every class 0..9 present",
)


@dataclass(frozen=True)
class Part:
    """One split as the model sees it, and where it came from (for error messages)."""

    name: str
    source: str  # repository-relative file
    images: np.ndarray
    labels: np.ndarray


def load_parts(root: Path) -> dict[str, Part]:
    """The train / val / test arrays of the split files under `root`, checked."""
    files = {rel: load_arrays(root / rel) for rel in sorted(set(SOURCES.values()))}
    parts = {}
    for name in SPLITS:
        rel = SOURCES[name]
        arrays = files[rel]
        missing = [k for k in (f"x_{name}", f"y_{name}") if k not in arrays]
        if missing:
            raise DataError(
                f"{rel}: no array {missing[0]!r}; expected x_{name} and y_{name} "
                f"(has {', '.join(sorted(arrays)) or 'none'}); rerun the split stage"
            )
        parts[name] = Part(name, rel, arrays[f"x_{name}"], arrays[f"y_{name}"])
        check_part(parts[name])
    return parts


def check_part(part: Part) -> None:
    """Raise a one-line DataError naming the file and what was expected (see CHECKS)."""
    x, y, where = part.images, part.labels, f"{part.source}: x_{part.name}"
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or len(x) == 0:
        raise DataError(f"{where} has shape {x.shape}, expected (n, 28, 28) with n > 0")
    if x.dtype != np.uint8:
        raise DataError(f"{where} has dtype {x.dtype}, expected uint8 (pixel values 0..255)")
    where = f"{part.source}: y_{part.name}"
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where} has shape {y.shape} and dtype {y.dtype}, expected {len(x)} integer labels"
        )
    bad = y[(y < 0) | (y >= NUM_CLASSES)]
    if bad.size:
        raise DataError(f"{where} holds label {int(bad[0])}, expected labels 0..{NUM_CLASSES - 1}")
    absent = sorted(set(range(NUM_CLASSES)) - set(np.unique(y).tolist()))
    if absent:
        raise DataError(f"{where} has no image of class {absent}, expected every class 0..9")


# --------------------------------------------------------------------------- duplicates
@dataclass(frozen=True)
class Duplicates:
    """Test images with an (exact or near) duplicate among the reference (training) images:
    `test[k]`'s nearest reference image is `reference[k]`, `rms[k]` gray levels away; sorted by
    (rms, test index)."""

    test: np.ndarray
    reference: np.ndarray
    rms: np.ndarray
    n_exact: int


def _pooled(images: np.ndarray) -> np.ndarray:
    n, h, w = images.shape
    blocks = images.reshape(n, h // POOL, POOL, w // POOL, POOL).sum(axis=(2, 4), dtype=np.int64)
    return (blocks.reshape(n, -1) / POOL**2).astype(np.float32)


def find_duplicates(reference: np.ndarray, test: np.ndarray, threshold: float) -> Duplicates:
    """Each test image's nearest reference image by RMS pixel difference, where it is within
    `threshold` gray levels (the module docstring explains why the pooled search misses none)."""
    ref_flat = reference.reshape(len(reference), -1)
    test_flat = test.reshape(len(test), -1)
    seen = {row.tobytes() for row in ref_flat}
    n_exact = sum(row.tobytes() in seen for row in test_flat)

    pr, pt = _pooled(reference), _pooled(test)
    nr, nt = (pr.astype(np.float64) ** 2).sum(1), (pt.astype(np.float64) ** 2).sum(1)
    # Squared pooled distance in one product: [t, |t|^2, 1] . [-2r, 1, |r|^2] = |t - r|^2.
    a = np.hstack([pt, nt[:, None], np.ones((len(pt), 1))]).astype(np.float32)
    b = np.hstack([-2 * pr, np.ones((len(pr), 1)), nr[:, None]]).astype(np.float32)
    # float32 rounding of the product is a few units at these magnitudes: the slack only admits
    # more candidates, which the exact integer distance below then judges.
    limit = pr.shape[1] * threshold**2 + 1e-5 * (nr.max(initial=0) + nt.max(initial=0)) + 1.0
    # A cheaper bound first: mean intensities differ by at most the RMS difference, so a chunk of
    # test images sorted by brightness only needs the training images in a narrow band of it.
    pixels = test_flat.shape[1]
    sr = ref_flat.sum(1, dtype=np.int64)
    st = test_flat.sum(1, dtype=np.int64)
    by_r, by_t = np.argsort(sr, kind="stable"), np.argsort(st, kind="stable")
    sr_sorted, band = sr[by_r], pixels * threshold + 1
    # Running nearest reference image of every test image within the threshold (-1: none yet).
    best_ss = np.full(len(test), np.iinfo(np.int64).max)
    best_r = np.full(len(test), -1)
    for start in range(0, len(test), CHUNK):
        rows_t = by_t[start : start + CHUNK]
        lo = np.searchsorted(sr_sorted, st[rows_t[0]] - band, side="left")
        hi = np.searchsorted(sr_sorted, st[rows_t[-1]] + band, side="right")
        cols = by_r[lo:hi]
        d2 = a[rows_t] @ np.ascontiguousarray(b[cols].T)
        rows = np.flatnonzero(d2.min(axis=1, initial=np.inf) <= limit)  # most have none
        i, j = np.nonzero(d2[rows] <= limit)
        for at in range(0, len(i), PAIR_BATCH):  # bounded memory, whatever the threshold
            q, r = rows_t[rows[i[at : at + PAIR_BATCH]]], cols[j[at : at + PAIR_BATCH]]
            diff = test_flat[q].astype(np.int32) - ref_flat[r].astype(np.int32)
            ss = np.einsum("ij,ij->i", diff, diff, dtype=np.int64)  # exact sum of squares
            keep = ss <= threshold**2 * pixels
            q, r, ss = q[keep], r[keep], ss[keep]
            order = np.lexsort((r, ss, q))  # per test image: smallest distance, lowest index
            q, r, ss = q[order], r[order], ss[order]
            first = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
            q, r, ss = q[first], r[first], ss[first]
            better = (ss < best_ss[q]) | ((ss == best_ss[q]) & (r < best_r[q]))
            best_ss[q[better]], best_r[q[better]] = ss[better], r[better]
    q = np.flatnonzero(best_r >= 0)
    r, ss = best_r[q], best_ss[q]
    rms = np.sqrt(ss / pixels)
    order = np.lexsort((q, ss))
    return Duplicates(q[order], r[order], rms[order], int(n_exact))


# --------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class Report:
    summary: dict[str, Any]
    class_rows: list[dict[str, Any]]
    hist_rows: list[dict[str, Any]]
    means: dict[str, np.ndarray]  # split -> (10, 28, 28) per-class mean image
    pairs: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)  # figure

    @property
    def threshold(self) -> float:
        return float(self.summary["duplicates"]["near_duplicate_threshold"])

    def metrics(self) -> dict[str, float]:
        dup = self.summary["duplicates"]
        return {
            "n_exact_duplicates": dup["n_exact"],
            "n_near_duplicates": dup["n_near"],
            **{f"{name}_size": n for name, n in self.summary["sizes"].items()},
        }


def analyze(parts: dict[str, Part], threshold: float, examples: int) -> Report:
    counts = {n: np.bincount(p.labels, minlength=NUM_CLASSES) for n, p in parts.items()}
    sizes = {n: len(p.labels) for n, p in parts.items()}
    # Long format, one row per split and class: DVC's bar template draws one bar per row.
    class_rows = [
        {
            "split_class": f"{n} {class_label(c)}",
            "split": n,
            "class": class_label(c),
            "count": int(counts[n][c]),
            "share": round(int(counts[n][c]) / sizes[n], 6),
        }
        for n in SPLITS
        for c in range(NUM_CLASSES)
    ]
    levels = {n: np.bincount(p.images.ravel(), minlength=256) for n, p in parts.items()}
    # Half the pixels are background (exactly 0): a bar that tall would flatten the rest of the
    # histogram, so it covers the non-zero pixels and the summary gives the background share.
    hist = {n: np.r_[0, c[1:]].reshape(-1, HIST_BIN_WIDTH).sum(1) for n, c in levels.items()}
    hist_rows = [
        {
            "intensity": b * HIST_BIN_WIDTH,
            **{n: round(int(hist[n][b]) / int(hist[n].sum()), 6) for n in SPLITS},
        }
        for b in range(256 // HIST_BIN_WIDTH)
    ]
    means = {
        n: np.stack([p.images[p.labels == c].mean(axis=0) for c in range(NUM_CLASSES)])
        for n, p in parts.items()
    }
    # The official training set, as the model sees it: train then val (index = position there).
    train, val, test = parts["train"], parts["val"], parts["test"]
    reference = np.concatenate([train.images, val.images])
    ref_labels = np.concatenate([train.labels, val.labels])
    dup = find_duplicates(reference, test.images, threshold)

    def where(j: int) -> tuple[str, int]:
        return ("train", j) if j < len(train.images) else ("val", j - len(train.images))

    shown: list[dict[str, Any]] = []
    pairs = []
    for t, j, rms in zip(dup.test.tolist(), dup.reference.tolist(), dup.rms.tolist(), strict=True):
        split, index = where(j)
        if len(shown) < examples:
            shown.append(
                {
                    "test_index": t,
                    "split": split,
                    "index": index,
                    "rms": round(rms, 4),
                    "test_label": CLASS_NAMES[test.labels[t]],
                    "label": CLASS_NAMES[ref_labels[j]],
                }
            )
            title = f"test {t} / {split} {index}: {rms:.1f}"
            pairs.append((test.images[t], reference[j], title))
    conflicts = int((ref_labels[dup.reference] != test.labels[dup.test]).sum())
    summary = {
        "checks": {
            "passed": list(CHECKS),
            "splits": {
                n: {
                    "file": p.source,
                    "arrays": [f"x_{n}", f"y_{n}"],
                    "shape": list(p.images.shape),
                    "dtype": str(p.images.dtype),
                    "pixel_range": [int(p.images.min()), int(p.images.max())],
                    "labels": sorted(set(np.unique(p.labels).tolist())),
                }
                for n, p in parts.items()
            },
        },
        "sizes": sizes,
        "class_counts": {
            # "3 Dress": the summary's keys are sorted, and the index keeps the class order.
            n: {class_label(i): int(k) for i, k in enumerate(c)}
            for n, c in counts.items()
        },
        "pixel_mean": {n: round(float(p.images.mean()), 4) for n, p in parts.items()},
        "background_share": {n: round(int(c[0]) / int(c.sum()), 6) for n, c in levels.items()},
        "duplicates": {
            "between": "test vs train + val (the official training set)",
            "near_definition": "RMS pixel difference to the nearest training image <= "
            "near_duplicate_threshold gray levels (exact copies included)",
            "near_duplicate_threshold": threshold,
            "n_exact": dup.n_exact,
            "n_near": len(dup.test),
            "n_label_conflicts": conflicts,
            "examples": shown,
        },
    }
    return Report(summary, class_rows, hist_rows, means, pairs)


# --------------------------------------------------------------------------- files
def _mosaic(tiles: list[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    """Tiles (28x28) in a grid, `gap` blank pixels apart: one image, so one fast imshow."""
    h, w = IMAGE_SHAPE
    rows = max(1, -(-len(tiles) // cols))
    out = np.zeros((rows * (h + gap) - gap, cols * (w + gap) - gap))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def mean_images_figure(means: dict[str, np.ndarray]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 1.2 * len(means) + 1.2))
    ax.imshow(_mosaic([m for split in means.values() for m in split], NUM_CLASSES), cmap="gray_r")
    step = IMAGE_SHAPE[0] + 2
    ax.set_xticks([c * step + 13.5 for c in range(NUM_CLASSES)], CLASS_NAMES, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([r * step + 13.5 for r in range(len(means))], list(means))
    ax.set_title("Mean image per class (columns) and split (rows)", fontsize=9)
    return fig


def duplicates_figure(pairs: list[tuple[np.ndarray, np.ndarray, str]], threshold: float) -> Any:
    """Each pair: the test image, then its nearest training image (titled above the pair)."""
    plt = pyplot()
    cols = 4  # pairs per row
    rows = max(1, -(-len(pairs) // cols))
    fig, ax = plt.subplots(figsize=(10, 1.3 * rows + 0.8))
    gap = 10  # room for each pair's title
    tiles = [t for pair in pairs for t in pair[:2]]
    ax.imshow(_mosaic(tiles, 2 * cols, gap=gap), cmap="gray_r", vmin=0, vmax=255)
    step = IMAGE_SHAPE[0] + gap
    for k, (_, _, title) in enumerate(pairs):
        r, c = divmod(k, cols)
        ax.text((2 * c + 1) * step - gap / 2, r * step - 1, title, ha="center", fontsize=6)
    if not pairs:
        ax.text(2 * cols * step / 2, 14, "no near-duplicates", ha="center", va="center")
    ax.axis("off")
    ax.set_title(
        f"Test image (left) and its nearest training image, RMS <= {threshold:g}",
        fontsize=9,
        pad=14,
    )
    return fig


def write_report(report: Report, root: Path) -> tuple[str, ...]:
    """Write every report file under `root`; returns their repository-relative paths."""
    write_json(root / DATA_SUMMARY, report.summary)
    write_csv(root / CLASS_BALANCE, report.class_rows)
    write_csv(root / INTENSITY_HIST, report.hist_rows)
    plt = pyplot()
    for path, fig in (
        (MEAN_IMAGES_PNG, mean_images_figure(report.means)),
        (DUPLICATES_PNG, duplicates_figure(report.pairs, report.threshold)),
    ):
        save_figure(fig, root / path)
        plt.close(fig)
    return REPORT_FILES
