"""MLflow pyfunc flavour of the inference model ("models from code": this file and
`safe_archive.py` are copied into the logged model, so serving needs only mlflow, torch, numpy
and pandas — no deep-repro code, and nothing is unpickled).

Input: pixel values 0..255 shaped `[N, 28, 28]`, `[N, 1, 28, 28]` or `[N, 784]` (a tensor, or a
DataFrame with 784 pixel columns). The logged signature declares float64 so that JSON numbers
reach `predict` unchanged: a uint8 signature would make the scoring server cast 0.5 to 0 and 300
to 44 before the model could object. Anything that is not a whole number in 0..255 is refused
(HTTP 400). Output: a DataFrame with the predicted class index, its name, and one probability
column per class.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

try:  # the logged model: MLflow puts the copy logged alongside this file on sys.path
    import safe_archive
except ImportError:  # inside the project (log time)
    from deep_repro import safe_archive

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def to_pixels(values) -> np.ndarray:
    """Validate model input and return it as uint8 `[N, 28, 28]` (never echoes the input)."""
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == np.bool_):
        raise _invalid(f"pixel values must be numbers, got dtype {array.dtype}")
    if array.size % 784 or array.size == 0:
        raise _invalid(f"expected images of 28x28 = 784 pixels, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all():
            raise _invalid("pixel values must be finite numbers in 0..255 (got NaN or inf)")
        fractional = int(np.count_nonzero(array != np.round(array)))
        if fractional:
            raise _invalid(f"pixel values must be whole numbers in 0..255; {fractional} of "
                           f"{array.size} values have a fractional part")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise _invalid(f"pixel values must lie in 0..255, got values from {low:g} to {high:g}")
    return np.ascontiguousarray(array, dtype=np.uint8).reshape(-1, 28, 28)


class FashionMNISTClassifier(mlflow.pyfunc.PythonModel):
    # No type hints on these two methods: MLflow would try to derive a schema from them; the
    # signature is inferred from a real input example when the model is logged instead.
    def load_context(self, context):
        self.program = safe_archive.load_pt2(context.artifacts["program"])

    def predict(self, context, model_input, params=None):
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input
        images = torch.from_numpy(to_pixels(values))
        with torch.no_grad():
            probs = torch.softmax(self.program(images), dim=1).numpy()
        pred = probs.argmax(axis=1)
        frame = pd.DataFrame(probs, columns=[f"p_{n}" for n in CLASS_NAMES])
        frame.insert(0, "class_name", [CLASS_NAMES[i] for i in pred])
        frame.insert(0, "predicted", pred.astype(np.int64))
        return frame


mlflow.models.set_model(FashionMNISTClassifier())
