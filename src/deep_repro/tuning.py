"""Hyperparameter search (model selection) with Optuna, on the DVC train/val split only.

    uv run deep-repro tune model=cnn tune.n_trials=30 tune.sampler=tpe tune.pruner=median

Life cycle
----------
Tuning is *model selection*: every trial trains on `x_train` of `data/split/train_val.npz` (the
output of the `split` stage) and is scored by its best validation accuracy over `tune.epochs`
epochs. The test set is never opened, so the final test accuracy of the pipeline stays an unbiased
estimate. The winner goes back into the DVC loop as a Hydra experiment config,
`conf/experiment/tuned_<model>.yaml`, that holds only the keys differing from the conf/ defaults:

    uv run dvc exp run -S +experiment=tuned_<model>

The full pipeline then trains for `train.epochs` (the `tune` section never leaks into the file): the
study ranks configurations on a cheaper budget, the pipeline trains the winner properly.

Search space (`conf/search/<model>.yaml`)
-----------------------------------------
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

Storage, parallel workers, budget
---------------------------------
`tune.storage` is null (a journal file at `<store root>/optuna/journal.log`), a path ending in
`.log` (a journal file; relative paths are under the store root) or any Optuna RDB URL
(`sqlite:///...`, `postgresql://...`). Rerunning with the same `tune.study_name` (default
`tune-<model>`) resumes the study; a rerun whose base configuration or split file differs from the
study's is refused (its trials would not be comparable).

Several workers may run the same command at once: processes on one machine with a journal file,
several machines with PostgreSQL. `tune.n_trials` is the *total* of the study, across workers and
reruns (like `optuna.study.MaxTrialsCallback(n_trials, states=None)`): trials in every state count,
except a stale trial that was re-queued (its retry counts instead). Counting and creating a trial
happen under a file lock, so on one machine the total is exact; workers on different machines
(PostgreSQL) may overshoot it by at most one trial each. `tune.timeout` bounds each worker's wall
time (a running trial is finished, no new one is started). Each worker seeds the sampler with
`(tune.seed, trial number)`, so sequential runs with the same seed repeat the same trials exactly
and parallel workers never draw the same random start point.

Stale trials (a worker killed mid-trial)
----------------------------------------
Optuna's heartbeat (`tune.heartbeat_interval`, grace period twice that,
`RetryHeartbeatStaleTrialCallback`) exists only for RDB storages; `JournalStorage` does not
implement it (Optuna 5: it is not a `BaseHeartbeat`). So every trial also records its owner
(host, pid, process start time) in its user attrs and, on journal storage, a heartbeat timestamp
every `tune.heartbeat_interval` seconds. Before creating each trial, a worker fails RUNNING trials
whose owner process on this host is gone (immediately), or, for other hosts, whose heartbeat is
older than the grace period; the failed trial's MLflow run is marked FAILED and the trial is
re-queued with the same parameters (at most twice).

MLflow
------
One *study run* (`deep_repro.kind=study`, shared by all workers and reruns of the study) with the
plots (optimization history, parameter importances, intermediate values: PNG, and interactive
HTML that loads plotly.js from its CDN), `trials.csv`, the search space and the experiment file;
one child run per trial (`deep_repro.kind=trial`, `mlflow.parentRunId`) with the full config as
params, per-epoch metrics (step = epoch), the Optuna state in `deep_repro.trial_state`
(COMPLETE / PRUNED / FAIL) and, like the pipeline's stage runs, the md5 of the split file it
trained on (`deep_repro.in.data/split/train_val.npz`) and the run that produced that file
(`deep_repro.upstream.data/split/train_val.npz`). A trial whose training diverges is FAIL (a
bad region of the space, not a crash) and the study goes on. Credentials in URLs never reach
params, tags or the experiment file.
"""

from __future__ import annotations

import contextlib
import copy
import decimal
import hashlib
import inspect
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from deep_repro import config, tracking
from deep_repro.config import Config
from deep_repro.errors import ConfigError, DataError, DeepReproError, TrainingError, scrub
from deep_repro.files import atomic_path
from deep_repro.paths import repo_root, store_root
from deep_repro.pipeline import SPLIT_TRAIN_VAL

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

SPLIT_FILE = SPLIT_TRAIN_VAL   # the only data a trial may read
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
    "train.epochs": "trials train for tune.epochs (the pipeline for train.epochs)",
}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "grid", "when"},
    "int": {"type", "low", "high", "log", "step", "grid", "when"},
    "categorical": {"type", "choices", "when"},
}
PRUNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "median": {"n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"min_resource": 1, "reduction_factor": 3},
}
MAX_RETRY = 2  # re-queue a trial whose worker died at most this often (a crash loop is a bug)

# Optuna user attrs (visible in optuna-dashboard) and MLflow tags.
ATTR_OWNER = "deep_repro.owner"
ATTR_HEARTBEAT = "deep_repro.heartbeat"
ATTR_RUN = "deep_repro.mlflow_run_id"
ATTR_OVERRIDES = "deep_repro.overrides"
ATTR_RETRY_OF = "deep_repro.retry_of"
STUDY_ATTR_RUN = "deep_repro.mlflow_study_run_id"
STUDY_ATTR_BASE = "deep_repro.base"
STUDY_ATTR_OVERRIDES = "deep_repro.base_overrides"
TAG_STUDY = f"{tracking.TAG_PREFIX}.study"
TAG_TRIAL_NUMBER = f"{tracking.TAG_PREFIX}.trial_number"
TAG_TRIAL_STATE = f"{tracking.TAG_PREFIX}.trial_state"
TAG_STORAGE = f"{tracking.TAG_PREFIX}.optuna_storage"


# --------------------------------------------------------------------------- small helpers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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


def _get(mapping: Mapping[str, Any], key: str) -> Any:
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _set(mapping: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = mapping
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _compose(overrides: Sequence[str], conf_dir: Path) -> dict[str, Any]:
    """`config.compose`, with Hydra's multi-line exceptions turned into one ConfigError line."""
    try:
        return config.compose(list(overrides), conf_dir)
    except DeepReproError:
        raise
    except Exception as exc:
        raise ConfigError(f"config error: cannot compose conf/ with overrides "
                          f"{' '.join(overrides) or '(none)'}: {_first_line(exc)}") from None


def _compose_with_choices(overrides: Sequence[str], conf_dir: Path
                          ) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose like `config.compose`, also returning the chosen option of each config group."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides),
                                     return_hydra_config=True)
    except Exception as exc:
        raise ConfigError(f"config error: cannot compose conf/ with overrides "
                          f"{' '.join(overrides) or '(none)'}: {_first_line(exc)}") from None
    choices = OmegaConf.to_container(composed.hydra.runtime.choices)
    with open_dict(composed):
        del composed["hydra"]  # its run/sweep dirs cannot resolve outside a Hydra app
    raw = OmegaConf.to_container(composed, resolve=True)
    assert isinstance(raw, dict) and isinstance(choices, dict)
    groups = {str(k): str(v) for k, v in choices.items()
              if v is not None and "/" not in str(k) and k not in NON_GROUPS}
    return raw, groups


def _scrubbed(value: Any) -> Any:
    """`value` with credentials removed from every string in it."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


def _strip(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that defines a model (the study's own and tracking settings aside)."""
    return {k: v for k, v in raw.items() if k not in ("tune", "tracking")}


def config_groups(conf_dir: Path) -> dict[str, list[str]]:
    """`{"optimizer": ["adamw", "sgd"], ...}` from the conf/ directory layout."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(conf_dir.iterdir())
            if d.is_dir() and d.name not in NON_GROUPS and any(d.glob("*.yaml"))}


# --------------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    """One searched key of `conf/search/<model>.yaml`."""

    key: str
    type: str                               # float | int | categorical
    group: bool = False                     # a config group choice (optimizer=sgd)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    grid: tuple[Any, ...] | None = None
    choices: tuple[Any, ...] = ()           # real values (lists for architectures)
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def labels(self) -> tuple[Any, ...]:
        """The categorical choices as Optuna stores them."""
        return tuple(_encode(c) for c in self.choices)

    def distribution(self) -> BaseDistribution:
        if self.type == "categorical":
            return CategoricalDistribution(self.labels)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,  # type: ignore
                                   step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,  # type: ignore
                                 step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample (or, for a re-queued trial, read back) this parameter; returns the real value."""
        if self.type == "categorical":
            label = trial.suggest_categorical(self.key, self.labels)
            return self.choices[self.labels.index(label)]
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),  # type: ignore
                                     log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, float(self.low), float(self.high),  # type: ignore
                                   log=self.log, step=self.step)

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


def _number(where: str, key: str, name: str, value: Any, integer: bool) -> float | int:
    # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string: accept it as the number it means.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"search space {where}: {key}: {name} = {value!r} is not a number")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"search space {where}: {key}: {name} = {value!r} is not an "
                              "integer (type: int)")
        return int(value)
    return float(value)


def _parse_param(where: str, key: Any, spec: Any, groups: Mapping[str, list[str]],
                 declared: Sequence[str]) -> Param:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"search space {where}: parameter names must be config keys, "
                          f"got {key!r}")
    if not isinstance(spec, dict):
        raise ConfigError(f"search space {where}: {key}: expected a mapping like "
                          "{type: float, low: ..., high: ...}, got " + repr(spec))
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        raise ConfigError(f"search space {where}: {key}: unknown type {kind!r} (expected one of "
                          f"{', '.join(PARAM_KEYS)})")
    extra = sorted(set(map(str, spec)) - PARAM_KEYS[kind])
    if extra:
        raise ConfigError(f"search space {where}: {key}: unknown field(s) {', '.join(extra)} "
                          f"for type {kind} (allowed: {', '.join(sorted(PARAM_KEYS[kind]))})")
    section = key.split(".")[0]
    reason = NOT_SEARCHABLE.get(key) or NOT_SEARCHABLE.get(section)
    if reason:
        raise ConfigError(f"search space {where}: {key} cannot be searched: {reason}")
    if key == "model":
        raise ConfigError(f"search space {where}: model cannot be searched: the base override "
                          "model=<name> picks conf/search/<name>.yaml (run one study per model)")
    if key.endswith(".name") and section in groups:
        raise ConfigError(f"search space {where}: {key}: search the config group `{section}` "
                          f"instead (e.g. {section}: {{type: categorical, choices: [...]}})")
    is_group = key in groups
    when = _parse_when(where, key, spec.get("when"), declared)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {where}: {key}: choices must be a non-empty list")
        labels = [_encode(c) for c in choices]
        if len(set(map(repr, labels))) != len(labels):
            raise ConfigError(f"search space {where}: {key}: choices contain duplicates")
        if is_group:
            unknown = [c for c in choices if c not in groups[key]]
            if unknown:
                raise ConfigError(f"search space {where}: {key}: unknown option(s) {unknown} "
                                  f"(conf/{key}/ has {', '.join(groups[key])})")
        return Param(key, kind, group=is_group, choices=tuple(choices), when=when)
    if is_group:
        raise ConfigError(f"search space {where}: {key} is a config group: use type: "
                          "categorical with choices from conf/" + key + "/")
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"search space {where}: {key}: missing {name} (type {kind} needs "
                              "low and high)")
    low = _number(where, key, "low", spec["low"], integer)
    high = _number(where, key, "high", spec["high"], integer)
    if low >= high:
        raise ConfigError(f"search space {where}: {key}: empty or inverted range: low = {low} "
                          f">= high = {high}")
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"search space {where}: {key}: log must be true or false")
    if log_scale and low <= 0:
        raise ConfigError(f"search space {where}: {key}: log scale needs low > 0 (low = {low})")
    step = None
    if spec.get("step") is not None:
        step = _number(where, key, "step", spec["step"], integer)
        if step <= 0:
            raise ConfigError(f"search space {where}: {key}: step must be > 0 (step = {step})")
        if log_scale:
            raise ConfigError(f"search space {where}: {key}: step and log cannot be combined")
        if step > high - low:
            raise ConfigError(f"search space {where}: {key}: step = {step} is larger than the "
                              f"range [{low}, {high}]")
    grid = None
    if spec.get("grid") is not None:
        if not isinstance(spec["grid"], list) or not spec["grid"]:
            raise ConfigError(f"search space {where}: {key}: grid must be a non-empty list")
        grid = tuple(_number(where, key, "grid value", v, integer) for v in spec["grid"])
        outside = [v for v in grid if not low <= v <= high]
        if outside:
            raise ConfigError(f"search space {where}: {key}: grid values {outside} are outside "
                              f"[{low}, {high}]")
    return Param(key, kind, low=low, high=high, log=log_scale, step=step, grid=grid, when=when)


def _parse_when(where: str, key: str, when: Any, declared: Sequence[str]
                ) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"search space {where}: {key}: when must be a mapping like "
                          "{optimizer: sgd}")
    out = []
    for other, accepted in when.items():
        if other == key:
            raise ConfigError(f"search space {where}: {key}: when refers to itself")
        values = tuple(accepted) if isinstance(accepted, list) else (accepted,)
        if not values:
            raise ConfigError(f"search space {where}: {key}: when.{other} accepts no value")
        out.append((str(other), values))
    return tuple(out)


def _parse_pruners(where: str, raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {where}: pruners must be a mapping like "
                          "{median: {n_startup_trials: 5}}")
    classes = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
    out: dict[str, dict[str, Any]] = {}
    for name, args in raw.items():
        if name not in classes:
            raise ConfigError(f"search space {where}: pruners.{name}: unknown pruner (options: "
                              f"{', '.join(classes)})")
        if not isinstance(args, dict):
            raise ConfigError(f"search space {where}: pruners.{name} must be a mapping of "
                              "constructor arguments")
        allowed = set(inspect.signature(classes[name]).parameters) - {"self"}
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise ConfigError(f"search space {where}: pruners.{name}: unknown argument(s) "
                              f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        out[str(name)] = dict(args)
    return out


def load_search_space(path: Path, groups: Mapping[str, list[str]]) -> SearchSpace:
    """Parse and check the *format* of a search-space file (see the module docstring)."""
    space = SearchSpace(path, ())
    where = space.where
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"search space {where} not found (have: {', '.join(have) or 'none'}); "
                          "create it, e.g. by copying conf/search/cnn.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {where} is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"search space {where}: expected a non-empty `params:` mapping of "
                          "config keys to {type: ..., ...}")
    unknown = sorted(set(raw) - {"params", "pruners"})
    if unknown:
        raise ConfigError(f"search space {where}: unknown top-level key(s) {', '.join(unknown)} "
                          "(allowed: params, pruners)")
    params: list[Param] = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(where, key, spec, groups, [p.key for p in params]))
    return SearchSpace(path, tuple(params), _parse_pruners(where, raw.get("pruners")))


def _check_trainable(cfg: Config, n_train: int) -> None:
    # Same rule as training.check_trainable, without importing torch for a config check.
    if cfg.train.batch_size > n_train:
        raise TrainingError(f"train.batch_size = {cfg.train.batch_size} exceeds the {n_train} "
                            "training images")


def check_search_space(space: SearchSpace, base_overrides: Sequence[str], conf_dir: Path,
                       n_train: int, base: tuple[dict[str, Any], dict[str, str]] | None = None
                       ) -> tuple[SearchSpace, dict[str, Any]]:
    """Check a search space against the composed config and the schema, before any trial.

    `base` is the composition of `base_overrides` with its group choices, if already done.
    Returns the space without the keys fixed on the command line, and the base values of the
    keys that `when` conditions refer to.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    where = space.where
    base_raw, base_choices = base or _compose_with_choices(base_overrides, conf_dir)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(base_overrides))
    except Exception as exc:  # already composed fine, so this should not happen
        raise ConfigError(f"config error: cannot parse overrides: {_first_line(exc)}") from None
    fixed = {o.key_or_group for o in parsed if not o.is_delete()}
    params = []
    for p in space.params:
        if p.key in fixed:
            log.info("%s is fixed on the command line: not searched", p.key)
        else:
            params.append(p)
    if not params:
        raise ConfigError(f"search space {where}: every parameter is fixed on the command line; "
                          "nothing to search")
    space = SearchSpace(space.path, tuple(params), space.pruners)

    # Each option of each searched group changes which keys exist (e.g. optimizer.momentum only
    # in sgd): compose them all once, and judge keys and values in each of those contexts.
    contexts: dict[str, dict[str, Any]] = {"base": base_raw}
    for p in params:
        if p.group:
            for choice in p.choices:
                if choice != base_choices.get(p.key):
                    contexts[f"{p.key}={choice}"] = _compose(
                        [*base_overrides, p.override(choice)], conf_dir)
    flat = [config.flatten(c) for c in contexts.values()]
    searched = [p.key for p in params]
    when_base: dict[str, Any] = {}
    for p in params:
        if not p.group and any(isinstance(_get_or_none(c, p.key), dict) for c in contexts.values()):
            raise ConfigError(f"search space {where}: {p.key} is a section, not a value")
        if not p.group and not any(p.key in f for f in flat):
            ctx = ", ".join(f"{g}={c}" for g, c in base_choices.items())
            raise ConfigError(f"search space {where}: unknown key {p.key}: not in the composed "
                              f"config ({ctx})")
        for other, _ in p.when:
            if other in searched[: searched.index(p.key)]:
                continue
            if other in searched:
                raise ConfigError(f"search space {where}: {p.key}: when refers to {other}, which "
                                  "must be declared before it")
            if other in base_choices:
                when_base[other] = base_choices[other]
            elif other in flat[0]:
                when_base[other] = flat[0][other]
            else:
                raise ConfigError(f"search space {where}: {p.key}: when refers to unknown key "
                                  f"{other}")
    for name, raw in contexts.items():
        for p in params:
            for value in ([None] if p.group else p.candidates()):
                candidate = copy.deepcopy(raw)
                if not p.group:
                    _set(candidate, p.key, value)
                try:
                    _check_trainable(config.validate(candidate), n_train)
                except DeepReproError as exc:
                    what = name if p.group else f"{p.key} = {value!r}"
                    ctx = "" if name == "base" or p.group else f" (with {name})"
                    raise ConfigError(f"search space {where}: {what}{ctx} gives an invalid "
                                      f"config: {_first_line(exc)}") from None
    # Hydra must read each override back as exactly the value sampled (e.g. a string that
    # looks like a number must stay a string): parse every candidate override.
    for p in params:
        for value in [] if p.group else p.candidates():
            try:
                back = parser.parse_override(p.override(value)).value()
            except Exception as exc:
                raise ConfigError(f"search space {where}: {p.key} = {value!r} cannot be "
                                  f"written as a Hydra override: {_first_line(exc)}") from None
            if back != value or type(back) is not type(value):
                raise ConfigError(f"search space {where}: {p.key} = {value!r} reads back as "
                                  f"{back!r} in a Hydra override")
    return space, when_base


def _get_or_none(mapping: Mapping[str, Any], key: str) -> Any:
    try:
        return _get(mapping, key)
    except KeyError:
        return None


# --------------------------------------------------------------------------- samplers, pruners
def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """A fresh sampler; created per trial with a per-trial seed (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "tpe":
            # multivariate+group: lr and optimizer interact, and conditional keys form groups;
            # constant_liar: parallel workers do not all crowd the same promising region.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            # CMA-ES handles float/int only; categorical keys are sampled independently (random).
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "grid":
            grid = {p.key: p.grid_points() for p in space.params}
            return optuna.samplers.GridSampler(grid, seed=seed)  # type: ignore[arg-type]
    raise ConfigError(f"config error: tune.sampler = {name!r} unknown")  # pragma: no cover


def _check_sampler(name: str, space: SearchSpace) -> None:
    where = space.where
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError("config error: tune.sampler = 'cmaes' needs the `cmaes` package, "
                              "which is not installed (`uv add cmaes`), or use tpe/random/grid")
    if name == "grid":
        for p in space.params:
            if p.when:
                raise ConfigError(f"search space {where}: {p.key}: tune.sampler=grid cannot "
                                  "search conditional (when) parameters")
            if p.grid_points() is None:
                raise ConfigError(f"search space {where}: {p.key}: tune.sampler=grid needs "
                                  "`grid: [values]` or `step` for a float/int range")


def make_pruner(name: str, epochs: int, space: SearchSpace) -> optuna.pruners.BasePruner:
    args = {**PRUNER_DEFAULTS.get(name, {}), **space.pruners.get(name, {})}
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**args)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**{"max_resource": epochs, **args})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"search space {space.where}: pruners.{name}: {_first_line(exc)}"
                          ) from None
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------- storage
@dataclass
class _Storage:
    storage: optuna.storages.BaseStorage
    description: str          # redacted, for logs and tags
    lock_path: Path           # serialises budget checks and trial creation on this machine
    journal: bool             # no Optuna heartbeat: we keep our own


def _resolve_journal(spec: str | None) -> Path | None:
    if spec is None:
        return store_root() / "optuna" / "journal.log"
    if spec.endswith(".log") and "://" not in spec:
        path = Path(spec).expanduser()
        return path if path.is_absolute() else store_root() / path
    return None


def open_storage(spec: str | None, study_name: str, heartbeat_interval: int,
                 on_stale: Any) -> _Storage:
    """Open the study storage, failing with one line if it is unreachable or unusable."""
    journal = _resolve_journal(spec)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(journal))
            storage = optuna.storages.JournalStorage(backend)
        except Exception as exc:
            raise DeepReproError(f"tune.storage journal file {journal} is unusable "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None
        lock = journal.with_name(journal.name + ".tune.lock")
        return _Storage(storage, f"journal:{journal}", lock, journal=True)
    assert spec is not None
    url = spec
    shown = tracking.redact_uri(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        with contextlib.suppress(OSError):  # sqlite creates the file, not its folder
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}
    digest = hashlib.sha256(f"{url}\0{study_name}".encode()).hexdigest()[:16]
    lock_path = store_root() / "optuna" / "locks" / f"{digest}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # Creating a fresh sqlite schema from two processes at once races (as for MLflow).
    creation = FileLock(str(lock_path) + ".create") if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings(), creation or contextlib.nullcontext():
            warnings.simplefilter("ignore", ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=2 * heartbeat_interval,
                heartbeat_stale_trial_callback=on_stale, **kwargs)
    except Exception as exc:
        raise DeepReproError(f"tune.storage {shown} is unreachable or unusable "
                             f"({type(exc).__name__}: {tracking.redact_uri(_first_line(exc))}); "
                             "use a journal file (null or a path ending in .log) or a reachable "
                             "database URL") from None
    return _Storage(storage, shown, lock_path, journal=False)


class _Gate:
    """A file lock held from 'count the study's trials' until 'the new trial exists', so workers
    on one machine never overshoot `tune.n_trials`. The objective releases it first thing."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path), timeout=600)
        self._held = False

    def __enter__(self) -> _Gate:
        self._lock.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- stale trials
def _owner() -> dict[str, Any]:
    import psutil

    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def _owner_alive(owner: Mapping[str, Any]) -> bool:
    """Whether the process that owns a trial (on this host) is still running."""
    import psutil

    try:
        proc = psutil.Process(int(owner["pid"]))
        if abs(proc.create_time() - float(owner["started"])) > 1.0:
            return False  # the pid was reused by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True  # cannot tell: leave it to the heartbeat


def _is_stale(trial: FrozenTrial, grace_s: float, by_heartbeat: bool) -> bool:
    owner = trial.user_attrs.get(ATTR_OWNER)
    if isinstance(owner, dict) and owner.get("host") == socket.gethostname():
        return not _owner_alive(owner)
    if not by_heartbeat:
        return False  # RDB: Optuna's own heartbeat judges other hosts
    last = trial.user_attrs.get(ATTR_HEARTBEAT)
    if not isinstance(last, int | float):
        start = trial.datetime_start
        last = start.timestamp() if start is not None else time.time()
    return time.time() - float(last) > grace_s


@contextlib.contextmanager
def _heartbeat(trial: optuna.Trial, interval: float, enabled: bool) -> Iterator[None]:
    """Write a heartbeat timestamp into the trial every `interval` s (journal storage only)."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr(ATTR_HEARTBEAT, time.time())
            except (UpdateFinishedTrialError, KeyError):
                return
            except Exception as exc:  # a hiccup of the store must not kill the trial
                log.warning("heartbeat of trial %d failed: %s", trial.number, _first_line(exc))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- results
@dataclass
class StudyResult:
    study_name: str
    storage: str
    study_run_id: str
    n_trials: int
    states: dict[str, int]
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_overrides: list[str] = field(default_factory=list)
    experiment_file: Path | None = None


def _diff(best: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves of `best` that differ from (or are missing in) `ref`, nested."""
    out: dict[str, Any] = {}
    for key, value in best.items():
        other = ref.get(key, KeyError)
        if isinstance(value, dict) and isinstance(other, dict):
            sub = _diff(value, other)
            if sub:
                out[key] = sub
        elif other is KeyError or other != value:
            out[key] = value
    return out


class _ExperimentDumper(yaml.SafeDumper):
    """Block mappings, flow lists: `channels: [32, 64]` reads like the files in conf/."""


_ExperimentDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                         flow_style=True))


def write_experiment(overrides: Sequence[str], model: str, conf_dir: Path,
                     header: Sequence[str]) -> Path:
    """Write the config composed from `overrides` as `conf/experiment/tuned_<model>.yaml`.

    The file holds only what differs from the conf/ defaults (group choices as `override /g: x`,
    always pinning the model), so `+experiment=tuned_<model>` reproduces the config exactly; the
    `tune` and `tracking` sections are left out (the pipeline trains for `train.epochs`).
    """
    best, choices = _compose_with_choices(overrides, conf_dir)
    _, defaults = _compose_with_choices([], conf_dir)
    group_overrides = [f"{g}={c}" for g, c in sorted(choices.items(), key=lambda i: i[0] != "model")
                       if g == "model" or c != defaults.get(g)]
    reference = _compose(group_overrides, conf_dir)
    body = _diff(_strip(best), _strip(reference))
    lines = ["# @package _global_", *(f"# {h}" for h in header)]
    text = "\n".join(lines) + "\n"
    text += yaml.safe_dump({"defaults": [{f"override /{o.split('=')[0]}": o.split("=", 1)[1]}
                                         for o in group_overrides]}, sort_keys=False)
    name = f"tuned_{model}"
    target = conf_dir / "experiment" / f"{name}.yaml"
    if body:
        values = yaml.dump(body, Dumper=_ExperimentDumper, sort_keys=False)
        # The file goes into git: a password in a URL given on the command line (a private
        # data mirror) is replaced by *** and must be passed again when the file is applied.
        if scrub(values) != values:
            log.warning("%s: credentials in URLs were replaced by *** (the file is tracked by "
                        "git); pass them again with -S when applying it", target.name)
        text += scrub(values)
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    again = _scrubbed(_strip(_compose([f"+experiment={name}"], conf_dir)))
    if again != _scrubbed(_strip(best)):
        wanted = _scrubbed(_strip(best))
        differing = sorted(set(config.flatten(_diff(again, wanted)))
                           | set(config.flatten(_diff(wanted, again))))
        raise DeepReproError(f"{target} does not reproduce the best trial's config (differs in "
                             f"{', '.join(differing[:5])}): please report this")
    return target


# --------------------------------------------------------------------------- the study
class _Tuner:
    """One worker's part of one study (state shared by the objective and the loop)."""

    def __init__(self, overrides: Sequence[str]) -> None:
        self.overrides = list(overrides)
        self.root = repo_root()
        self.conf_dir = self.root / "conf"
        self.raw, base_choices = _compose_with_choices(self.overrides, self.conf_dir)
        self.cfg = config.validate(self.raw)
        tune = self.cfg.tune
        self.study_name = tune.study_name or f"tune-{self.cfg.model.name}"
        self.data_path = self.root / SPLIT_FILE
        if not self.data_path.is_file():
            raise DataError(f"{self.data_path} not found: tuning uses only the train/val split "
                            "of the DVC pipeline; run `uv run dvc repro split` first")
        from deep_repro.data import load_arrays

        arrays = load_arrays(self.data_path)
        missing = {"x_train", "y_train", "x_val", "y_val"} - set(arrays)
        if missing:
            raise DataError(f"{self.data_path} lacks {sorted(missing)}: rerun "
                            "`uv run dvc repro split`")
        self.data: dict[str, np.ndarray] = arrays
        self.data_md5 = tracking.md5_file(self.data_path)
        groups = config_groups(self.conf_dir)
        space = load_search_space(self.conf_dir / "search" / f"{self.cfg.model.name}.yaml", groups)
        self.space, self.when_base = check_search_space(
            space, self.overrides, self.conf_dir, len(arrays["y_train"]),
            base=(self.raw, base_choices))
        _check_sampler(tune.sampler, self.space)
        self.pruner = make_pruner(tune.pruner, tune.epochs, self.space)
        self.grace_s = 2.0 * tune.heartbeat_interval
        self.client: MlflowClient | None = None
        self.exp_id = ""
        self.study_run_id = ""
        self.owner = _owner()
        self.store = open_storage(tune.storage, self.study_name, tune.heartbeat_interval,
                                  self._on_stale)
        self.gate = _Gate(self.store.lock_path)
        self.env_tags: dict[str, str] = {}
        self.data_tags: dict[str, str] = {}

    @property
    def shown_overrides(self) -> str:
        """The command line for logs, tags and the (git-tracked) experiment file: no secrets."""
        return scrub(" ".join(self.overrides))

    # ------------------------------------------------------------------ comparability
    def comparable(self) -> dict[str, Any]:
        """What makes two trials comparable: the training setup (not the searched keys, not
        train.epochs, which trials do not use) and the exact split file."""
        flat = config.flatten({k: v for k, v in self.raw.items()
                               if k in ("seed", "model", "optimizer", "scheduler", "augment",
                                        "train")})
        searched = {p.key for p in self.space.params}
        out = {k: v for k, v in flat.items()
               if k != "train.epochs" and k not in searched
               and not any(k.startswith(g + ".") for g in searched)}
        out["tune.epochs"] = self.cfg.tune.epochs
        out[SPLIT_FILE] = self.data_md5
        return out

    def _check_study(self, study: optuna.Study) -> None:
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError(f"study {self.study_name!r} in {self.store.description} does not "
                              "maximise (not created by deep-repro tune): pick another "
                              "tune.study_name")
        base = self.comparable()
        recorded = study.user_attrs.get(STUDY_ATTR_BASE)
        if recorded is None:
            study.set_user_attr(STUDY_ATTR_BASE, base)
            study.set_user_attr(STUDY_ATTR_OVERRIDES, self.shown_overrides)
        else:
            changed = [f"{k}: {recorded[k]!r} -> {base[k]!r}" for k in sorted(base)
                       if k in recorded and recorded[k] != base[k]]
            if changed:
                raise ConfigError(f"study {self.study_name!r} in {self.store.description} was "
                                  f"run with another setup ({'; '.join(changed[:3])}): its trials "
                                  "would not be comparable; use a new tune.study_name")
        seen: dict[str, BaseDistribution] = {}
        for trial in study.get_trials(deepcopy=False):
            for name, dist in trial.distributions.items():
                seen.setdefault(name, dist)
        for p in self.space.params:
            if p.key in seen:
                try:
                    optuna.distributions.check_distribution_compatibility(seen[p.key],
                                                                          p.distribution())
                except ValueError as exc:
                    raise ConfigError(f"search space {self.space.where}: {p.key} changed "
                                      f"incompatibly with study {self.study_name!r} "
                                      f"({_first_line(exc)}); use a new tune.study_name") from None

    # ------------------------------------------------------------------ MLflow
    def _connect(self) -> None:
        uri = tracking.tracking_uri(self.cfg.tracking.uri)
        self.client, self.exp_id = tracking.connect(uri, self.cfg.tracking.experiment)
        self.env_tags = tracking.environment_tags(self.cfg)
        self.data_tags = {f"{tracking.IN_PREFIX}{SPLIT_FILE}": self.data_md5}
        producer = tracking.find_producer(self.client, self.exp_id, SPLIT_FILE, self.data_md5)
        if producer:
            self.data_tags[f"{tracking.UPSTREAM_PREFIX}{SPLIT_FILE}"] = producer
        else:
            log.warning("no tracked run produced %s (md5 %s): lineage stops here", SPLIT_FILE,
                        self.data_md5)

    def _study_run(self, study: optuna.Study) -> str:
        """The study's MLflow run, shared by every worker and rerun (created by the first)."""
        from mlflow.exceptions import MlflowException

        assert self.client is not None
        run_id = study.user_attrs.get(STUDY_ATTR_RUN)
        if run_id:
            with contextlib.suppress(MlflowException):
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.exp_id:
                    self.client.update_run(run_id, status="RUNNING")
                    return str(run_id)
        tune = self.cfg.tune
        run = self.client.create_run(self.exp_id, run_name=self.study_name, tags={
            **self.env_tags, **self.data_tags, tracking.TAG_KIND: "study",
            TAG_STUDY: self.study_name, TAG_STORAGE: self.store.description,
            f"{tracking.TAG_PREFIX}.search_space": self.space.where,
            f"{tracking.TAG_PREFIX}.search_space_md5": tracking.md5_file(self.space.path),
            "mlflow.note.content": (
                f"Optuna study `{self.study_name}` ({self.store.description}) over "
                f"`{self.space.where}` on the train/val split. Each child run is one trial. "
                f"Rerun `uv run deep-repro tune {self.shown_overrides}` to add trials; "
                f"apply the best with `uv run dvc exp run -S "
                f"+experiment=tuned_{self.cfg.model.name}`."),
        })
        params = {**{f"tune.{k}": v for k, v in config.to_dict(tune).items()},
                  "base_overrides": self.shown_overrides[:6000] or "(none)",
                  "searched": ",".join(p.key for p in self.space.params)}
        self._log_params(run.info.run_id, params)
        self.client.log_artifact(run.info.run_id, str(self.space.path), "search_space")
        study.set_user_attr(STUDY_ATTR_RUN, run.info.run_id)
        log.info("MLflow: study run %s", run.info.run_id)
        return str(run.info.run_id)

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        assert self.client is not None
        # scrub: tune.storage, tracking.uri or data.mirrors may carry credentials.
        items = [Param(k, scrub(json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000])
                 for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _end_trial_run(self, run_id: str, state: str, reason: str | None = None) -> None:
        from mlflow.exceptions import MlflowException

        assert self.client is not None
        try:
            self.client.set_tag(run_id, TAG_TRIAL_STATE, state)
            if reason:
                self.client.set_tag(run_id, f"{tracking.TAG_PREFIX}.fail_reason", reason[:5000])
            self.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")
        except MlflowException as exc:  # a run of another store, or deleted
            log.warning("cannot update MLflow run %s: %s", run_id, _first_line(exc))

    # ------------------------------------------------------------------ stale trials
    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A dead worker's trial was failed: close its MLflow run and re-queue its parameters."""
        log.warning("trial %d was left RUNNING by a worker that died (%s): failed, re-queued",
                    trial.number, trial.user_attrs.get(ATTR_OWNER, "owner unknown"))
        run_id = trial.user_attrs.get(ATTR_RUN)
        if run_id and self.client is not None:
            self._end_trial_run(run_id, "FAIL", "stale: its worker process died or lost its "
                                "heartbeat")
        retry = copy.deepcopy(trial)
        # The retry must not inherit the dead owner (it would look stale at once) nor the run.
        retry.user_attrs = {k: v for k, v in trial.user_attrs.items()
                            if k not in (ATTR_OWNER, ATTR_HEARTBEAT, ATTR_RUN, ATTR_OVERRIDES)}
        retry.user_attrs.setdefault(ATTR_RETRY_OF, trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, retry)

    def fail_stale_trials(self, study: optuna.Study) -> None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not _is_stale(trial, self.grace_s, by_heartbeat=self.store.journal):
                continue
            storage = study._storage  # the study's (possibly cached) view of the storage
            try:
                if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:
                continue  # another worker got there first
            self._on_stale(study, copy.deepcopy(storage.get_trial(trial._trial_id)))

    # ------------------------------------------------------------------ one trial
    def objective(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial exists now: other workers may count and create theirs
        trial.set_user_attr(ATTR_OWNER, self.owner)
        interval = self.cfg.tune.heartbeat_interval
        with _heartbeat(trial, interval, enabled=self.store.journal):
            context = dict(self.when_base)
            values: dict[str, Any] = {}
            for p in self.space.params:
                if p.active(context):
                    values[p.key] = context[p.key] = p.suggest(trial)
            trial_overrides = [self.space.param(k).override(v)  # type: ignore[union-attr]
                               for k, v in values.items()]
            raw = _compose([*self.overrides, *trial_overrides], self.conf_dir)
            for key, value in values.items():
                param = self.space.param(key)
                if param is not None and not param.group and _get_or_none(raw, key) != value:
                    raise ConfigError(f"{key} = {value!r} composed as "
                                      f"{_get_or_none(raw, key)!r}")
            cfg = config.validate(raw)
            trial.set_user_attr(ATTR_OVERRIDES, trial_overrides)
            run_id = self._start_trial_run(trial, cfg, values, trial_overrides)
            trial.set_user_attr(ATTR_RUN, run_id)
            state, reason = "FAIL", None
            try:
                value = self._train(trial, cfg, run_id)
                state = "COMPLETE"
                return value
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            except TrainingError as exc:
                # A diverging configuration is a result (this region is bad), not a crash: the
                # trial fails (Optuna turns a NaN value into FAIL) and the study goes on.
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                log.warning("trial %d failed: %s", trial.number, reason)
                return float("nan")
            except BaseException as exc:
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                raise
            finally:
                self._end_trial_run(run_id, state, reason)
                log.info("trial %d %s: %s", trial.number, state,
                         ", ".join(f"{k}={v}" for k, v in values.items()))

    def _start_trial_run(self, trial: optuna.Trial, cfg: Config, values: Mapping[str, Any],
                         trial_overrides: Sequence[str]) -> str:
        assert self.client is not None
        retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
        run = self.client.create_run(self.exp_id, run_name=f"{self.study_name}-{trial.number}",
                                     tags={
            **self.env_tags, **self.data_tags, tracking.TAG_KIND: "trial",
            tracking.TAG_PARENT: self.study_run_id, TAG_STUDY: self.study_name,
            TAG_STORAGE: self.store.description, TAG_TRIAL_NUMBER: str(trial.number),
            TAG_TRIAL_STATE: "RUNNING",
            f"{tracking.TAG_PREFIX}.searched": ",".join(values),
            f"{tracking.TAG_PREFIX}.trial_overrides": " ".join(trial_overrides)[:5000],
            f"{tracking.TAG_PREFIX}.hostname": str(self.owner["host"]),
            f"{tracking.TAG_PREFIX}.pid": str(self.owner["pid"]),
            **({f"{tracking.TAG_PREFIX}.retry_of": str(retry_of)} if retry_of is not None
               else {}),
        })
        self._log_params(run.info.run_id, config.flatten(config.to_dict(cfg)))
        return str(run.info.run_id)

    def _train(self, trial: optuna.Trial, cfg: Config, run_id: str) -> float:
        from mlflow.entities import Metric

        from deep_repro import training

        assert self.client is not None
        client = self.client

        def on_epoch(metrics: training.EpochMetrics) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, metrics.step)
                                              for k, v in metrics.as_dict().items()])
            # The pruner compares this trial's learning curve with the others' at the same
            # epoch: stop a hopeless configuration early and spend the budget elsewhere.
            trial.report(metrics.val_accuracy, metrics.step)
            # logreg has one "epoch" (the whole fit): nothing left to save by pruning it.
            if cfg.is_torch_model and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {metrics.step} (val_accuracy "
                                         f"{metrics.val_accuracy:.4f})")

        x = self.data
        if cfg.is_torch_model:
            result = training.fit(cfg, x["x_train"], x["y_train"], x["x_val"], x["y_val"],
                                  on_epoch=on_epoch, epochs=cfg.tune.epochs, progress=False)
        else:
            result = training.fit_logreg(cfg, x["x_train"], x["y_train"], x["x_val"],
                                         x["y_val"], on_epoch=on_epoch)
        client.log_batch(run_id, metrics=[
            Metric("best_val_accuracy", result.best_val_accuracy, int(time.time() * 1000), 0),
            Metric("best_epoch", float(result.best_epoch), int(time.time() * 1000), 0)])
        # Objective: the best validation accuracy, i.e. the weights the pipeline would keep.
        return float(result.best_val_accuracy)

    # ------------------------------------------------------------------ the loop
    def counted(self, trials: Sequence[FrozenTrial]) -> int:
        """Trials that use up the budget: all, except stale ones whose retry exists."""
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        return len(trials) - len(retried)

    def run(self) -> StudyResult:
        tune = self.cfg.tune
        self._connect()
        with self.gate, warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study = optuna.create_study(
                storage=self.store.storage, study_name=self.study_name, direction="maximize",
                sampler=make_sampler(tune.sampler, tune.seed, self.space), pruner=self.pruner,
                load_if_exists=True)
            self._check_study(study)
            self.study_run_id = self._study_run(study)
        n_before = len(study.get_trials(deepcopy=False))
        log.info("study %r in %s: %d trial(s) so far, budget tune.n_trials = %d (all workers), "
                 "sampler %s, pruner %s, %d epoch(s) per trial", self.study_name,
                 self.store.description, n_before, tune.n_trials, tune.sampler, tune.pruner,
                 tune.epochs)
        status = "FAILED"
        try:
            self._loop(study)
            result = self._finish(study)
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.client is not None and status != "FINISHED":
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.study_run_id, status)

    def _loop(self, study: optuna.Study) -> None:
        tune = self.cfg.tune
        deadline = time.monotonic() + tune.timeout if tune.timeout else None
        ran = 0
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                log.info("tune.timeout = %ss reached: no new trial started", tune.timeout)
                break
            with self.gate:
                self.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                waiting = [t.number for t in trials if t.state == TrialState.WAITING]
                if not waiting and self.counted(trials) >= tune.n_trials:
                    break
                sampler = self._sampler(waiting[0] if waiting else len(trials))
                if (isinstance(sampler, optuna.samplers.GridSampler) and not waiting
                        and sampler.is_exhausted(study)):
                    log.info("grid exhausted after %d trials", len(trials))
                    break
                study.sampler = sampler
                # One trial per call: the gate is re-taken to check the budget before the next.
                study.optimize(self.objective, n_trials=1, gc_after_trial=False,
                               show_progress_bar=False)
                ran += 1
        log.info("this worker ran %d trial(s)", ran)

    def _sampler(self, number: int) -> optuna.samplers.BaseSampler:
        """The sampler for trial `number`, seeded by (tune.seed, number): reproducible when run
        sequentially, and parallel workers never replay each other's random draws."""
        import numpy as np

        tune = self.cfg.tune
        if tune.sampler == "grid":
            # The grid sampler shuffles its grid by the seed and numbers the points in that
            # order: every worker and trial must use the same seed or the ids point elsewhere.
            return make_sampler("grid", tune.seed, self.space)
        seed = int(np.random.SeedSequence([tune.seed, number]).generate_state(1)[0])
        return make_sampler(tune.sampler, seed, self.space)

    # ------------------------------------------------------------------ results
    def _finish(self, study: optuna.Study) -> StudyResult:
        from mlflow.entities import Metric, RunTag

        assert self.client is not None
        trials = study.get_trials(deepcopy=False)
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        states = {k: v for k, v in states.items() if v}
        result = StudyResult(self.study_name, self.store.description, self.study_run_id,
                             len(trials), states)
        now = int(time.time() * 1000)
        metrics = [Metric(f"n_{k.lower()}", float(v), now, 0) for k, v in states.items()]
        tags: list[RunTag] = []
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            result.best_trial, result.best_value = best.number, best.value
            result.best_params = {k: (self.space.param(k).decode(v) if self.space.param(k)
                                      else v) for k, v in best.params.items()}
            result.best_overrides = list(best.user_attrs.get(ATTR_OVERRIDES, []))
            header = [
                f"Best trial of Optuna study '{self.study_name}' (trial {best.number}): "
                f"val_accuracy {best.value:.4f} after",
                f"tune.epochs = {self.cfg.tune.epochs} epochs; MLflow study run "
                f"{self.study_run_id}. Written by:",
                f"  uv run deep-repro tune {self.shown_overrides}".rstrip(),
                "Train it through the full pipeline (for train.epochs epochs):",
                f"  uv run dvc exp run -S +experiment=tuned_{self.cfg.model.name}",
            ]
            # Under the gate: another worker of this study may be writing (and verifying) the
            # same file right now, possibly with a newer best trial.
            with self.gate:
                result.experiment_file = write_experiment(
                    [*self.overrides, *result.best_overrides], self.cfg.model.name,
                    self.conf_dir, header)
            metrics.append(Metric("best_val_accuracy", float(best.value), now, 0))  # type: ignore
            tags += [RunTag(f"{tracking.TAG_PREFIX}.best_trial", str(best.number)),
                     RunTag(f"{tracking.TAG_PREFIX}.best_trial_run_id",
                            str(best.user_attrs.get(ATTR_RUN, ""))),
                     RunTag(f"{tracking.TAG_PREFIX}.experiment_file",
                            result.experiment_file.relative_to(self.root).as_posix())]
            self.client.log_artifact(self.study_run_id, str(result.experiment_file),
                                     "experiment")
        self.client.log_batch(self.study_run_id, metrics=metrics, tags=tags)
        self._log_tables_and_plots(study)
        self.client.set_terminated(self.study_run_id, "FINISHED")
        summary = ", ".join(f"{v} {k.lower()}" for k, v in states.items())
        if result.best_trial is None:
            raise DeepReproError(f"study {self.study_name!r}: no trial completed ({summary}); "
                                 "check the failed trials' runs in MLflow")
        log.info("study %r: %d trials (%s); best trial %d: val_accuracy %.4f with %s",
                 self.study_name, len(trials), summary, result.best_trial, result.best_value,
                 ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
        log.info("wrote %s: train it with `uv run dvc exp run -S +experiment=tuned_%s`",
                 result.experiment_file, self.cfg.model.name)
        return result

    def _log_tables_and_plots(self, study: optuna.Study) -> None:
        assert self.client is not None
        try:
            frame = study.trials_dataframe()
            self.client.log_text(self.study_run_id, frame.to_csv(index=False), "trials.csv")
        except Exception as exc:
            log.warning("trials.csv not logged: %s", _first_line(exc))
        import matplotlib

        matplotlib.use("Agg")  # headless: figures are files for the MLflow UI, never windows
        import matplotlib.pyplot as plt
        import optuna.visualization as vis
        import optuna.visualization.matplotlib as vis_mpl

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        names = {n for t in complete for n in t.params}
        plots = [("optimization_history", bool(complete)),
                 # fANOVA needs several finished trials varying more than one parameter.
                 ("param_importances", len(complete) >= 2 and len(names) > 1),
                 ("intermediate_values", any(t.intermediate_values for t in trials))]
        for name, possible in plots:
            if not possible:
                log.info("plot %s skipped: not enough finished trials yet", name)
                continue
            try:
                with warnings.catch_warnings():
                    # Experimental APIs, and importance caveats on few trials: not for the log.
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    warnings.simplefilter("ignore", UserWarning)
                    axes = getattr(vis_mpl, f"plot_{name}")(study)
                    figure = getattr(vis, f"plot_{name}")(study)
                fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                fig.set_size_inches(9, 5.5)
                fig.tight_layout()
                self.client.log_figure(self.study_run_id, fig, f"plots/{name}.png")
                plt.close(fig)
                self.client.log_figure(self.study_run_id, figure, f"plots/{name}.html")
            except Exception as exc:  # a plot is a convenience: never fail the study for it
                log.warning("plot %s skipped: %s: %s", name, type(exc).__name__,
                            _first_line(exc))


def run_study(overrides: list[str]) -> StudyResult:
    """`deep-repro tune [OVERRIDES...]`: run (or join, or resume) the study; see module doc.

    Everything that can be wrong with the input (config, search space, split file, storage)
    raises a one-line `DeepReproError` before any trial starts.
    """
    # Route Optuna's messages through the project's logging (one format, one stream).
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    os.environ.pop("MLFLOW_RUN_ID", None)  # trials are tied to runs by explicit ids only
    return _Tuner(overrides).run()
