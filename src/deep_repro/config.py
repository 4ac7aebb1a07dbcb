"""The one typed schema of the pipeline's configuration, and its validation.

`conf/` (Hydra groups) is composed into `params.yaml`; every stage loads that file through
`load_config()` before doing any work, so a typo or an out-of-range value fails in the first
second with one line naming the key (`config error: model.lr = -1: must be > 0`), never after an
hour of training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deep_repro.errors import ConfigError
from deep_repro.paths import repo_root


def _rng(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
         le: float | None = None) -> dict[str, float | None]:
    """Range metadata for a numeric field (checked by `validate`)."""
    return {"gt": gt, "ge": ge, "lt": lt, "le": le}


# --------------------------------------------------------------------------- data / split
@dataclass(frozen=True)
class DataConfig:
    mirrors: list[str]
    sha256: dict[str, str]
    subset: int | None = field(default=None, metadata=_rng(ge=20))


@dataclass(frozen=True)
class SplitConfig:
    val_size: float = field(default=0.1, metadata=_rng(gt=0.0, lt=1.0))


# --------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class LogRegConfig:
    name: Literal["logreg"]
    C: float = field(default=1.0, metadata=_rng(gt=0.0))
    max_iter: int = field(default=200, metadata=_rng(ge=1))


@dataclass(frozen=True)
class MLPConfig:
    name: Literal["mlp"]
    hidden_sizes: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = field(default=0.2, metadata=_rng(ge=0.0, lt=1.0))
    activation: Literal["relu", "gelu", "silu"] = "relu"
    lr: float = field(default=0.003, metadata=_rng(gt=0.0))


@dataclass(frozen=True)
class CNNConfig:
    name: Literal["cnn"]
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = field(default=128, metadata=_rng(ge=1))
    dropout: float = field(default=0.3, metadata=_rng(ge=0.0, lt=1.0))
    lr: float = field(default=0.005, metadata=_rng(gt=0.0))


@dataclass(frozen=True)
class ResNetConfig:
    name: Literal["resnet"]
    width: int = field(default=32, metadata=_rng(ge=4))
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    dropout: float = field(default=0.1, metadata=_rng(ge=0.0, lt=1.0))
    lr: float = field(default=0.004, metadata=_rng(gt=0.0))


ModelConfig = LogRegConfig | MLPConfig | CNNConfig | ResNetConfig
MODEL_SCHEMAS: dict[str, type] = {
    "logreg": LogRegConfig, "mlp": MLPConfig, "cnn": CNNConfig, "resnet": ResNetConfig,
}


# --------------------------------------------------------------------------- training protocol
@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "sgd"]
    weight_decay: float = field(default=5e-4, metadata=_rng(ge=0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = field(default=0.9, metadata=_rng(ge=0.0, lt=1.0))
    nesterov: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    name: Literal["onecycle", "cosine", "none"]
    pct_start: float = field(default=0.25, metadata=_rng(gt=0.0, lt=1.0))
    warmup_epochs: int = field(default=1, metadata=_rng(ge=0))


@dataclass(frozen=True)
class AugmentConfig:
    name: Literal["none", "light"]
    crop_padding: int = field(default=2, metadata=_rng(ge=0, le=8))
    hflip: bool = True
    random_erasing: float = field(default=0.0, metadata=_rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=12, metadata=_rng(ge=1))
    batch_size: int = field(default=256, metadata=_rng(ge=1))
    patience: int = field(default=4, metadata=_rng(ge=0))
    label_smoothing: float = field(default=0.0, metadata=_rng(ge=0.0, lt=1.0))
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deterministic: bool = True
    num_threads: int = field(default=2, metadata=_rng(ge=1))
    channels_last: bool = True


# --------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class PostprocessConfig:
    quantize: Literal["none", "int8"] = "none"
    atol: float = field(default=1e-4, metadata=_rng(gt=0.0))
    int8_max_acc_drop: float = field(default=0.005, metadata=_rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class EvaluateConfig:
    baseline: float = field(default=0.842, metadata=_rng(ge=0.0, le=1.0))
    fail_below: float | None = field(default=None, metadata=_rng(ge=0.0, le=1.0))


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str = "fashion-mnist"
    model_name: str = "fashion-mnist-classifier"
    user: str | None = None


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = field(default=20, metadata=_rng(ge=1))
    epochs: int = field(default=8, metadata=_rng(ge=1))
    sampler: Literal["tpe", "cmaes", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    timeout: float | None = field(default=None, metadata=_rng(gt=0.0))
    heartbeat_interval: int = field(default=60, metadata=_rng(ge=1))


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
    def is_torch_model(self) -> bool:
        return self.model.name != "logreg"


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
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, value, _type_name(tp))
        for arg in args:
            if arg is type(None):
                continue
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
    if cls is ModelConfig:  # pragma: no cover - handled by the union branch
        raise TypeError
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
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config error: missing key {key}")
            continue
        tp = hints[name]
        value = _build_model(raw[name], key) if tp == ModelConfig else _coerce(key, raw[name], tp)
        _check_range(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def _build_model(raw: Any, key: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise _fail(key, raw, "a mapping")
    name = raw.get("name")
    if name not in MODEL_SCHEMAS:
        raise _fail(f"{key}.name", name, "one of " + ", ".join(repr(n) for n in MODEL_SCHEMAS))
    return _build(MODEL_SCHEMAS[name], raw, key)


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
    model = cfg.model
    for list_key, values in (("hidden_sizes", getattr(model, "hidden_sizes", [1])),
                             ("channels", getattr(model, "channels", [1])),
                             ("blocks", getattr(model, "blocks", [1]))):
        if not values or any(v < 1 for v in values):
            raise _fail(f"model.{list_key}", values, "a non-empty list of integers >= 1")
    if isinstance(model, CNNConfig) and len(model.channels) > 3:
        raise _fail("model.channels", model.channels, "at most 3 conv blocks (28 -> 3 pixels)")
    if isinstance(model, ResNetConfig) and len(model.blocks) > 3:
        raise _fail("model.blocks", model.blocks, "at most 3 stages")
    if len(cfg.optimizer.betas) != 2 or not all(0 <= b < 1 for b in cfg.optimizer.betas):
        raise _fail("optimizer.betas", cfg.optimizer.betas, "two numbers in [0, 1)")


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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    conf_dir = conf_dir or repo_root() / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        composed = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(composed, resolve=True)  # type: ignore[return-value]
