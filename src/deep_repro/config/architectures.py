"""Architectures' hyperparameters (config group `model`): one schema per `model.name`.

Each schema is a frozen dataclass named by `name: Literal[...]` with types and ranges only (the
values live in `conf/model/<name>.yaml`), cross-field rules (`check`) and a size estimate from the
config alone (`footprint`, which `preflight` uses to refuse a model that cannot fit in memory
before anything is deleted). The builders that turn a schema into a network live in
`deep_repro.models` (the registry), which imports this module, never the other way round: the
config is validated without importing torch or any model code.

Adding an architecture: its schema here (and in ARCHITECTURES), its builder in
`deep_repro/models/registry.py`, its values in `conf/model/<name>.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deep_repro.config.task import NUM_CLASSES
from deep_repro.config.typecheck import _fail, option_name, rng


@dataclass(frozen=True)
class ModelConfig:
    """Base of every architecture's schema (group `model`), each with a `name: Literal[...]`."""

    name: str

    @classmethod
    def tagged_options(cls) -> dict[str, type]:
        """The architectures `model.name` may pick."""
        return {option_name(schema): schema for schema in ARCHITECTURES}

    def check(self) -> None:
        """Cross-field rules of this architecture; raise ConfigError naming `model.<key>`."""

    def footprint(self) -> tuple[int, int]:
        """(parameters, activation values per image in one forward pass), from the config
        alone (no torch): `preflight` refuses a model that cannot fit in memory before the
        train stage deletes the last checkpoint. tests/test_preflight.py compares the parameters
        with torch's count for every registered model."""
        raise NotImplementedError(self.name)


@dataclass(frozen=True)
class TorchModelConfig(ModelConfig):
    """Base of the networks trained by `training.fit` (gradient descent needs a learning rate)."""

    lr: float = field(metadata=rng(gt=0.0))
    dropout: float = field(metadata=rng(ge=0.0, lt=1.0))


def check_sizes(
    key: str, values: list[int], *, at_most: int | None = None, too_many: str = ""
) -> None:
    """A model's list of layer sizes: non-empty, every item >= 1, at most `at_most` items."""
    if not values or any(v < 1 for v in values):
        raise _fail(f"model.{key}", values, "a non-empty list of integers >= 1")
    if at_most is not None and len(values) > at_most:
        raise _fail(f"model.{key}", values, too_many or f"at most {at_most} items")


def _linear(fan_in: int, fan_out: int) -> int:
    """Parameters of `nn.Linear` (weights and bias)."""
    return (fan_in + 1) * fan_out


def _conv_bn(cin: int, cout: int, kernel: int = 3) -> int:
    """Parameters of a bias-free convolution and its BatchNorm (`_conv_bn_relu`)."""
    return cin * cout * kernel * kernel + 2 * cout


@dataclass(frozen=True)
class LogRegConfig(ModelConfig):
    name: Literal["logreg"]
    C: float = field(metadata=rng(gt=0.0))
    max_iter: int = field(metadata=rng(ge=1))

    def footprint(self) -> tuple[int, int]:
        return _linear(28 * 28, NUM_CLASSES), 28 * 28 + NUM_CLASSES


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class CNNConfig(TorchModelConfig):
    name: Literal["cnn"]
    channels: list[int]
    # Convolutions per block (all of width channels[i]); the last one of a block is pooled.
    convs_per_block: int = field(metadata=rng(ge=1, le=4))
    # Pool right after the block's last convolution, before its BatchNorm and ReLU: the same
    # layers, but BN and ReLU (memory-bound: a few FLOPs per byte) run on a quarter of the
    # pixels. On two CPU cores that alone makes the training step ~1.6x faster (benchmarks/).
    pool_before_bn: bool
    hidden: int = field(metadata=rng(ge=1))

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


@dataclass(frozen=True)
class ResNetConfig(TorchModelConfig):
    name: Literal["resnet"]
    width: int = field(metadata=rng(ge=4))
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


@dataclass(frozen=True)
class MobileNetConfig(TorchModelConfig):
    name: Literal["mobilenet"]
    width: int = field(metadata=rng(ge=4))
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


# The options of `model.name`, in the order `conf/model/` lists them.
ARCHITECTURES: tuple[type[ModelConfig], ...] = (
    LogRegConfig,
    MLPConfig,
    CNNConfig,
    ResNetConfig,
    MobileNetConfig,
)
