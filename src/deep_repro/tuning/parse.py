"""Reading `conf/search/<model>.yaml` into a `SearchSpace`, with one-line errors naming the key."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from deep_repro.errors import ConfigError
from deep_repro.tuning.space import (
    NOT_SEARCHABLE,
    PARAM_KEYS,
    Param,
    SearchSpace,
    _encode,
    first_line,
)


def _number(where: str, key: str, name: str, value: Any, integer: bool) -> float | int:
    # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string: accept it as the number it means.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"search space {where}: {key}: {name} = {value!r} is not a number")
    if integer:
        if float(value) != int(value):
            raise ConfigError(
                f"search space {where}: {key}: {name} = {value!r} is not an integer (type: int)"
            )
        return int(value)
    return float(value)


def _parse_param(
    where: str, key: Any, spec: Any, groups: Mapping[str, list[str]], declared: Sequence[str]
) -> Param:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"search space {where}: parameter names must be config keys, got {key!r}")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"search space {where}: {key}: expected a mapping like "
            "{type: float, low: ..., high: ...}, got " + repr(spec)
        )
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        raise ConfigError(
            f"search space {where}: {key}: unknown type {kind!r} (expected one of "
            f"{', '.join(PARAM_KEYS)})"
        )
    extra = sorted(set(map(str, spec)) - PARAM_KEYS[kind])
    if extra:
        raise ConfigError(
            f"search space {where}: {key}: unknown field(s) {', '.join(extra)} "
            f"for type {kind} (allowed: {', '.join(sorted(PARAM_KEYS[kind]))})"
        )
    section = key.split(".")[0]
    reason = NOT_SEARCHABLE.get(key) or NOT_SEARCHABLE.get(section)
    if reason:
        raise ConfigError(f"search space {where}: {key} cannot be searched: {reason}")
    if key == "model":
        raise ConfigError(
            f"search space {where}: model cannot be searched: the base override "
            "model=<name> picks conf/search/<name>.yaml (run one study per model)"
        )
    if key.endswith(".name") and section in groups:
        raise ConfigError(
            f"search space {where}: {key}: search the config group `{section}` "
            f"instead (e.g. {section}: {{type: categorical, choices: [...]}})"
        )
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
                raise ConfigError(
                    f"search space {where}: {key}: unknown option(s) {unknown} "
                    f"(conf/{key}/ has {', '.join(groups[key])})"
                )
        return Param(key, kind, group=is_group, choices=tuple(choices), when=when)
    if is_group:
        raise ConfigError(
            f"search space {where}: {key} is a config group: use type: "
            "categorical with choices from conf/" + key + "/"
        )
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(
                f"search space {where}: {key}: missing {name} (type {kind} needs low and high)"
            )
    low = _number(where, key, "low", spec["low"], integer)
    high = _number(where, key, "high", spec["high"], integer)
    if low >= high:
        raise ConfigError(
            f"search space {where}: {key}: empty or inverted range: low = {low} >= high = {high}"
        )
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
            raise ConfigError(
                f"search space {where}: {key}: step = {step} is larger than the "
                f"range [{low}, {high}]"
            )
    grid = None
    if spec.get("grid") is not None:
        if not isinstance(spec["grid"], list) or not spec["grid"]:
            raise ConfigError(f"search space {where}: {key}: grid must be a non-empty list")
        grid = tuple(_number(where, key, "grid value", v, integer) for v in spec["grid"])
        outside = [v for v in grid if not low <= v <= high]
        if outside:
            raise ConfigError(
                f"search space {where}: {key}: grid values {outside} are outside [{low}, {high}]"
            )
    return Param(key, kind, low=low, high=high, log=log_scale, step=step, grid=grid, when=when)


def _parse_when(
    where: str, key: str, when: Any, declared: Sequence[str]
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(
            f"search space {where}: {key}: when must be a mapping like {{optimizer: sgd}}"
        )
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
        raise ConfigError(
            f"search space {where}: pruners must be a mapping like "
            "{median: {n_startup_trials: 5}}"
        )
    classes: dict[str, type[optuna.pruners.BasePruner]] = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    out: dict[str, dict[str, Any]] = {}
    for name, args in raw.items():
        if name not in classes:
            raise ConfigError(
                f"search space {where}: pruners.{name}: unknown pruner (options: "
                f"{', '.join(classes)})"
            )
        if not isinstance(args, dict):
            raise ConfigError(
                f"search space {where}: pruners.{name} must be a mapping of constructor arguments"
            )
        allowed = set(inspect.signature(classes[name]).parameters) - {"self"}
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise ConfigError(
                f"search space {where}: pruners.{name}: unknown argument(s) "
                f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
            )
        out[str(name)] = dict(args)
    return out


def load_search_space(path: Path, groups: Mapping[str, list[str]]) -> SearchSpace:
    """Parse and check the *format* of a search-space file (see the module docstring)."""
    space = SearchSpace(path, ())
    where = space.where
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(
            f"search space {where} not found (have: {', '.join(have) or 'none'}); "
            "create it, e.g. by copying conf/search/cnn.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {where} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(
            f"search space {where}: expected a non-empty `params:` mapping of "
            "config keys to {type: ..., ...}"
        )
    unknown = sorted(set(raw) - {"params", "pruners"})
    if unknown:
        raise ConfigError(
            f"search space {where}: unknown top-level key(s) {', '.join(unknown)} "
            "(allowed: params, pruners)"
        )
    params: list[Param] = []
    for key, spec in raw["params"].items():
        params.append(_parse_param(where, key, spec, groups, [p.key for p in params]))
    return SearchSpace(path, tuple(params), _parse_pruners(where, raw.get("pruners")))
