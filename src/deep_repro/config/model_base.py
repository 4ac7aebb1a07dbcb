"""What the config knows of architectures: the base of their schemas and the names registered.

`model` is an open tagged union: each architecture's schema (a pydantic model named by
`name: Literal[...]`, types and ranges only) lives beside its builder in
`deep_repro.models.architectures`, which registers it here on import. The config layer never
imports model code, so a stage that does not declare `model` params (the data stages) validates
every other section and keeps `model` unchecked (`typecheck.Unchecked`): adding or editing an
architecture then reruns no data stage. The `validate` stage, which runs first in every pipeline,
imports the models and checks everything.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from deep_repro.config.typecheck import Schema, fail, option_name

# name -> schema, in registration order (the order `conf/model/` and error messages list them).
_ARCHITECTURES: dict[str, type[ModelConfig]] = {}


class ModelConfig(Schema):
    """Base of every architecture's schema (group `model`), each with a `name: Literal[...]`."""

    name: str

    @classmethod
    def tagged_options(cls) -> dict[str, type]:
        """The architectures `model.name` may pick."""
        if not _ARCHITECTURES:  # a programming error: the caller must import the models
            raise RuntimeError(
                "no architecture is registered: import deep_repro.models before validating the "
                "model section"
            )
        return dict(_ARCHITECTURES)

    def check(self) -> None:
        """Cross-field rules of this architecture; raise ConfigError naming `model.<key>`."""

    def footprint(self) -> tuple[int, int]:
        """(parameters, activation values per image in one forward pass), from the config
        alone (no torch): `preflight` refuses a model that cannot fit in memory before the
        train stage deletes the last checkpoint. tests/test_preflight.py compares the parameters
        with torch's count for every registered model."""
        raise NotImplementedError(self.name)


class TorchModelConfig(ModelConfig):
    """Base of the networks trained by `training.fit` (gradient descent needs a learning rate)."""

    lr: Annotated[float, Field(gt=0.0)]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]


def register_architecture(schema: type[ModelConfig]) -> None:
    """Make `schema` an option of `model.name` (called by `deep_repro.models.register`)."""
    name = option_name(schema)
    if name in _ARCHITECTURES:  # pragma: no cover - a programming error, caught on import
        raise ValueError(f"architecture {name!r} registered twice")
    _ARCHITECTURES[name] = schema


def architectures() -> tuple[type[ModelConfig], ...]:
    """The registered schemas, in registration order (empty until `deep_repro.models` is
    imported)."""
    return tuple(_ARCHITECTURES.values())


def check_sizes(
    key: str, values: list[int], *, at_most: int | None = None, too_many: str = ""
) -> None:
    """A model's list of layer sizes: non-empty, every item >= 1, at most `at_most` items."""
    if not values or any(v < 1 for v in values):
        raise fail(f"model.{key}", values, "a non-empty list of integers >= 1")
    if at_most is not None and len(values) > at_most:
        raise fail(f"model.{key}", values, too_many or f"at most {at_most} items")
