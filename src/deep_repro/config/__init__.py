"""The config, underneath every other step: one typed schema whose values all come from `conf/`.

Owns the schema (`schema`: every section of `params.yaml`, its types and ranges), the checker that
turns plain YAML into typed, frozen objects with one-line errors (`typecheck`), the URL rules for
every param that names a server (`urls`), the view of the config one DVC stage may read
(`stage_view`), the facts of the task itself (`task`: Fashion-MNIST's classes and image shape)
and the base of the architectures' schemas (`model_base`; the schemas themselves register from
`deep_repro.models`). Imports no torch: `validate` rejects a bad config in its first second.
"""

from deep_repro.config.model_base import (
    ModelConfig,
    TorchModelConfig,
    architectures,
    check_sizes,
    register_architecture,
)
from deep_repro.config.schema import (
    DATA_FILES,
    SEED,
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
from deep_repro.config.task import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    NUM_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    class_label,
)
from deep_repro.config.typecheck import Unchecked

__all__ = [
    "CLASS_NAMES",
    "DATA_FILES",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SEED",
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
