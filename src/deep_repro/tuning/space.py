"""The search space: `conf/search/<model>.yaml` parsed, checked, and written as Hydra overrides.

    params:                       # sampled in this order; keys are config keys
      model.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.dropout: {type: float, low: 0.0, high: 0.5, step: 0.05}
      model.hidden: {type: int, low: 64, high: 256, log: true}
      model.channels: {type: categorical, choices: [[16, 32], [32, 64]]}
      optimizer: {type: categorical, choices: [adamw, sgd]}        # a config group
      optimizer.momentum: {type: float, low: 0.8, high: 0.99, when: {optimizer: sgd}}
    pruners:                      # optional constructor arguments, per tune.pruner
      median: {n_startup_trials: 5, n_warmup_steps: 1}

* `float` / `int`: `low` < `high` (both included), `log: true` (needs low > 0) or `step`;
  `grid: [values]` lists the points `tune.sampler=grid` visits (else they come from `step`).
* `categorical`: non-empty `choices`. Lists (architectures) are stored in Optuna under their JSON
  text (`"[16, 32]"`, Optuna only stores primitives); trials, MLflow and the experiment file get
  the real list.
* A key naming a config group (optimizer, scheduler, augment) becomes a group override
  (`optimizer=sgd`); other keys become `++key=value` (set or add, since e.g. `optimizer.momentum`
  exists only in some options). `model` is not searchable: it picks the search file (one study
  per architecture).
* `when: {key: value or [values]}` makes a parameter conditional on an earlier one (or on the base
  config when that key is not searched). Optuna's define-by-run sampling handles the rest.
* A searched key that is also fixed on the command line is taken out of the search (the command
  line wins), so `deep-repro tune model=cnn optimizer=sgd` searches only the rest.

Every file is checked before any trial runs: unknown keys (not in the composed config), empty or
inverted ranges, log ranges touching 0, empty choices, and every range end / choice composed and
validated against the typed schema (`config.validate`), so a trial can never get an invalid config.
"""

from __future__ import annotations

import contextlib
import decimal
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from deep_repro import config
from deep_repro.errors import ConfigError, DeepReproError, first_line
from deep_repro.paths import repo_root

log = logging.getLogger(__name__)

# Config groups that are not hyperparameters (experiment: the output; search: this input).
NON_GROUPS = ("experiment", "search")
# Sections a trial cannot meaningfully vary, with the reason shown to the user.
NOT_SEARCHABLE = {
    "tune": "it configures the study itself",
    "tracking": "it says where results go, not what is trained",
    "data": "trials read the split file produced by DVC; change it and rerun `dvc repro split`",
    "split": "trials read the split file produced by DVC; change it and rerun `dvc repro split`",
    "postprocess": "it is not used while training",
    "evaluate": "it is not used while training (the test set never takes part in selection)",
    "analyze": "it configures the data report, not training",
    "train.epochs": "trials train for tune.epochs (the pipeline for train.epochs)",
}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "grid", "when"},
    "int": {"type", "low", "high", "log", "step", "grid", "when"},
    "categorical": {"type", "choices", "when"},
}


# --------------------------------------------------------------------------- small helpers
def _encode(value: Any) -> Any:
    """Optuna stores only primitives as categorical choices: lists/mappings go in as JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _hydra_value(value: Any) -> str:
    """A Python value as Hydra override grammar (strings always quoted: `'1e-3'` stays a str)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot express {value!r} as a Hydra override")


def get_key(mapping: Mapping[str, Any], key: str) -> Any:
    """`mapping["a"]["b"]` for key `a.b`; None where the key does not exist."""
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def set_key(mapping: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b` in a nested mapping, creating sections on the way."""
    *parents, last = key.split(".")
    node = mapping
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def compose(overrides: Sequence[str], conf_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """`config.compose_with_choices` (the config and each group's chosen option, without the
    non-hyperparameter groups), Hydra's multi-line exceptions turned into one ConfigError line."""
    try:
        raw, choices = config.compose_with_choices(list(overrides), conf_dir)
    except DeepReproError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"config error: cannot compose conf/ with overrides "
            f"{' '.join(overrides) or '(none)'}: {first_line(exc)}"
        ) from None
    return raw, {g: c for g, c in choices.items() if "/" not in g and g not in NON_GROUPS}


def config_groups(conf_dir: Path) -> dict[str, list[str]]:
    """`{"optimizer": ["adamw", "sgd"], ...}` from the conf/ directory layout."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir() and d.name not in NON_GROUPS and any(d.glob("*.yaml"))
    }


# --------------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    """One searched key of `conf/search/<model>.yaml`."""

    key: str
    type: str  # float | int | categorical
    group: bool = False  # a config group choice (optimizer=sgd)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    grid: tuple[Any, ...] | None = None
    choices: tuple[Any, ...] = ()  # real values (lists for architectures)
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def labels(self) -> tuple[Any, ...]:
        """The categorical choices as Optuna stores them."""
        return tuple(_encode(c) for c in self.choices)

    @property
    def bounds(self) -> tuple[float, float]:
        """`(low, high)` of a numeric parameter (parsing guarantees both are set)."""
        assert self.low is not None and self.high is not None, self.key
        return self.low, self.high

    def distribution(self) -> BaseDistribution:
        if self.type == "categorical":
            return CategoricalDistribution(self.labels)
        low, high = self.bounds
        if self.type == "int":
            return IntDistribution(int(low), int(high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(low), float(high), log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample (or, for a re-queued trial, read back) this parameter; returns the real value."""
        if self.type == "categorical":
            label = trial.suggest_categorical(self.key, self.labels)
            return self.choices[self.labels.index(label)]
        low, high = self.bounds
        if self.type == "int":
            return trial.suggest_int(
                self.key, int(low), int(high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_float(
            self.key,
            float(low),
            float(high),
            log=self.log,
            step=self.step,
        )

    def decode(self, stored: Any) -> Any:
        """Optuna's stored value -> the real config value."""
        if self.type == "categorical" and stored in self.labels:
            return self.choices[self.labels.index(stored)]
        return stored

    def grid_points(self) -> list[Any] | None:
        """Values (as Optuna stores them) the grid sampler visits; None: not enumerable."""
        if self.type == "categorical":
            return list(self.labels)
        if self.grid is not None:
            return list(self.grid)
        if self.step is None:
            return None
        lo, st = decimal.Decimal(str(self.low)), decimal.Decimal(str(self.step))
        count = int((decimal.Decimal(str(self.high)) - lo) / st) + 1
        kind = int if self.type == "int" else float
        return [kind(lo + k * st) for k in range(count)]

    def candidates(self) -> list[Any]:
        """The extreme values a trial can get: checked against the schema before any trial."""
        if self.type == "categorical":
            return list(self.choices)
        return list(dict.fromkeys([self.low, self.high, *(self.grid or ())]))

    def override(self, value: Any) -> str:
        return f"{self.key}={value}" if self.group else f"++{self.key}={_hydra_value(value)}"

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(k in values and values[k] in accepted for k, accepted in self.when)


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: tuple[Param, ...]
    pruners: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        with contextlib.suppress(ValueError):
            return self.path.resolve().relative_to(repo_root()).as_posix()
        return str(self.path)

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)
