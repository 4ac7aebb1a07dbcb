"""MLflow pyfunc flavour of the inference model ("models from code": this file and
`safe_archive.py` are copied into the logged model, so serving needs only mlflow, torch, numpy
and pandas — no deep-repro code, and nothing is unpickled).

Input: pixel values 0..255 of any numeric dtype (uint8, int64, float32, float64, ...), shaped
`[N, 28, 28]`, `[N, 1, 28, 28]` or `[N, 784]`: an array, or a DataFrame with 784 pixel columns.
Over HTTP that is `{"inputs": ...}` or `{"instances": ...}` (nested lists), or
`{"dataframe_split": {"columns": [...784 names], "data": [[...784 values], ...]}}` (and, through
`deep-repro serve` only, a `.npy` body of uint8 images: serving/wire.py).

The logged signature declares only the output: MLflow's tensor schema admits exactly one dtype
and one shape, so any input schema would refuse most of the forms above before `predict` sees
them (and a uint8 one would make the scoring server cast 0.5 to 0 and 300 to 44). `to_pixels`
is the check instead: anything that is not a whole number in 0..255 in one of those shapes is
refused (HTTP 400), and no message echoes the input. Output: a DataFrame with the predicted
class index, its name, and one probability column per class.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel

try:  # the logged model: MLflow puts the copy logged alongside this file on sys.path
    import safe_archive
except ImportError:  # inside the project (log time)
    from deep_repro.inference import safe_archive

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


CHUNK = 64  # images per call of the program (see `predict`)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def to_pixels(values) -> np.ndarray:
    """Validate model input and return it as uint8 `[N, 28, 28]` (never echoes the input)."""
    array = np.asarray(values)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise _invalid(f"pixel values must be numbers, got dtype {array.dtype}")
    if array.size % 784 or array.size == 0:
        raise _invalid(f"expected images of 28x28 = 784 pixels, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all():
            raise _invalid("pixel values must be finite numbers in 0..255 (got NaN or inf)")
        fractional = int(np.count_nonzero(array != np.round(array)))
        if fractional:
            raise _invalid(
                f"pixel values must be whole numbers in 0..255; {fractional} of "
                f"{array.size} values have a fractional part"
            )
    if array.min() < 0 or array.max() > 255:
        # How many, never which: an error body must not repeat what the client sent.
        outside = int(np.count_nonzero((array < 0) | (array > 255)))
        raise _invalid(f"pixel values must lie in 0..255; {outside} of {array.size} do not")
    pixels = np.ascontiguousarray(array, dtype=np.uint8).reshape(-1, 28, 28)
    # torch warns on a read-only array (a view of a request's bytes is): 50 KB per 64 images
    return pixels if pixels.flags.writeable else pixels.copy()


# --------------------------------------------------------------------------- prediction log
# Self-contained on purpose (this file is all a served model has); `deep-repro predict` and
# `deep_repro.monitoring` use the same function, so there is one definition of the format.
LOG_ENV, SAMPLE_ENV, LABEL_ENV = (
    "DEEP_REPRO_PREDICTION_LOG",
    "DEEP_REPRO_PREDICTION_LOG_SAMPLE",
    "DEEP_REPRO_PREDICTION_LOG_MODEL",
)
DARK = 26  # pixel values below 10 % of full scale count as background


def image_stats(images):
    """Per-image mean, std and dark fraction of uint8 `[N, 28, 28]` images (0..1 scale)."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0
    return x.mean(axis=1), x.std(axis=1), (x < DARK / 255.0).mean(axis=1)


def log_predictions(images, probs, model):
    """Append one JSON line per image to `$DEEP_REPRO_PREDICTION_LOG/predictions-<UTC day>.jsonl`
    (no-op when unset) and keep up to `$DEEP_REPRO_PREDICTION_LOG_SAMPLE` of the images as .npz.
    One locked O_APPEND write per call, so concurrent server workers never interleave lines."""
    root = os.environ.get(LOG_ENV)
    if not root or len(images) == 0:
        return
    now = datetime.datetime.now(datetime.UTC)
    os.makedirs(root, exist_ok=True)
    model = {**model, "label": os.environ.get(LABEL_ENV)} if os.environ.get(LABEL_ENV) else model
    images, probs = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(probs)
    sample, sampled, limit = None, set(), int(os.environ.get(SAMPLE_ENV) or 0)
    if limit > 0:  # a random subset, written under a temporary name and renamed
        index = np.sort(np.random.default_rng().permutation(len(images))[:limit])
        sample = f"samples/{now:%Y%m%dT%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        tmp = os.path.join(root, sample + ".tmp.npz")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        np.savez_compressed(tmp, images=images[index], index=index)
        os.replace(tmp, os.path.join(root, sample))
        sampled = set(index.tolist())
    mean, std, dark = image_stats(images)
    lines = []
    for i, p in enumerate(probs):
        record = {
            "time": now.isoformat(),
            "model": model,
            "mean": round(float(mean[i]), 5),
            "std": round(float(std[i]), 5),
            "dark": round(float(dark[i]), 5),
            "predicted": int(p.argmax()),
            "confidence": round(float(p.max()), 5),
            "probs": [round(float(v), 5) for v in p],
        }
        if i in sampled:
            record["sample"] = sample
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    data = "".join(lines).encode()
    fd = os.open(
        os.path.join(root, f"predictions-{now:%Y-%m-%d}.jsonl"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    try:
        try:
            import fcntl  # POSIX only; O_APPEND alone already keeps small writes whole

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)  # also releases the lock


def _file_md5(path):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FashionMNISTClassifier(PythonModel):
    def load_context(self, context):
        self.program = safe_archive.load_pt2(context.artifacts["program"])
        self.identity = {"md5": _file_md5(context.artifacts["program"])}

    # The hint silences MLflow's "Add type hints to `predict`" warning on every load without
    # changing validation: np.ndarray (like pd.DataFrame) is one of the hints MLflow derives no
    # schema from, so the logged signature (outputs only) stays in charge and inputs reach
    # `to_pixels` as sent (a list/pydantic hint would switch MLflow to hint-based validation
    # and a payload format of its own). DataFrames come in too, despite the hint.
    def predict(self, context, model_input: np.ndarray, params=None):
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input
        images = torch.from_numpy(to_pixels(values))
        with torch.no_grad():
            # 64 images a call, as `inference.predict_logits` feeds it: a 6-view TTA program's
            # activations then stay under glibc's 32 MB threshold for reusing freed memory (a
            # 1,000-image request in one call would map and fault in ~300 MB afresh each time).
            logits = torch.cat([self.program(chunk) for chunk in images.split(CHUNK)])
            probs = torch.softmax(logits, dim=1).numpy()
        pred = probs.argmax(axis=1)
        if hasattr(self, "identity"):  # loaded as a model (not the signature probe at logging)
            log_predictions(images.numpy(), probs, self.identity)
        frame = pd.DataFrame(probs, columns=[f"p_{n}" for n in CLASS_NAMES])
        frame.insert(0, "class_name", [CLASS_NAMES[i] for i in pred])
        frame.insert(0, "predicted", pred.astype(np.int64))
        return frame


mlflow.models.set_model(FashionMNISTClassifier())
