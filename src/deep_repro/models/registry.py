"""Architectures (config group `model`): the one registry of model kinds.

Each architecture is one entry here: its schema (a dataclass named by `name: Literal[...]`, no
default values: they live in `conf/model/<name>.yaml`) and its builder, registered with
`@register(Schema, trainer=..., channels_last=...)`. Everything else (config validation, the
trainer dispatch, the memory format, benchmarks, tuning) looks the kind up in `MODELS`.

Every network maps normalised float images `[N, 1, 28, 28]` to class logits; normalisation itself
is part of the *inference* model (see `deep_repro.inference`), so training and serving cannot
disagree about it.

This module imports no torch at import time (builders import it when called): config
validation reads the schemas here and must stay cheap for the CLI and every stage's start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from deep_repro.config.architectures import (
    CNNConfig,
    LogRegConfig,
    MLPConfig,
    MobileNetConfig,
    ModelConfig,
    ResNetConfig,
)
from deep_repro.config.task import NUM_CLASSES
from deep_repro.config.typecheck import option_name

if TYPE_CHECKING:
    from torch import nn

TrainerKind = Literal["torch", "sklearn"]


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: how to validate, build and train it."""

    name: str
    schema: type[ModelConfig]
    build: Callable[[Any], nn.Module]
    # "torch": `training.fit` (gradient descent, per-epoch metrics, pruning in tuning);
    # "sklearn": `logreg.fit_logreg` (one lbfgs fit, weights copied into `build()`'s module).
    trainer: TrainerKind
    # Train/evaluate with NHWC tensors: faster convolutions; pointless for Linear-only nets.
    channels_last: bool


MODELS: dict[str, ModelSpec] = {}
S = TypeVar("S", bound=ModelConfig)


def register(
    schema: type[S], *, trainer: TrainerKind, channels_last: bool = False
) -> Callable[[Callable[[S], nn.Module]], Callable[[S], nn.Module]]:
    """Decorator: add the builder of `schema`'s architecture to the registry."""
    name = option_name(schema)

    def add(build: Callable[[S], nn.Module]) -> Callable[[S], nn.Module]:
        if name in MODELS:  # pragma: no cover - a programming error, caught on import
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelSpec(name, schema, build, trainer, channels_last)
        return build

    return add


def get_spec(name: str) -> ModelSpec:
    """The registry entry of a model name (the schema has already rejected unknown names)."""
    return MODELS[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The untrained network of a validated model config."""
    return get_spec(cfg.name).build(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_bn_relu(
    cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3
) -> list[nn.Module]:
    from torch import nn

    # bias=False: the following BatchNorm has its own shift (and is folded away at inference).
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


# --------------------------------------------------------------------------- logreg
@register(LogRegConfig, trainer="sklearn")
def linear_classifier(cfg: LogRegConfig | None = None) -> nn.Sequential:
    """Logistic regression as a module (weights come from scikit-learn)."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, NUM_CLASSES))


# --------------------------------------------------------------------------- mlp
@register(MLPConfig, trainer="torch")
def mlp(cfg: MLPConfig) -> nn.Sequential:
    from torch import nn

    activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[cfg.activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for size in cfg.hidden_sizes:
        layers += [nn.Linear(width, size), activation(), nn.Dropout(cfg.dropout)]
        width = size
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- cnn
@register(CNNConfig, trainer="torch", channels_last=True)
def cnn(cfg: CNNConfig) -> nn.Sequential:
    """VGG-style blocks (28 -> 14 -> 7 [-> 3] pixels), each `convs_per_block` 3x3 convolutions
    with BN and ReLU and one 2x2 max-pool, then Linear-ReLU-Dropout-Linear."""
    from torch import nn

    layers: list[nn.Module] = []
    cin, size = 1, 28
    for cout in cfg.channels:
        for _ in range(cfg.convs_per_block - 1):
            layers += _conv_bn_relu(cin, cout)
            cin = cout
        if cfg.pool_before_bn:
            # max-pool commutes with ReLU, not with BN: a (slightly) different model than
            # conv-BN-ReLU-pool, trained as such; at inference this BN stays unfolded.
            conv, bn, relu = _conv_bn_relu(cin, cout)
            layers += [conv, nn.MaxPool2d(2), bn, relu]
        else:
            layers += [*_conv_bn_relu(cin, cout), nn.MaxPool2d(2)]
        cin, size = cout, size // 2
    layers += [
        nn.Flatten(),
        nn.Linear(cin * size * size, cfg.hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, NUM_CLASSES),
    ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- resnet
@functools.cache
def _basic_block() -> type[nn.Module]:
    """The residual block class, defined on first use so that importing this module needs no
    torch (only its state_dict keys matter to checkpoints and `torch.export`)."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                *_conv_bn_relu(cin, cout, stride),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.body(x) + self.shortcut(x))

    return BasicBlock


@register(ResNetConfig, trainer="torch", channels_last=True)
def resnet(cfg: ResNetConfig) -> nn.Sequential:
    """A small ResNet for 28x28 inputs: stem, up to 3 stages (width doubling, stride 2)."""
    from torch import nn

    block = _basic_block()
    layers: list[nn.Module] = [*_conv_bn_relu(1, cfg.width)]
    cin = cfg.width
    for stage, n_blocks in enumerate(cfg.blocks):
        cout = cfg.width * 2**stage
        for i in range(n_blocks):
            layers.append(block(cin, cout, stride=2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cin, NUM_CLASSES),
    ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- mobilenet
@register(MobileNetConfig, trainer="torch", channels_last=True)
def mobilenet(cfg: MobileNetConfig) -> nn.Sequential:
    """MobileNet-style: a 3x3 stem, then depthwise-separable blocks (3x3 depthwise conv with
    stride 2, 1x1 pointwise conv, each BN-ReLU), global average pooling and a linear head."""
    from torch import nn

    layers: list[nn.Module] = [*_conv_bn_relu(1, cfg.width)]
    cin = cfg.width
    for cout in cfg.channels:
        layers += [
            *_conv_bn_relu(cin, cin, stride=2, groups=cin),
            *_conv_bn_relu(cin, cout, kernel=1),
        ]
        cin = cout
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cin, NUM_CLASSES),
    ]
    return nn.Sequential(*layers)
