"""Architecture: the model registry — one builder per `model.name` (logreg, MLP, CNN, ResNet,
MobileNet), with the trainer each needs and its memory layout.

The schema of each architecture's hyperparameters lives in `deep_repro.config` (one schema); a
builder turns a validated config into a `torch.nn.Module`. Importing this package imports no torch.
"""

from deep_repro.models.registry import (
    MODELS,
    ModelSpec,
    TrainerKind,
    build_model,
    cnn,
    count_parameters,
    get_spec,
    linear_classifier,
    mlp,
    mobilenet,
    register,
    resnet,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "TrainerKind",
    "build_model",
    "cnn",
    "count_parameters",
    "get_spec",
    "linear_classifier",
    "mlp",
    "mobilenet",
    "register",
    "resnet",
]
