"""Serving on the command line: image files in, class probabilities out (`deep-repro predict`).

Imports stay lazy: `predict` must start about as fast as `import torch` (no MLflow on the
`.pt2` path, nor for a cached champion).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError, TrackingError

log = logging.getLogger("deep_repro")


# Fashion-MNIST images are 28x28; a photo is a few thousand pixels a side. Pillow's own bomb
# limit (~89 MP) still lets an 80,000,000 x 1 strip through, whose decode and resize need GBs.
MAX_SIDE = 10_000
MAX_PIXELS = 25_000_000


def load_image(path: Path) -> Any:
    """Any image file -> uint8 [28, 28] like Fashion-MNIST (grayscale, light garment on dark).

    Only regular files are read (a FIFO or a device would block or never end); images wider or
    taller than MAX_SIDE or with more than MAX_PIXELS pixels are refused from their header,
    before anything is decoded. 16-bit images are scaled to 8 bit (65535 -> 255), not clipped.
    """
    import stat
    import struct
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever, before any
        # check could run; fstat of the open descriptor cannot be raced by a rename.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise DeepReproError(f"cannot read image ({exc.strerror or type(exc).__name__})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeepReproError("refused: not a regular file")
        try:
            with warnings.catch_warnings():
                # Pillow only warns between 1x and 2x its pixel limit: refuse those too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fh) as img:
                    width, height = img.size  # from the header: nothing decoded yet
                    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                        raise DeepReproError(
                            f"refused image: too many pixels ({width}x{height}; at most "
                            f"{MAX_SIDE} per side and {MAX_PIXELS:,} in total)"
                        )
                    img.load()
                    gray = _to_gray8(img, np)
            gray = gray.resize((28, 28), Image.Resampling.LANCZOS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DeepReproError(f"refused image: too many pixels ({exc})") from None
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            struct.error,
            MemoryError,
        ) as exc:
            raise DeepReproError(f"cannot read image ({type(exc).__name__}: {exc})") from None
    array = np.asarray(gray, dtype=np.uint8)
    # Product photos are dark-on-light; Fashion-MNIST is light-on-dark. Judge by the border.
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    if border.mean() > 127:
        array = 255 - array
    return array


def _to_gray8(img: Any, np: Any) -> Any:
    """An 8-bit grayscale ("L") copy of `img`. Pillow's own conversion of 16-bit modes clips
    every value above 255 to white; rescale them instead."""
    from PIL import Image

    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        wide = np.asarray(img).astype(np.float64)
        scaled = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    return img.convert("L")


def _program_predictor(program_path: Path, identity: dict[str, str]) -> Any:
    """A callable images[N,28,28] uint8 -> probabilities [N,10] from an exported program, loaded
    through the safe-archive check; writes the opt-in prediction log like the pyfunc model."""
    import torch

    from deep_repro.inference import fast_program
    from deep_repro.inference.export import predict_logits

    # A verified fast-start copy of the program (see fast_program): torch.export.load itself
    # costs about as much again as `import torch`, once per distinct file.
    program = fast_program.load(program_path, fast_program.default_cache())

    def predict_program(x: Any) -> Any:
        probs = torch.softmax(predict_logits(program, x), dim=1).numpy()
        if os.environ.get("DEEP_REPRO_PREDICTION_LOG"):  # opt-in: imports mlflow
            from deep_repro.serving.pyfunc import _file_md5, log_predictions

            log_predictions(
                x, probs, {"md5": identity.get("md5") or _file_md5(program_path), **identity}
            )
        return probs

    return predict_program


def load_predictor(model_ref: str, uri: str | None = None) -> Any:
    """A callable images[N,28,28] uint8 -> probabilities [N,10] from a .pt2 or a models:/ URI.

    A registered model in a store this CLI can query cheaply (`uri`: local sqlite, http(s)) is
    served from a local copy of its program (`model_cache`); anything else goes through MLflow's
    pyfunc loader."""
    if model_ref.endswith(".pt2") and not model_ref.startswith(("models:/", "runs:/")):
        return _program_predictor(Path(model_ref), {"path": model_ref})
    if uri is not None and model_ref.startswith("models:/"):
        from deep_repro.serving import model_cache

        version = model_cache.resolve(uri, model_ref)
        if version is not None:
            os.environ.setdefault("DEEP_REPRO_PREDICTION_LOG_MODEL", model_ref)
            path, md5 = model_cache.cached_program(uri, version)
            return _program_predictor(path, {"md5": md5})
    import mlflow.pyfunc
    import numpy as np
    from mlflow.exceptions import MlflowException

    if uri is not None:
        use_registry(uri)
    # The pyfunc model writes the prediction log itself (it only knows its program's md5).
    os.environ.setdefault("DEEP_REPRO_PREDICTION_LOG_MODEL", model_ref)
    try:
        model = mlflow.pyfunc.load_model(model_ref)
    except (MlflowException, OSError, ValueError) as exc:  # ValueError: a refused program
        raise TrackingError(model_error(model_ref, exc)) from None

    def predict(x: Any) -> Any:
        # The logged signature takes float64 pixel values (see deep_repro/serving/pyfunc.py).
        frame = model.predict(np.asarray(x, dtype=np.float64))
        return frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()

    return predict


def model_error(model_ref: str, exc: Exception) -> str:
    """One line for a model MLflow could not load; a missing alias says what to do."""
    from mlflow import get_registry_uri

    from deep_repro.serving import model_cache

    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    parsed = model_cache.parse_models_uri(model_ref)
    # "Registered model alias champion not found", or no such registered model at all
    if parsed and parsed[1] and "not found" in first.lower():
        return model_cache.missing_alias_message(parsed[0], parsed[1], get_registry_uri())
    return f"cannot load model {model_ref}: {first}"


def use_registry(uri: str) -> None:
    """Point MLflow at the store for a models:/ or runs:/ reference (also outside a project)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
