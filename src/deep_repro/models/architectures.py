"""Architectures (config group `model`): each one's schema beside its builder.

Adding an architecture is this file plus `conf/model/<name>.yaml` (its values) and
`conf/search/<name>.yaml` (its search space): a pydantic model named by `name: Literal[...]` with
types and ranges only (`Field(ge=1)`; no default values: they live in `conf/`), cross-field rules
(`check`), a size estimate from the config alone (`footprint`, which `preflight` uses to refuse a
model that cannot fit in memory before anything is deleted), and a builder registered with
`@register(Schema, trainer=..., channels_last=...)`. Nothing else names a model: config
validation, the trainer dispatch, the memory format, tuning and the benchmarks look it up.

Every network maps normalised float images `[N, 1, 28, 28]` to class logits; normalisation itself
is part of the *inference* model (see `deep_repro.inference`), so training and serving cannot
disagree about it. Importing this module imports no torch (builders import it when called):
validating a config must stay cheap for the CLI and every stage's start-up.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from deep_repro.config.model_base import ModelConfig, TorchModelConfig, check_sizes
from deep_repro.config.task import NUM_CLASSES
from deep_repro.models.registry import register

if TYPE_CHECKING:
    from torch import nn


# --------------------------------------------------------------------------- shared parts
def _linear(fan_in: int, fan_out: int) -> int:
    """Parameters of `nn.Linear` (weights and bias)."""
    return (fan_in + 1) * fan_out


def _conv_bn(cin: int, cout: int, kernel: int = 3) -> int:
    """Parameters of a bias-free convolution and its BatchNorm (`_conv_bn_relu`)."""
    return cin * cout * kernel * kernel + 2 * cout


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
class LogRegConfig(ModelConfig):
    name: Literal["logreg"]
    C: Annotated[float, Field(gt=0.0)]
    max_iter: Annotated[int, Field(ge=1)]

    def footprint(self) -> tuple[int, int]:
        return _linear(28 * 28, NUM_CLASSES), 28 * 28 + NUM_CLASSES


@register(LogRegConfig, trainer="sklearn")
def linear_classifier(cfg: LogRegConfig | None = None) -> nn.Sequential:
    """Logistic regression as a module (weights come from scikit-learn)."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, NUM_CLASSES))


# --------------------------------------------------------------------------- mlp
class MLPConfig(TorchModelConfig):
    name: Literal["mlp"]
    hidden_sizes: list[int]
    activation: Literal["relu", "gelu", "silu"]

    def check(self) -> None:
        check_sizes("hidden_sizes", self.hidden_sizes)

    def footprint(self) -> tuple[int, int]:
        params, acts, width = 0, 28 * 28, 28 * 28
        for size in self.hidden_sizes:
            params, acts, width = params + _linear(width, size), acts + 3 * size, size
        return params + _linear(width, NUM_CLASSES), acts + NUM_CLASSES


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
class CNNConfig(TorchModelConfig):
    name: Literal["cnn"]
    channels: list[int]
    # Convolutions per block (all of width channels[i]); the last one of a block is pooled.
    convs_per_block: Annotated[int, Field(ge=1, le=4)]
    # Pool right after the block's last convolution, before its BatchNorm and ReLU: the same
    # layers, but BN and ReLU (memory-bound: a few FLOPs per byte) run on a quarter of the
    # pixels. On two CPU cores that alone makes the training step ~1.6x faster (benchmarks/).
    pool_before_bn: bool
    hidden: Annotated[int, Field(ge=1)]

    def check(self) -> None:
        check_sizes(
            "channels", self.channels, at_most=3, too_many="at most 3 conv blocks (28 -> 3 pixels)"
        )

    def footprint(self) -> tuple[int, int]:
        params, acts, cin, size = 0, 0, 1, 28
        for cout in self.channels:
            for _ in range(self.convs_per_block):
                params += _conv_bn(cin, cout)
                acts += 2 * cout * size * size  # conv, BN (ReLU in place); an upper bound
                cin = cout
            size //= 2
            acts += cout * size * size  # max-pool
        params += _linear(cin * size * size, self.hidden) + _linear(self.hidden, NUM_CLASSES)
        return params, acts + 2 * self.hidden + NUM_CLASSES


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
class ResNetConfig(TorchModelConfig):
    name: Literal["resnet"]
    width: Annotated[int, Field(ge=4)]
    blocks: list[int]

    def check(self) -> None:
        check_sizes("blocks", self.blocks, at_most=3, too_many="at most 3 stages")

    def footprint(self) -> tuple[int, int]:
        params, size = _conv_bn(1, self.width), 28
        acts, cin = 2 * self.width * size * size, self.width
        for stage, n_blocks in enumerate(self.blocks):
            cout = self.width * 2**stage
            for i in range(n_blocks):
                if i == 0 and stage > 0:
                    size = (size - 1) // 2 + 1  # 3x3, stride 2, padding 1
                params += _conv_bn(cin, cout) + _conv_bn(cout, cout)
                acts += 5 * cout * size * size  # two conv-BN pairs and the sum
                if i == 0 and (stage > 0 or cin != cout):
                    params += _conv_bn(cin, cout, kernel=1)
                    acts += 2 * cout * size * size
                cin = cout
        return params + _linear(cin, NUM_CLASSES), acts + 2 * cin + NUM_CLASSES


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
class MobileNetConfig(TorchModelConfig):
    name: Literal["mobilenet"]
    width: Annotated[int, Field(ge=4)]
    channels: list[int]

    def check(self) -> None:
        check_sizes(
            "channels",
            self.channels,
            at_most=3,
            too_many="at most 3 stride-2 blocks (28 -> 4 pixels)",
        )

    def footprint(self) -> tuple[int, int]:
        params, size = _conv_bn(1, self.width), 28
        acts, cin = 2 * self.width * size * size, self.width
        for cout in self.channels:
            size = (size - 1) // 2 + 1  # depthwise 3x3, stride 2, padding 1
            params += _conv_bn(1, cin) + _conv_bn(cin, cout, kernel=1)  # depthwise: 1 in/group
            acts += 2 * (cin + cout) * size * size
            cin = cout
        return params + _linear(cin, NUM_CLASSES), acts + 2 * cin + NUM_CLASSES


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
