"""Checking plain YAML values against the typed dataclass schema of `deep_repro.config`.

Generic on purpose: the schema (config/schema.py, models/architectures.py) says *what* is
allowed (types, Literal options, ranges in field metadata, tagged unions picked by `name`);
this module says *how* a value is checked, so every error has the same one-line shape
naming the key:
`config error: model.lr = -1: expected a value > 0`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection
from typing import Annotated, Any, Literal

from deep_repro.errors import ConfigError


def rng(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> dict[str, float | None]:
    """Range metadata for a numeric field, or for every item of a list field (see `validate`)."""
    return {"gt": gt, "ge": ge, "lt": lt, "le": le}


# --------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {value!r}: expected {expected}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        # `Annotated[str, rule]`: the base type first, then every rule's `check(key, value)`
        # (e.g. urls.UrlRule: every URL-valued key is checked by the same code).
        base, *rules = typing.get_args(tp)
        value = _coerce(key, value, base)
        for rule in rules:
            rule.check(key, value)
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _fail(key, value, _type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(dataclasses.is_dataclass(a) for a in args):
            return _build_tagged(
                key, value, {option_name(a): a for a in args}, siblings_keys_ignored=True
            )
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, value, _type_name(tp))
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `float | None`: the float's own message (e.g. "finite")
            return _coerce(key, value, options[0])
        for arg in options:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise _fail(key, value, _type_name(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _fail(key, value, _type_name(tp))
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, value, _type_name(tp))
        return {str(k): _coerce(f"{key}.{k}", v, typing.get_args(tp)[1]) for k, v in value.items()}
    if "tagged_options" in vars(tp):  # an open union whose options live in a registry
        return _build_tagged(key, value, tp.tagged_options())
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(key, value, "a number")
        if not math.isfinite(value):  # YAML/Hydra read `inf` and `nan` as floats
            raise _fail(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # pragma: no cover


def _check_range(key: str, value: Any, meta: Any) -> None:
    if value is None or not meta:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, str):  # a named option of a numeric field (`num_threads: auto`)
            continue
        for op, bound in meta.items():
            if bound is None:
                continue
            ok = {"gt": v > bound, "ge": v >= bound, "lt": v < bound, "le": v <= bound}[op]
            if not ok:
                sym = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op]
                raise _fail(key, value, f"a value {sym} {bound}")


class Unchecked(dict[str, Any]):
    """A section this process did not validate, kept as its plain YAML values.

    A DVC stage validates only the sections it reads (the `validate` stage, first in every
    pipeline, checks them all): the data stages leave `model` unchecked, so they need no model
    code and adding an architecture reruns none of them. MLflow still records the values, and
    tracking reads the few it tags (`cfg.model.name`) by attribute.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Unchecked(value) if isinstance(value, dict) else value


def _build(cls: type, raw: Any, prefix: str, unchecked: Collection[str] = ()) -> Any:
    if not isinstance(raw, dict):
        raise _fail(prefix, raw, "a mapping")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"config error: unknown key {prefix}.{key} (allowed: {allowed})"
                if prefix
                else f"config error: unknown key {key} (allowed: {allowed})"
            )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"config error: missing key {key}")
        if name in unchecked:
            kwargs[name] = Unchecked(raw[name]) if isinstance(raw[name], dict) else raw[name]
            continue
        value = _coerce(key, raw[name], hints[name])
        _check_range(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def option_name(schema: type) -> str:
    """The option name of one member of a tagged union (its `name: Literal["..."]`)."""
    (name,) = typing.get_args(typing.get_type_hints(schema)["name"])
    return name


def _build_tagged(
    key: str, raw: Any, options: dict[str, type], *, siblings_keys_ignored: bool = False
) -> Any:
    """A group with one schema per option (`optimizer`, `model`, ...), picked by `name`.

    With `siblings_keys_ignored`, a key that only other options of the group use (e.g.
    `optimizer.momentum` under adamw: the search spaces set it that way) is accepted and
    dropped, as it is meaningless here; a key no option knows stays an error."""
    if not isinstance(raw, dict):
        raise _fail(key, raw, "a mapping")
    name = raw.get("name")
    if name not in options:
        raise _fail(f"{key}.name", name, "one of " + ", ".join(repr(n) for n in options))
    schema = options[name]
    if siblings_keys_ignored:
        own = {f.name for f in dataclasses.fields(schema)}
        others = {f.name for s in options.values() for f in dataclasses.fields(s)} - own
        raw = {k: v for k, v in raw.items() if k not in others}
    return _build(schema, raw, key)
