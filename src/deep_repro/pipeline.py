"""The pipeline's stages as data: what each consumes, produces and is configured by.

This is the one place the graph is written: `dvc.yaml` is generated from it and from the stage
scripts' imports (`python -m deep_repro.dvc_yaml`; CI and pre-commit check it is fresh), and the
tracking module uses it to record the content hash of every input and output, which is how MLflow
runs are linked across stages even when DVC skips a cached stage.
"""

from __future__ import annotations

from dataclasses import dataclass

VALIDATED = "reports/validate.json"
RAW_DIR = "data/raw"
RAW_FILES = tuple(
    f"{RAW_DIR}/{name}.gz"
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
)
PROCESSED_TRAIN = "data/processed/train.npz"
PROCESSED_TEST = "data/processed/test.npz"
SPLIT_TRAIN_VAL = "data/split/train_val.npz"
SPLIT_TEST = "data/split/test.npz"
DATA_SUMMARY = "reports/data/summary.json"  # checks, sizes, class counts, duplicate counts
CLASS_BALANCE = "reports/data/class_balance.csv"
INTENSITY_HIST = "reports/data/intensity_hist.csv"
MEAN_IMAGES_PNG = "reports/data/mean_images.png"
DUPLICATES_PNG = "reports/data/duplicates.png"
CHECKPOINT = "models/checkpoint.pt"
INFERENCE_MODEL = "models/inference.pt2"
TRAIN_HISTORY = "reports/train/history.csv"
TRAIN_METRICS = "reports/train/metrics.json"
POSTPROCESS_REPORT = "reports/postprocess.json"
METRICS = "reports/metrics.json"  # DVC metrics: {"val"|"test": accuracy, ci95, macro_f1}
EVAL_DETAILS = "reports/eval/details.json"  # every number of the evaluation (top2, ece, ...)
CONFUSION = "reports/eval/confusion.csv"
# What the inference model predicted on every val and test image (evaluation.predictions): the
# gate's evidence, and what any later check of the result recomputes from.
PREDICTIONS = "reports/eval/predictions.json"
PER_CLASS = "reports/eval/per_class.csv"
RELIABILITY = "reports/eval/reliability.csv"
CONFUSION_PNG = "reports/eval/confusion_matrix.png"
MISCLASSIFIED_PNG = "reports/eval/misclassified.png"
RELIABILITY_PNG = "reports/eval/reliability.png"


@dataclass(frozen=True)
class StageSpec:
    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    tracked: bool = True  # whether the stage records an MLflow stage run
    # Runs on every `dvc repro` (dvc.yaml `always_changed`), for checks that depend on more
    # than its deps: the machine, the network.
    always_changed: bool = False

    @property
    def script(self) -> str:
        return f"stages/{self.name}.py"


# `validate` declares the whole of params.yaml (dvc.yaml: `- params.yaml:` with no keys), so it
# reruns on ANY param change and rejects a bad config before DVC removes the outputs of a stage
# it would rerun. Every other stage depends on VALIDATED in dvc.yaml for ORDER only: the file's
# bytes never change, so it is not a data dep here (no md5 tag, no lineage link) and a param change
# reruns a stage only through that stage's own params. It records no MLflow run (nothing to
# track; and it must not need a reachable store). It is `always_changed`: its checks of this
# machine (memory, CUDA, the tracking host) must run even when no param or code changed.
ALL_PARAMS = "params.yaml"

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("validate", (), (VALIDATED,), (ALL_PARAMS,), tracked=False, always_changed=True),
        StageSpec("download", (), RAW_FILES, ("data.mirrors", "data.sha256")),
        StageSpec("preprocess", RAW_FILES, (PROCESSED_TRAIN, PROCESSED_TEST), ()),
        StageSpec(
            "split",
            (PROCESSED_TRAIN, PROCESSED_TEST),
            (SPLIT_TRAIN_VAL, SPLIT_TEST),
            ("data.subset", "split"),
        ),
        # A report only: nothing downstream depends on it, so it never delays or reruns training.
        StageSpec(
            "analyze",
            (SPLIT_TRAIN_VAL, SPLIT_TEST),
            (DATA_SUMMARY, CLASS_BALANCE, INTENSITY_HIST, MEAN_IMAGES_PNG, DUPLICATES_PNG),
            ("analyze",),
        ),
        StageSpec(
            "train",
            (SPLIT_TRAIN_VAL,),
            (CHECKPOINT, TRAIN_HISTORY, TRAIN_METRICS),
            ("seed", "model", "optimizer", "scheduler", "augment", "train"),
        ),
        StageSpec(
            "postprocess",
            (CHECKPOINT, SPLIT_TRAIN_VAL),
            (INFERENCE_MODEL, POSTPROCESS_REPORT),
            ("seed", "model", "postprocess", "train.num_threads"),
        ),
        StageSpec(
            "evaluate",
            (INFERENCE_MODEL, SPLIT_TRAIN_VAL, SPLIT_TEST),
            (
                METRICS,
                EVAL_DETAILS,
                PREDICTIONS,
                CONFUSION,
                PER_CLASS,
                RELIABILITY,
                CONFUSION_PNG,
                MISCLASSIFIED_PNG,
                RELIABILITY_PNG,
            ),
            ("evaluate", "model.name", "train.num_threads"),
        ),
    )
}

# The ONLY package modules a stage may import without listing them in its dvc.yaml deps: their
# code cannot change any DVC output, so an edit to them must not rerun the pipeline. Everything
# else a stage imports, directly, transitively or lazily inside a function, is a dep.
CODE_DEPS_EXEMPT: dict[str, str] = {
    "deep_repro": "package __init__: only defaults OMP_WAIT_POLICY (how idle threads wait)",
    "deep_repro.errors": "exception types, one-line messages, exit status, log redaction",
    "deep_repro.paths": "finds the repository root; output paths themselves are fixed in dvc.yaml",
    "deep_repro.pipeline": "path constants and STAGES, from which dvc.yaml is generated, so any "
    "change that matters changes dvc.yaml itself",
    "deep_repro.tracking": "writes to MLflow only (runs, tags, registry), never a DVC output",
}
