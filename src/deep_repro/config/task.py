"""The task itself: Fashion-MNIST's ten classes, its image shape and pixel statistics.

Facts, not settings (no key of `conf/` changes them): the data step decodes and checks images
against them, the architectures size their first and last layers by them, and the inference model
bakes the normalisation in. `serving/pyfunc.py` keeps its own copy of CLASS_NAMES (it is logged with
the model and imports nothing of this package); a test keeps the two equal.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
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
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

# Pixel statistics of the Fashion-MNIST training set (uint8 scale / 255).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


def class_label(index: int) -> str:
    """`3 Dress`: DVC/vega sort category axes alphabetically; the index prefix keeps the
    dataset's class order, the same order as the PNG confusion matrix."""
    return f"{index} {CLASS_NAMES[index]}"
