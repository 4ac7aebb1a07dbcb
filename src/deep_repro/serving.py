"""MLflow pyfunc flavour of the inference model ("models from code": this file is copied into
the logged model, so serving needs only mlflow, torch, numpy and pandas — no pickle, and no
deep-repro code).

Input: uint8-compatible pixel values shaped `[N, 28, 28]`, `[N, 1, 28, 28]` or `[N, 784]`
(a tensor, or a DataFrame with 784 pixel columns). Output: a DataFrame with the predicted class
index, its name, and one probability column per class.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNISTClassifier(mlflow.pyfunc.PythonModel):
    # No type hints on these two methods: MLflow would try to derive a schema from them; the
    # signature is inferred from a real input example when the model is logged instead.
    def load_context(self, context):
        self.program = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input
        array = np.asarray(values)
        if array.size % 784:
            raise ValueError(f"expected images of 28x28 = 784 pixels, got shape {array.shape}")
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise ValueError("pixel values must lie in 0..255")
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).reshape(-1, 28, 28)
        with torch.no_grad():
            probs = torch.softmax(self.program(images), dim=1).numpy()
        pred = probs.argmax(axis=1)
        frame = pd.DataFrame(probs, columns=[f"p_{n}" for n in CLASS_NAMES])
        frame.insert(0, "class_name", [CLASS_NAMES[i] for i in pred])
        frame.insert(0, "predicted", pred.astype(np.int64))
        return frame


mlflow.models.set_model(FashionMNISTClassifier())
