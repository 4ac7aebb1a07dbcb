"""The model registry: one entry per `model.name`, the only place a model kind is looked up.

An architecture (`deep_repro.models.architectures`) registers its schema and builder with
`@register(Schema, trainer=..., channels_last=...)`. Everything else (config validation, the
trainer dispatch, the memory format, benchmarks, tuning) looks the kind up in `MODELS`; the
schema also becomes an option of the config's `model` section (`config.register_architecture`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from deep_repro.config.model_base import ModelConfig, register_architecture
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
        register_architecture(schema)
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
