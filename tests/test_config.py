"""The config contract: params.yaml == composition of conf/, and one clear line per bad value."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from deep_repro import config
from deep_repro.errors import ConfigError
from deep_repro.models import MODELS

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_composition_of_conf() -> None:
    # `dvc repro` does not recompose conf/: a stale params.yaml would silently train the old
    # config. Fix a failure with `uv run python scripts/compose_params.py`.
    # The committed composition, not the working file: `dvc exp run -S ...` rewrites params.yaml
    # in the workspace, and a user's experiment must not fail the test suite.
    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True, check=False
    )
    text = shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()
    committed = yaml.safe_load(text)
    assert committed == config.compose([], REPO / "conf")


def conf_values(conf: Path) -> dict[str, Any]:
    """What conf/ says the default config is, read from its YAML files without Hydra or the
    schema: config.yaml's own keys plus the chosen file of each group in its defaults list."""
    root = yaml.safe_load((conf / "config.yaml").read_text())
    values = {k: v for k, v in root.items() if k != "defaults"}
    for entry in root["defaults"]:
        if entry != "_self_":
            ((group, choice),) = entry.items()
            values[group] = yaml.safe_load((conf / group / f"{choice}.yaml").read_text())
    return values


def test_default_config_validates() -> None:
    # The validated default config is exactly what conf/ says, key for key: the schema adds
    # no value of its own (and `dvc exp run -S model.lr=0.01` works since model.lr exists).
    cfg = config.validate(config.compose([], REPO / "conf"))
    assert config.to_dict(cfg) == conf_values(REPO / "conf")
    assert cfg.model.name == "cnn" and cfg.model.lr == 0.005
    assert cfg.data.subset is None and cfg.tracking.uri is None


def _schemas() -> set[type]:
    """Every dataclass the config is validated against: Config, its parts, every option of a
    tagged union and every registered architecture."""
    found: set[type] = set()
    todo: list[Any] = [config.Config, *(spec.schema for spec in MODELS.values())]
    while todo:
        tp = todo.pop()
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if tp not in found:
                found.add(tp)
                todo += typing.get_type_hints(tp).values()
        else:
            todo += typing.get_args(tp)
    return found


def test_schemas_hold_no_default_values() -> None:
    # conf/ is the one source of values: a default in the schema would be a second one that
    # silently disagrees (it once said train.epochs 12 and label_smoothing 0.0; conf/ 15, 0.05).
    schemas = _schemas()
    assert {"Config", "TrainConfig", "SGDConfig", "CNNConfig", "MobileNetConfig"} <= {
        s.__name__ for s in schemas
    }
    defaults = [
        f"{s.__name__}.{f.name}"
        for s in schemas
        for f in dataclasses.fields(s)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaults == []


def test_missing_key_is_an_error_not_a_default() -> None:
    raw = config.compose([], REPO / "conf")
    del raw["train"]["label_smoothing"]
    with pytest.raises(ConfigError, match=r"^config error: missing key train\.label_smoothing$"):
        config.validate(raw)


def test_every_model_in_conf_is_registered_with_a_search_space() -> None:
    # Adding an architecture = conf/model/<name>.yaml + its entry in models.py +
    # conf/search/<name>.yaml; nothing else names it.
    conf_models = {p.stem for p in (REPO / "conf/model").glob("*.yaml")}
    assert conf_models == set(MODELS)
    assert conf_models == {p.stem for p in (REPO / "conf/search").glob("*.yaml")}


def test_validation_imports_no_torch() -> None:
    # Every stage and CLI command validates its config first: that must stay cheap.
    code = (
        "import sys; from deep_repro import config; "
        "cfg = config.load_config(); assert cfg.is_torch_model; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_group_composes(name: str) -> None:
    cfg = config.validate(config.compose([f"model={name}"], REPO / "conf"))
    assert cfg.model.name == name
    assert isinstance(cfg.model, MODELS[name].schema)
    assert cfg.is_torch_model == (MODELS[name].trainer == "torch")


@pytest.mark.parametrize(
    "group,choice",
    [("optimizer", "sgd"), ("scheduler", "cosine"), ("scheduler", "none"), ("augment", "none")],
)
def test_every_training_group_composes(group: str, choice: str) -> None:
    cfg = config.validate(config.compose([f"{group}={choice}"], REPO / "conf"))
    assert getattr(cfg, group).name == choice


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.lr=-0.1"], "model.lr = -0.1: expected a value > 0"),
        (["model.lr=0"], "model.lr = 0.0: expected a value > 0"),
        (["train.epochs=0"], "train.epochs = 0: expected a value >= 1"),
        (["split.val_size=1.5"], "split.val_size = 1.5: expected a value < 1"),
        (["split.val_size=0"], "split.val_size = 0.0: expected a value > 0"),
        (["train.batch_size=abc"], "train.batch_size = 'abc': expected an integer"),
        (["+train.epochz=3"], "unknown key train.epochz"),
        (["+colour=blue"], "unknown key colour"),
        (["model.name=transformer"], "model.name = 'transformer': expected one of"),
        (["optimizer.name=rmsprop"], "optimizer.name = 'rmsprop': expected one of 'adamw', 'sgd'"),
        (["scheduler.name=step"], "scheduler.name = 'step'"),
        (["train.device=tpu"], "train.device = 'tpu'"),
        (["train.num_threads=0"], "train.num_threads = 0: expected a value >= 1"),
        (
            ["train.num_threads=fast"],
            "train.num_threads = 'fast': expected an integer or one of 'auto'",
        ),
        (["data.subset=-5"], "data.subset = -5: expected a value >= 20"),
        (["data.mirrors=[ftp://x]"], "data.mirrors[0] = 'ftp://x'"),
        (["data.sha256.train-images-idx3-ubyte=abc"], "data.sha256.train-images-idx3-ubyte"),
        (["tune.n_trials=0"], "tune.n_trials = 0: expected a value >= 1"),
        (["tune.sampler=annealing"], "tune.sampler = 'annealing'"),
        (["model.dropout=1.0"], "model.dropout = 1.0: expected a value < 1"),
        (["model.lr=inf"], "model.lr = inf: expected a finite number"),
        (["model.lr=nan"], "model.lr = nan: expected a finite number"),
        (
            ["optimizer.weight_decay=-inf"],
            "optimizer.weight_decay = -inf: expected a finite number",
        ),
        (["evaluate.fail_below=nan"], "evaluate.fail_below = nan: expected a finite number"),
        (
            ["analyze.near_duplicate_threshold=40"],
            "analyze.near_duplicate_threshold = 40.0: expected a value <= 32",
        ),
        (["analyze.duplicate_examples=-1"], "analyze.duplicate_examples = -1: expected a value >="),
        (["model.channels=[]"], "model.channels = []: expected a non-empty list of integers >= 1"),
        (["model.channels=[8,8,8,8]"], "model.channels = [8, 8, 8, 8]: expected at most 3 conv"),
        (["model.convs_per_block=0"], "model.convs_per_block = 0: expected a value >= 1"),
        (["model.pool_before_bn=maybe"], "model.pool_before_bn = 'maybe': expected"),
        (["postprocess.tta=vflip"], "postprocess.tta = 'vflip': expected one of"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas = [0.9, 1.5]: expected two numbers"),
        (["+optimizer.momentun=0.9"], "unknown key optimizer.momentun"),
        (["+model.channels=[8]", "model=mlp"], "unknown key model.channels"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    raw = config.compose(overrides, REPO / "conf")
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("value", ["auto", "1", "3"])
def test_num_threads_is_auto_or_a_positive_int(value: str) -> None:
    cfg = config.validate(config.compose([f"train.num_threads={value}"], REPO / "conf"))
    assert cfg.train.num_threads == (value if value == "auto" else int(value))


@pytest.mark.parametrize("path", sorted((REPO / "conf/experiment").glob("*.yaml")), ids=str)
def test_every_committed_experiment_validates(path: Path) -> None:
    """`dvc exp run -S +experiment=<name>` must not fail on a config error after a conf/ change
    (tuned_cnn pins the architecture it was tuned with when the cnn defaults moved on)."""
    cfg = config.validate(config.compose([f"+experiment={path.stem}"], REPO / "conf"))
    assert cfg.model.name in MODELS


def test_a_key_of_another_option_of_the_group_is_ignored() -> None:
    # Search spaces set `optimizer.momentum` while the sampled optimizer may be adamw.
    cfg = config.validate(config.compose(["+optimizer.momentum=0.5"], REPO / "conf"))
    assert config.to_dict(cfg.optimizer) == {
        "name": "adamw",
        "weight_decay": 0.0005,
        "betas": [0.9, 0.999],
    }


def test_unknown_model_group_is_rejected_by_hydra() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^config error: cannot compose conf/ with overrides "
        r"model=transformer: .*Could not find 'model/transformer'$",
    ):
        config.compose(["model=transformer"], REPO / "conf")


def test_stage_exits_nonzero_with_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    raw = config.compose(["train.epochs=0"], REPO / "conf")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config error: train.epochs = 0: expected a value >= 1"
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params.yaml not found"):
        config.load_config(tmp_path / "params.yaml")


def test_flatten() -> None:
    assert config.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }
