"""The config, underneath every other step: one typed schema whose values all come from `conf/`.

Owns the schema (`schema`: every section of `params.yaml`, its types and ranges, as pydantic
models whose errors `typecheck` turns into one line), the URL rules for
every param that names a server (`urls`), the view of the config one DVC stage may read
(`stage_view`), the facts of the task itself (`task`: Fashion-MNIST's classes and image shape)
and the base of the architectures' schemas (`model_base`; the schemas themselves register from
`deep_repro.models`). Imports no torch: `validate` rejects a bad config in its first second.
The schema's names load on first use (`__getattr__` below), the task's facts at once.
"""

import importlib
from typing import TYPE_CHECKING, Any

from deep_repro.config.task import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    NUM_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    class_label,
)

if TYPE_CHECKING:
    from deep_repro.config.model_base import (
        ModelConfig,
        TorchModelConfig,
        architectures,
        check_sizes,
        register_architecture,
    )
    from deep_repro.config.schema import (
        DATA_FILES,
        AdamWConfig,
        AnalyzeConfig,
        AugmentConfig,
        Config,
        CosineConfig,
        DataConfig,
        EvaluateConfig,
        LightAugmentConfig,
        MirrorUrl,
        NoAugmentConfig,
        NoSchedulerConfig,
        OneCycleConfig,
        OptimizerConfig,
        PostprocessConfig,
        SchedulerConfig,
        Seed,
        SGDConfig,
        SplitConfig,
        StorageUrl,
        TrackingConfig,
        TrackingUri,
        TrainConfig,
        TuneConfig,
        compose,
        compose_with_choices,
        flatten,
        load_config,
        to_dict,
        validate,
    )
    from deep_repro.config.typecheck import Schema, Unchecked


def __getattr__(name: str) -> Any:
    """The schema's names, imported on first use: `deep-repro predict` reads only the task's
    facts here and must not pay for pydantic and YAML at start-up."""
    if name in __all__:
        for module in ("schema", "model_base", "typecheck"):
            found = importlib.import_module(f"{__name__}.{module}")
            if hasattr(found, name):
                globals()[name] = value = getattr(found, name)
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASS_NAMES",
    "DATA_FILES",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "AdamWConfig",
    "AnalyzeConfig",
    "AugmentConfig",
    "Config",
    "CosineConfig",
    "DataConfig",
    "EvaluateConfig",
    "LightAugmentConfig",
    "MirrorUrl",
    "ModelConfig",
    "NoAugmentConfig",
    "NoSchedulerConfig",
    "OneCycleConfig",
    "OptimizerConfig",
    "PostprocessConfig",
    "SGDConfig",
    "SchedulerConfig",
    "Schema",
    "Seed",
    "SplitConfig",
    "StorageUrl",
    "TorchModelConfig",
    "TrackingConfig",
    "TrackingUri",
    "TrainConfig",
    "TuneConfig",
    "Unchecked",
    "architectures",
    "check_sizes",
    "class_label",
    "compose",
    "compose_with_choices",
    "flatten",
    "load_config",
    "register_architecture",
    "to_dict",
    "validate",
]
