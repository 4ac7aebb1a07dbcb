"""Architecture: the model registry and the architectures in it (logreg, MLP, CNN, ResNet,
MobileNet), each one's schema beside its builder, with the trainer it needs and its memory layout.

Importing this package registers every architecture as an option of the config's `model`
section; a process that validates `model` imports it first. It imports no torch.
"""

from deep_repro.models.architectures import (
    CNNConfig,
    LogRegConfig,
    MLPConfig,
    MobileNetConfig,
    ResNetConfig,
    cnn,
    linear_classifier,
    mlp,
    mobilenet,
    resnet,
)
from deep_repro.models.registry import (
    MODELS,
    ModelSpec,
    TrainerKind,
    build_model,
    count_parameters,
    get_spec,
    register,
)

__all__ = [
    "MODELS",
    "CNNConfig",
    "LogRegConfig",
    "MLPConfig",
    "MobileNetConfig",
    "ModelSpec",
    "ResNetConfig",
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
