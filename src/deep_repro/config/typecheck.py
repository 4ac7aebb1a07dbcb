"""How a config schema is checked: pydantic v2 models, and its errors in one line.

The schema (config/schema.py, models/architectures.py) says *what* is allowed with pydantic's own
vocabulary: strict types (no `"3"` for 3, no `true` for 1), `Literal` options, ranges as
`Field(gt=...)`, tagged unions picked by `name` (`Field(discriminator="name")`), no unknown keys.
Pydantic does the checking; this module turns the first of its errors into the project's one-line
shape naming the key, the value and what was expected:
`config error: model.lr = -1: expected a value > 0.0`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from deep_repro.errors import ConfigError


class Schema(BaseModel):
    """Base of every config section: values only from conf/, checked strictly."""

    # strict: YAML's `"3"` or `true` is not an integer; forbid: a typo is an unknown key, not a
    # silently ignored one; frozen: a stage cannot change what it was configured with;
    # allow_inf_nan=False: YAML and Hydra read `inf` and `nan` as floats.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class RuleError(ValueError):
    """A value refused by a rule of its own (e.g. urls.UrlRule), shown as `shown` (never a
    secret) with what was `expected`."""

    def __init__(self, shown: str, expected: str) -> None:
        super().__init__(expected)
        self.shown, self.expected = shown, expected


def option_name(schema: type) -> str:
    """The option name of one member of a tagged union (its `name: Literal["..."]`)."""
    (name,) = typing.get_args(typing.cast(type[BaseModel], schema).model_fields["name"].annotation)
    return str(name)


def _options(tp: Any) -> dict[str, type[BaseModel]] | None:
    """{name: schema} when `tp` is a union of schemas tagged by `name`, else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    if not all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
        return None
    return {option_name(a): a for a in args}


def other_options_keys_ignored(*options: type[BaseModel]) -> BeforeValidator:
    """For a tagged union: accept and drop a key only *other* options use (e.g.
    `optimizer.momentum` under adamw, which the search spaces set that way); a key no option
    knows stays an error."""

    def drop(raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        own = {o: set(o.model_fields) for o in options}
        picked = next((o for o in options if option_name(o) == raw.get("name")), None)
        if picked is None:
            return raw
        others = set().union(*own.values()) - own[picked]
        return {k: v for k, v in raw.items() if k not in others}

    return BeforeValidator(drop)


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


# --------------------------------------------------------------------------- error messages
def type_name(tp: Any) -> str:
    """An annotation in the words of the error messages (`an integer or one of 'auto'`)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {value!r}: expected {expected}")


def _locate(root: Any, loc: Iterable[str | int], prefix: str) -> tuple[str, Any, Any]:
    """Follow pydantic's error location through the schema: (dotted key, the annotation
    there, the schema class holding it). Union tags and branch labels are not keys."""
    key, tp, parent = prefix, root, None
    for part in loc:
        while typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        options = _options(tp)
        if options is not None and part in options:  # the tag of a tagged union
            tp = options[str(part)]
            continue
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent, info = tp, tp.model_fields.get(str(part))
            tp = info.annotation if info is not None else None
            key = f"{key}.{part}" if key else str(part)
        elif typing.get_origin(tp) is list and isinstance(part, int):
            key, tp = f"{key}[{part}]", typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            key, tp = f"{key}.{part}", typing.get_args(tp)[1]
        # else: a branch label of a plain union (`constrained-int`): the key stays
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return key, tp, parent


def _is(tp: Any, base: type) -> bool:
    """`tp` is `base`, maybe constrained (`Annotated[float, Field(gt=0)]`) or optional."""
    if typing.get_origin(tp) is Annotated:
        return _is(typing.get_args(tp)[0], base)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is(a, base) for a in typing.get_args(tp))
    return tp is base


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _message(error: Any, root: Any, prefix: str) -> tuple[str, ConfigError]:
    """(key, one-line error) for one of pydantic's error dicts."""
    key, tp, parent = _locate(root, error["loc"], prefix)
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    if kind == "missing":
        return key, ConfigError(f"config error: missing key {key}")
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(parent.model_fields)) if parent else ""
        return key, ConfigError(f"config error: unknown key {key} (allowed: {allowed})")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        names = _options(tp) or {}
        tag = value.get("name") if isinstance(value, dict) else None
        expected = "one of " + ", ".join(repr(n) for n in names)
        return key, fail(f"{key}.name", tag, expected)
    if kind in _BOUNDS:  # shown as checked: an integer given for a number is a float
        op, sym = _BOUNDS[kind]
        if _is(tp, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return key, fail(key, value, f"a value {sym} {ctx[op]}")
    if kind == "finite_number":
        return key, fail(key, value, "a finite number")
    if isinstance(ctx.get("error"), RuleError):
        rule = ctx["error"]
        return key, fail(key, rule.shown, rule.expected)
    if kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "int_from_float"):
        return key, fail(key, value, type_name(tp))
    return key, ConfigError(f"config error: {key} = {value!r}: {error['msg']}")


def first_error(exc: ValidationError, root: Any, prefix: str = "") -> tuple[str, ConfigError]:
    """The first failing key of `exc` (validated against `root`) and its one-line error.

    A value of a plain union (`int | Literal["auto"]`) fails once per branch: a range error
    (the value had the right type) says more than "expected an integer or one of 'auto'"."""
    errors = exc.errors()
    key = _message(errors[0], root, prefix)[0]
    same = [e for e in errors if _message(e, root, prefix)[0] == key]
    ranged = [e for e in same if e["type"] in _BOUNDS or e["type"] == "finite_number"]
    return _message((ranged or same)[0], root, prefix)
