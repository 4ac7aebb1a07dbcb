"""Architectures (config group `model`). Every network maps normalised float images
`[N, 1, 28, 28]` to class logits; normalisation itself is part of the *inference* model
(see `deep_repro.inference`), so training and serving cannot disagree about it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from deep_repro.config import CNNConfig, LogRegConfig, MLPConfig, ModelConfig, ResNetConfig
from deep_repro.data import NUM_CLASSES

if TYPE_CHECKING:
    from collections.abc import Sequence

# Pixel statistics of the Fashion-MNIST training set (uint8 scale / 255).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def mlp(hidden_sizes: Sequence[int], dropout: float, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    # bias=False: the following BatchNorm has its own shift (and is folded away at inference).
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def cnn(channels: Sequence[int], hidden: int, dropout: float) -> nn.Sequential:
    """conv-BN-ReLU-maxpool blocks (28 -> 14 -> 7 [-> 3]), then Linear-ReLU-Dropout-Linear."""
    layers: list[nn.Module] = []
    cin, size = 1, 28
    for cout in channels:
        layers += [*_conv_bn_relu(cin, cout), nn.MaxPool2d(2)]
        cin, size = cout, size // 2
    layers += [nn.Flatten(), nn.Linear(cin * size * size, hidden), nn.ReLU(inplace=True),
               nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def resnet(width: int, blocks: Sequence[int], dropout: float) -> nn.Sequential:
    """A small ResNet for 28x28 inputs: stem, up to 3 stages (width doubling, stride 2)."""
    layers: list[nn.Module] = [*_conv_bn_relu(1, width)]
    cin = width
    for stage, n_blocks in enumerate(blocks):
        cout = width * 2**stage
        for i in range(n_blocks):
            layers.append(BasicBlock(cin, cout, stride=2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
               nn.Linear(cin, NUM_CLASSES)]
    return nn.Sequential(*layers)


def linear_classifier() -> nn.Sequential:
    """Logistic regression as a module (weights come from scikit-learn)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, NUM_CLASSES))


def build_model(cfg: ModelConfig) -> nn.Sequential:
    if isinstance(cfg, MLPConfig):
        return mlp(cfg.hidden_sizes, cfg.dropout, cfg.activation)
    if isinstance(cfg, CNNConfig):
        return cnn(cfg.channels, cfg.hidden, cfg.dropout)
    if isinstance(cfg, ResNetConfig):
        return resnet(cfg.width, cfg.blocks, cfg.dropout)
    if isinstance(cfg, LogRegConfig):
        return linear_classifier()
    raise ValueError(f"unknown model {cfg!r}")  # pragma: no cover - schema rejects it


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
