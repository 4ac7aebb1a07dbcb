"""The one typed schema of the pipeline's configuration, and its validation.

`conf/` (Hydra groups) is composed into `params.yaml`; every stage loads that file through
`load_config()` before doing any work, so a typo or an out-of-range value fails in the first
second with one line naming the key (`config error: model.lr = -1: must be > 0`), never after an
hour of training.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from deep_repro.errors import ConfigError
from deep_repro.paths import repo_root

if TYPE_CHECKING:
    from deep_repro.models import ModelSpec


def rng(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
        le: float | None = None) -> dict[str, float | None]:
    """Range metadata for a numeric field, or for every item of a list field (see `validate`)."""
    return {"gt": gt, "ge": ge, "lt": lt, "le": le}


# The schema holds types and ranges only, never values: every value comes from conf/ (the one
# source of defaults), so a field has no default and a key missing from the composition is an
# error. Groups whose options carry different keys (optimizer, scheduler, augment, model) are
# tagged unions: one dataclass per option, picked by `name`.

# --------------------------------------------------------------------------- data / split
@dataclass(frozen=True)
class DataConfig:
    mirrors: list[str]
    sha256: dict[str, str]
    subset: int | None = field(metadata=rng(ge=20))


@dataclass(frozen=True)
class SplitConfig:
    val_size: float = field(metadata=rng(gt=0.0, lt=1.0))


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ModelConfig:
    """Base of every architecture's schema (group `model`). The schemas themselves live next to
    their builders in `deep_repro.models` (the model registry), each with a `name: Literal[...]`.
    """

    name: str

    def check(self) -> None:
        """Cross-field rules of this architecture; raise ConfigError naming `model.<key>`."""


@dataclass(frozen=True)
class TorchModelConfig(ModelConfig):
    """Base of the networks trained by `training.fit` (gradient descent needs a learning rate)."""

    lr: float = field(metadata=rng(gt=0.0))
    dropout: float = field(metadata=rng(ge=0.0, lt=1.0))


def check_sizes(key: str, values: list[int], *, at_most: int | None = None,
                too_many: str = "") -> None:
    """A model's list of layer sizes: non-empty, every item >= 1, at most `at_most` items."""
    if not values or any(v < 1 for v in values):
        raise _fail(f"model.{key}", values, "a non-empty list of integers >= 1")
    if at_most is not None and len(values) > at_most:
        raise _fail(f"model.{key}", values, too_many or f"at most {at_most} items")


# --------------------------------------------------------------------------- training protocol
@dataclass(frozen=True)
class AdamWConfig:
    name: Literal["adamw"]
    weight_decay: float = field(metadata=rng(ge=0.0))
    betas: list[float]


@dataclass(frozen=True)
class SGDConfig:
    name: Literal["sgd"]
    weight_decay: float = field(metadata=rng(ge=0.0))
    momentum: float = field(metadata=rng(ge=0.0, lt=1.0))
    nesterov: bool


OptimizerConfig = AdamWConfig | SGDConfig


@dataclass(frozen=True)
class OneCycleConfig:
    name: Literal["onecycle"]
    pct_start: float = field(metadata=rng(gt=0.0, lt=1.0))


@dataclass(frozen=True)
class CosineConfig:
    name: Literal["cosine"]
    warmup_epochs: int = field(metadata=rng(ge=0))


@dataclass(frozen=True)
class NoSchedulerConfig:
    name: Literal["none"]


SchedulerConfig = OneCycleConfig | CosineConfig | NoSchedulerConfig


@dataclass(frozen=True)
class LightAugmentConfig:
    name: Literal["light"]
    crop_padding: int = field(metadata=rng(ge=0, le=8))
    hflip: bool
    random_erasing: float = field(metadata=rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class NoAugmentConfig:
    name: Literal["none"]


AugmentConfig = LightAugmentConfig | NoAugmentConfig


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(metadata=rng(ge=1))
    batch_size: int = field(metadata=rng(ge=1))
    patience: int = field(metadata=rng(ge=0))
    label_smoothing: float = field(metadata=rng(ge=0.0, lt=1.0))
    device: str
    precision: Literal["auto", "fp32", "bf16"]
    deterministic: bool
    num_threads: int = field(metadata=rng(ge=1))
    channels_last: bool


# --------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class PostprocessConfig:
    quantize: Literal["none", "int8"]
    atol: float = field(metadata=rng(gt=0.0))
    int8_max_acc_drop: float = field(metadata=rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class EvaluateConfig:
    baseline: float = field(metadata=rng(ge=0.0, le=1.0))
    fail_below: float | None = field(metadata=rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None
    experiment: str
    model_name: str


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = field(metadata=rng(ge=1))
    epochs: int = field(metadata=rng(ge=1))
    sampler: Literal["tpe", "cmaes", "random", "grid"]
    pruner: Literal["median", "hyperband", "none"]
    seed: int
    storage: str | None
    study_name: str | None
    timeout: float | None = field(metadata=rng(gt=0.0))
    heartbeat_interval: int = field(metadata=rng(ge=1))


@dataclass(frozen=True)
class Config:
    seed: int
    data: DataConfig
    split: SplitConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    augment: AugmentConfig
    train: TrainConfig
    postprocess: PostprocessConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    tune: TuneConfig

    @property
    def model_spec(self) -> ModelSpec:
        """The registry entry of `model.name` (builder, trainer kind, layout flags)."""
        from deep_repro.models import get_spec

        return get_spec(self.model.name)

    @property
    def is_torch_model(self) -> bool:
        return self.model_spec.trainer == "torch"


# --------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
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
        tp, getattr(tp, "__name__", str(tp)))


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {value!r}: expected {expected}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _fail(key, value, _type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(dataclasses.is_dataclass(a) for a in args):
            return _build_tagged(key, value, {option_name(a): a for a in args},
                                 siblings_keys_ignored=True)
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
    if tp is ModelConfig:
        from deep_repro.models import MODELS  # the registry; imports no torch

        return _build_tagged(key, value, {name: spec.schema for name, spec in MODELS.items()})
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
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
        for op, bound in meta.items():
            if bound is None:
                continue
            ok = {"gt": v > bound, "ge": v >= bound, "lt": v < bound, "le": v <= bound}[op]
            if not ok:
                sym = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op]
                raise _fail(key, value, f"a value {sym} {bound}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise _fail(prefix, raw, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"config error: unknown key {prefix}.{key} (allowed: {allowed})"
                              if prefix else f"config error: unknown key {key} "
                              f"(allowed: {allowed})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"config error: missing key {key}")
        value = _coerce(key, raw[name], hints[name])
        _check_range(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def option_name(schema: type) -> str:
    """The option name of one member of a tagged union (its `name: Literal["..."]`)."""
    (name,) = typing.get_args(typing.get_type_hints(schema)["name"])
    return name


def _build_tagged(key: str, raw: Any, options: dict[str, type], *,
                  siblings_keys_ignored: bool = False) -> Any:
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


def _semantic_checks(cfg: Config) -> None:
    """Cross-field rules the types alone cannot express."""
    missing = set(DATA_FILES) - set(cfg.data.sha256)
    if missing:
        raise ConfigError(f"config error: data.sha256 lacks {sorted(missing)}; expected the sha256 "
                          f"of each decompressed file {list(DATA_FILES)}")
    for name, digest in cfg.data.sha256.items():
        if name not in DATA_FILES:
            raise ConfigError(f"config error: unknown key data.sha256.{name} "
                              f"(allowed: {', '.join(DATA_FILES)})")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _fail(f"data.sha256.{name}", digest, "64 lowercase hex digits")
    if not cfg.data.mirrors:
        raise _fail("data.mirrors", cfg.data.mirrors, "a non-empty list of base URLs")
    for i, url in enumerate(cfg.data.mirrors):
        if not url.startswith(("http://", "https://", "file://")):
            raise _fail(f"data.mirrors[{i}]", url, "a URL starting with http://, https:// or "
                        "file://")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or
            (device.startswith("cuda:") and device[5:].isdigit())):
        raise _fail("train.device", device, "one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    cfg.model.check()
    if isinstance(cfg.optimizer, AdamWConfig):
        betas = cfg.optimizer.betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise _fail("optimizer.betas", betas, "two numbers in [0, 1)")


DATA_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def validate(raw: dict[str, Any]) -> Config:
    """Turn a plain mapping (parsed params.yaml) into a typed `Config`, or raise ConfigError."""
    cfg = _build(Config, raw, "")
    _semantic_checks(cfg)
    return cfg


def load_config(path: Path | None = None) -> Config:
    """Load and validate `params.yaml` (the composed config) from the repository root."""
    path = path or repo_root() / "params.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config error: {path} not found; run from the repository root "
                          "(it is the composition of conf/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: "
                          f"{str(exc).splitlines()[0]}") from None
    return validate(raw or {})


def to_dict(cfg: Any) -> Any:
    """Plain-Python view of a Config (or any part of it)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"lr": 0.1}}` -> `{"model.lr": 0.1}` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def compose(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict[str, Any]:
    """Compose `conf/` with Hydra overrides exactly as `dvc exp run -S` does."""
    return compose_with_choices(overrides, conf_dir)[0]


def compose_with_choices(overrides: list[str] | None = None, conf_dir: Path | None = None
                         ) -> tuple[dict[str, Any], dict[str, str]]:
    """`compose`, also returning the option picked in each config group of conf/
    (`{"model": "cnn", "optimizer": "adamw", ...}`; unselected optional groups left out).

    Hydra's (multi-line) errors, e.g. `model=transformer` with no conf/model/transformer.yaml,
    become one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    conf_dir = conf_dir or repo_root() / "conf"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            composed = hydra_compose(config_name="config", overrides=overrides,
                                     return_hydra_config=True)
        choices = OmegaConf.to_container(composed.hydra.runtime.choices)
        with open_dict(composed):
            del composed["hydra"]  # its run/sweep dirs cannot resolve outside a Hydra app
        raw = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"config error: cannot compose conf/ with overrides "
                          f"{' '.join(overrides) or '(none)'}: {first}") from None
    assert isinstance(raw, dict) and isinstance(choices, dict)
    groups = {str(k): str(v) for k, v in choices.items()
              if v is not None and not str(k).startswith("hydra/")}
    return raw, groups  # type: ignore[return-value]


# --------------------------------------------------------------------------- per-stage views
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

    def __init__(self, stage: str, target: Any, declared: tuple[str, ...], prefix: str = ""
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
            return attr.fget(self)  # type: ignore[misc]
        value = getattr(self._target, name)
        if any(key == p or key.startswith(p + ".") for p in self._declared):
            return value
        if any(p.startswith(key + ".") for p in self._declared):
            return StageConfig(self._stage, value, self._declared, key + ".")
        from deep_repro.errors import UndeclaredParamError

        visible = [p for p in self._declared if p not in AMBIENT_SECTIONS]
        raise UndeclaredParamError(
            f"stage {self._stage!r} reads {key}, which its params in dvc.yaml do not declare "
            f"(declared: {', '.join(visible) or 'none'}); add it to the stage's params in "
            "dvc.yaml and deep_repro.pipeline.STAGES")

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
    """Validate the WHOLE of `params.yaml` (one bad value anywhere fails every stage in its first
    second), then return the view of it that `stage` may read."""
    return stage_view(load_config(path), stage)


def unrestricted(cfg: Config) -> Config:
    """The whole config behind a stage view (MLflow records all of it; no DVC output does)."""
    while isinstance(cfg, StageConfig):
        cfg = object.__getattribute__(cfg, "_target")
    return cfg
