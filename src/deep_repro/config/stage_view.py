"""What one stage may read of the config: exactly the params its dvc.yaml entry declares.

DVC reruns a stage only when a param it *declares* changes, so a stage that read anything else
could leave a stale output looking up to date. Every stage therefore validates the config (one
bad value fails in the first second; `model` only where the stage reads it) and then works on a
restricted view of it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from deep_repro.config.schema import Config, load_config
from deep_repro.errors import UndeclaredParamError

# Always visible to every stage: `tracking` only says where MLflow records runs, so it cannot
# change a DVC output and must not make DVC rerun a stage (it is not declared in dvc.yaml).
AMBIENT_SECTIONS: tuple[str, ...] = ("tracking",)


class StageConfig:
    """A validated `Config` as one stage may see it: only the params its dvc.yaml entry declares.

    DVC reruns a stage only when a param it *declares* changes, so reading anything else would
    make a stale output look up to date. Reading an undeclared param raises
    `UndeclaredParamError` naming the stage and the key. Declared sections are returned as the
    real (typed, frozen) objects; a partly declared one (`train.num_threads`) as a nested view.
    """

    __slots__ = ("_declared", "_prefix", "_stage", "_target")

    def __init__(
        self, stage: str, target: Any, declared: tuple[str, ...], prefix: str = ""
    ) -> None:
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        key = self._prefix + name
        attr = getattr(type(self._target), name, None)
        if isinstance(attr, property):  # e.g. Config.is_torch_model: evaluated through the view
            assert attr.fget is not None
            return attr.fget(self)
        value = getattr(self._target, name)
        if any(key == p or key.startswith(p + ".") for p in self._declared):
            return value
        if any(p.startswith(key + ".") for p in self._declared):
            return StageConfig(self._stage, value, self._declared, key + ".")
        visible = [p for p in self._declared if p not in AMBIENT_SECTIONS]
        raise UndeclaredParamError(
            f"stage {self._stage!r} reads {key}, which its params in dvc.yaml do not declare "
            f"(declared: {', '.join(visible) or 'none'}); add it to the stage's params in "
            "deep_repro.pipeline.STAGES, then `uv run python -m deep_repro.dvc_yaml`"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __repr__(self) -> str:
        return f"StageConfig({self._stage!r}, declared={list(self._declared)})"


def stage_view(cfg: Config, stage: str) -> Config:
    """`cfg` restricted to the params `stage` declares (plus `AMBIENT_SECTIONS`).

    Typed as `Config` so stage code keeps its attribute types; at run time it is a
    `StageConfig`. `unrestricted()` gives the whole config back to the tracking module.
    """
    from deep_repro.pipeline import STAGES

    declared = (*STAGES[stage].params, *AMBIENT_SECTIONS)
    return typing.cast(Config, StageConfig(stage, cfg, declared))


def load_stage_config(stage: str, path: Path | None = None) -> Config:
    """Validate `params.yaml` (one bad value fails the stage in its first second), then return
    the view of it that `stage` may read.

    Every section is checked except `model` when the stage declares no model param: checking it
    needs the architectures' code (`deep_repro.models`), on which a data stage must not depend,
    or adding a model would rerun the download. The `validate` stage has checked it already."""
    from deep_repro.pipeline import STAGES

    declared = STAGES[stage].params
    reads_model = any(p == "model" or p.startswith("model.") for p in declared)
    return stage_view(load_config(path, model=reads_model), stage)


def unrestricted(cfg: Config) -> Config:
    """The whole config behind a stage view (MLflow records all of it; no DVC output does)."""
    while isinstance(cfg, StageConfig):
        cfg = object.__getattribute__(cfg, "_target")
    return cfg
