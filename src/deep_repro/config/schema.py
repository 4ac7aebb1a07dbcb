"""The one typed schema of the pipeline's configuration, and its validation.

`conf/` (Hydra groups) is composed into `params.yaml`; every stage loads that file through
`load_config()` before doing any work, so a typo or an out-of-range value fails in the first
second with one line naming the key (`config error: model.lr = -1: must be > 0`), never after an
hour of training.
"""

from __future__ import annotations

import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SkipValidation,
    TypeAdapter,
    ValidationError,
)

from deep_repro.config import urls
from deep_repro.config.model_base import ModelConfig, TorchModelConfig
from deep_repro.config.typecheck import (
    Schema,
    Unchecked,
    fail,
    first_error,
    other_options_keys_ignored,
)
from deep_repro.errors import ConfigError
from deep_repro.paths import repo_root

# The schema holds types and ranges only, never values: every value comes from conf/ (the one
# source of defaults), so a field has no default and a key missing from the composition is an
# error. Groups whose options carry different keys (optimizer, scheduler, augment, model) are
# tagged unions: one model per option, picked by `name`.


# Every URL-valued key has one of these types (deep_repro.config.urls: no credentials, a usable
# scheme and host); tests/test_config.py lists them all.
MirrorUrl = Annotated[str, AfterValidator(urls.MIRROR)]
TrackingUri = Annotated[str, AfterValidator(urls.TRACKING)]
StorageUrl = Annotated[str, AfterValidator(urls.STORAGE)]

# numpy's legacy seeding (np.random.seed, Optuna's samplers) takes 0..2**32-1; torch and
# default_rng take more, but one range for every seed fails in validate, not in train.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


# --------------------------------------------------------------------------- data / split
class DataConfig(Schema):
    mirrors: list[MirrorUrl]
    sha256: dict[str, str]
    subset: Annotated[int, Field(ge=20)] | None


class SplitConfig(Schema):
    val_size: Annotated[float, Field(gt=0.0, lt=1.0)]
    seed: Seed


# --------------------------------------------------------------------------- training protocol
class AdamWConfig(Schema):
    name: Literal["adamw"]
    weight_decay: Annotated[float, Field(ge=0.0)]
    betas: list[float]


class SGDConfig(Schema):
    name: Literal["sgd"]
    weight_decay: Annotated[float, Field(ge=0.0)]
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    nesterov: bool


OptimizerConfig = Annotated[
    AdamWConfig | SGDConfig,
    Field(discriminator="name"),
    other_options_keys_ignored(AdamWConfig, SGDConfig),
]


class OneCycleConfig(Schema):
    name: Literal["onecycle"]
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)]


class CosineConfig(Schema):
    name: Literal["cosine"]
    warmup_epochs: Annotated[int, Field(ge=0)]


class NoSchedulerConfig(Schema):
    name: Literal["none"]


SchedulerConfig = Annotated[
    OneCycleConfig | CosineConfig | NoSchedulerConfig,
    Field(discriminator="name"),
    other_options_keys_ignored(OneCycleConfig, CosineConfig, NoSchedulerConfig),
]


class LightAugmentConfig(Schema):
    name: Literal["light"]
    crop_padding: Annotated[int, Field(ge=0, le=8)]
    hflip: bool
    random_erasing: Annotated[float, Field(ge=0.0, le=1.0)]


class NoAugmentConfig(Schema):
    name: Literal["none"]


AugmentConfig = Annotated[
    LightAugmentConfig | NoAugmentConfig,
    Field(discriminator="name"),
    other_options_keys_ignored(LightAugmentConfig, NoAugmentConfig),
]


class TrainConfig(Schema):
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    patience: Annotated[int, Field(ge=0)]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    # Exponential moving average of the weights (and BN statistics), updated every step; the
    # averaged network is the one validated, kept and exported. 0 = off (the last weights).
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    device: str
    precision: Literal["auto", "fp32", "bf16"]
    deterministic: bool
    # `auto`: the cores free of other processes when training starts (device.free_cores).
    num_threads: Annotated[int, Field(ge=1)] | Literal["auto"]
    channels_last: bool


# --------------------------------------------------------------------------- inference
class PostprocessConfig(Schema):
    quantize: Literal["none", "int8"]
    # Test-time augmentation baked into the exported program: `hflip` averages the logits of
    # each image and its mirror image (the same flip the training augmentation uses),
    # `hflip_shift` also of both moved by a pixel (training.augment.TTA_VIEWS); `auto` takes
    # the most accurate of none, hflip and hflip_shift on validation (a linear model trained
    # without flips loses 17 points to the flip), recorded in reports/postprocess.json.
    tta: Literal["auto", "none", "hflip", "hflip_shift"]
    atol: Annotated[float, Field(gt=0.0)]
    int8_max_acc_drop: Annotated[float, Field(ge=0.0, le=1.0)]


class EvaluateConfig(Schema):
    baseline: Annotated[float, Field(ge=0.0, le=1.0)]
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)]
    fail_below: Annotated[float, Field(ge=0.0, le=1.0)] | None


class AnalyzeConfig(Schema):
    # RMS pixel difference (gray levels, 0..255) under which a test image counts as a
    # near-duplicate of its nearest training image (deep_repro.data.analysis); 0: exact only.
    # At most 32: beyond that the pairs are different garments and the search takes minutes.
    near_duplicate_threshold: Annotated[float, Field(ge=0.0, le=32.0)]
    duplicate_examples: Annotated[int, Field(ge=0)]  # pairs drawn in duplicates.png


class TrackingConfig(Schema):
    uri: TrackingUri | None
    experiment: str
    model_name: str
    user: str | None


class TuneConfig(Schema):
    n_trials: Annotated[int, Field(ge=1)]
    epochs: Annotated[int, Field(ge=1)]
    sampler: Literal["tpe", "cmaes", "random", "grid"]
    pruner: Literal["median", "hyperband", "none"]
    seed: Seed
    storage: StorageUrl | None
    study_name: str | None
    # Where the study run and trial runs go: students sharing one study share one experiment
    # (`<prefix>-studies`, every enrolled student may write it), so the study has one run.
    experiment: str | None
    timeout: Annotated[float, Field(gt=0.0)] | None
    heartbeat_interval: Annotated[int, Field(ge=1)]


class Config(Schema):
    seed: Seed
    data: DataConfig
    split: SplitConfig
    # Checked on its own against the architectures registered at that moment (`validate`).
    model: SkipValidation[ModelConfig]
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    augment: AugmentConfig
    train: TrainConfig
    postprocess: PostprocessConfig
    evaluate: EvaluateConfig
    analyze: AnalyzeConfig
    tracking: TrackingConfig
    tune: TuneConfig

    @property
    def is_torch_model(self) -> bool:
        """Trained by gradient descent (`training.fit`), not by scikit-learn."""
        return isinstance(self.model, TorchModelConfig)


def _semantic_checks(cfg: Config) -> None:
    """Cross-field rules the types alone cannot express."""
    missing = set(DATA_FILES) - set(cfg.data.sha256)
    if missing:
        raise ConfigError(
            f"config error: data.sha256 lacks {sorted(missing)}; expected the sha256 "
            f"of each decompressed file {list(DATA_FILES)}"
        )
    for name, digest in cfg.data.sha256.items():
        if name not in DATA_FILES:
            raise ConfigError(
                f"config error: unknown key data.sha256.{name} (allowed: {', '.join(DATA_FILES)})"
            )
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise fail(f"data.sha256.{name}", digest, "64 lowercase hex digits")
    if not cfg.data.mirrors:
        raise fail("data.mirrors", cfg.data.mirrors, "a non-empty list of base URLs")
    device = cfg.train.device
    if not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise fail("train.device", device, "one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if isinstance(cfg.model, ModelConfig):  # not left unchecked (`validate(model=False)`)
        cfg.model.check()
    if isinstance(cfg.optimizer, AdamWConfig):
        betas = cfg.optimizer.betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise fail("optimizer.betas", betas, "two numbers in [0, 1)")


DATA_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@cache
def _model_union(options: tuple[type[ModelConfig], ...]) -> tuple[Any, TypeAdapter[Any]]:
    """The `model` group as a tagged union of the architectures registered so far."""
    union: Any = Annotated[typing.Union[options], Field(discriminator="name")]  # noqa: UP007
    return union, TypeAdapter(union)


def validate(raw: dict[str, Any], *, model: bool = True) -> Config:
    """Turn a plain mapping (parsed params.yaml) into a typed `Config`, or raise ConfigError.

    `model=False` checks every section but `model`, kept as plain values (`Unchecked`): what a
    stage that reads no model param does, so that it needs no model code (see `model_base`).
    Checking `model` needs the architectures registered: import `deep_repro.models` first.
    """
    if not isinstance(raw, dict):
        raise fail("params", raw, "a mapping")
    errors: list[tuple[str, ConfigError]] = []
    cfg = section = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        errors.append(first_error(exc, Config))
    if model and "model" in raw:
        union, adapter = _model_union(tuple(ModelConfig.tagged_options().values()))
        try:
            section = adapter.validate_python(raw["model"])
        except ValidationError as exc:
            errors.append(first_error(exc, union, "model"))
    if errors:  # the first failing key in the order of the schema
        order = [*Config.model_fields]
        rank = {name: i for i, name in enumerate(order)}
        raise min(errors, key=lambda e: rank.get(e[0].split(".")[0], len(order)))[1]
    assert cfg is not None
    if not model:
        section = Unchecked(raw["model"]) if isinstance(raw["model"], dict) else raw["model"]
    cfg = cfg.model_copy(update={"model": section})
    _semantic_checks(cfg)
    return cfg


def load_config(path: Path | None = None, *, model: bool = True) -> Config:
    """Load and validate `params.yaml` (the composed config) from the repository root
    (`model`: see `validate`)."""
    path = path or repo_root() / "params.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config error: {path} not found; run from the repository root "
            "(it is the composition of conf/)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config error: {path} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    return validate(raw or {}, model=model)


def to_dict(cfg: Any) -> Any:
    """Plain-Python view of a Config (or any part of it), keys in schema order."""
    if isinstance(cfg, BaseModel):
        return {name: to_dict(getattr(cfg, name)) for name in type(cfg).model_fields}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


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


def compose_with_choices(
    overrides: list[str] | None = None, conf_dir: Path | None = None
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
            composed = hydra_compose(
                config_name="config", overrides=overrides, return_hydra_config=True
            )
        choices = OmegaConf.to_container(composed.hydra.runtime.choices)
        with open_dict(composed):
            del composed["hydra"]  # its run/sweep dirs cannot resolve outside a Hydra app
        raw = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(
            f"config error: cannot compose conf/ with overrides "
            f"{' '.join(overrides) or '(none)'}: {first}"
        ) from None
    assert isinstance(raw, dict) and isinstance(choices, dict)
    groups = {
        str(k): str(v)
        for k, v in choices.items()
        if v is not None and not str(k).startswith("hydra/")
    }
    return typing.cast(dict[str, Any], raw), groups
