"""Per-image predictions: the one record of what an inference model answered on each image.

The evaluate stage writes it (`reports/eval/predictions.json`, a DVC output) and the validation
gate stores it with the registered version; anything that needs to know, image by image, what a
model did reads this file and recomputes from it: the gate's paired test, and any later check of
a recorded result. Accuracy is never read from it: it is recomputed from labels and predictions.

Format (JSON, canonical bytes: the same predictions always give the same sha256):

    {"format": "deep-repro/predictions/1",
     "splits": {"val": {"images": "<digest of the images and labels>", "n": 6000,
                        "labels": "0931...", "predicted": "0937..."},
                "test": {...}}}

`labels` and `predicted` hold one digit (the class index, 0-9) per image, in split order: small
(16 KB for val + test), language-neutral, and readable with nothing but a JSON parser. The file may
come from another user's run, so `from_bytes` checks every field and refuses anything else in one
line; it never evaluates anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep_repro.config.task import NUM_CLASSES
from deep_repro.errors import ValidationError

FORMAT = "deep-repro/predictions/1"
MAX_BYTES = 4 * 1024 * 1024  # 100x the full test + val file: anything larger is not ours
_DIGITS = frozenset("0123456789"[:NUM_CLASSES])


@dataclass(frozen=True)
class SplitPredictions:
    """One split: the digest of its images and labels, the labels and the predicted classes."""

    images: str
    labels: np.ndarray  # int64 class index per image
    predicted: np.ndarray  # int64 class index per image

    @property
    def correct(self) -> np.ndarray:
        return np.asarray(self.predicted == self.labels, dtype=bool)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.labels) else 0.0


@dataclass(frozen=True)
class Predictions:
    """The per-image predictions of one model, by split name (`val`, `test`)."""

    splits: dict[str, SplitPredictions]

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "splits": {
                name: {
                    "images": part.images,
                    "n": len(part.labels),
                    "labels": _digits(part.labels),
                    "predicted": _digits(part.predicted),
                }
                for name, part in sorted(self.splits.items())
            },
        }
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def split_predictions(images: str, labels: Any, predicted: Any) -> SplitPredictions:
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ")
    return SplitPredictions(images, labels, predicted)


def _digits(values: np.ndarray) -> str:
    if len(values) and (values.min() < 0 or values.max() >= NUM_CLASSES):
        raise ValueError(f"class indices outside 0..{NUM_CLASSES - 1}")
    return "".join(map(str, values.tolist()))


def from_bytes(data: bytes, source: str) -> Predictions:
    """Parse and check a predictions file; any fault is one `ValidationError` line naming
    `source` and what was expected."""

    def bad(what: str) -> ValidationError:
        return ValidationError(f"{source}: not a predictions file ({what})")

    if len(data) > MAX_BYTES:
        raise bad(f"{len(data)} bytes, expected at most {MAX_BYTES}")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise bad(f"expected format {FORMAT!r}")
    splits = body.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("expected a non-empty mapping 'splits'")
    parts = {}
    for name, part in splits.items():
        if not isinstance(part, dict) or set(part) != {"images", "n", "labels", "predicted"}:
            raise bad(f"split {name!r}: expected the keys images, n, labels, predicted")
        n, images = part["n"], part["images"]
        if not isinstance(images, str) or isinstance(n, bool) or not isinstance(n, int):
            raise bad(f"split {name!r}: expected a string 'images' and an integer 'n'")
        columns = []
        for key in ("labels", "predicted"):
            text = part[key]
            if not isinstance(text, str) or len(text) != n or not set(text) <= _DIGITS:
                raise bad(f"split {name!r}: expected {key} as {n} class digits")
            columns.append(np.frombuffer(text.encode(), np.uint8).astype(np.int64) - ord("0"))
        parts[str(name)] = SplitPredictions(images, columns[0], columns[1])
    return Predictions(parts)
