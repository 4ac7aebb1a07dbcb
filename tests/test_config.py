"""The config contract: params.yaml == composition of conf/, and one clear line per bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deep_repro import config
from deep_repro.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_composition_of_conf() -> None:
    # `dvc repro` does not recompose conf/: a stale params.yaml would silently train the old
    # config. Fix a failure with `uv run python scripts/compose_params.py`.
    # The committed composition, not the working file: `dvc exp run -S ...` rewrites params.yaml
    # in the workspace, and a user's experiment must not fail the test suite.
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True,
                           text=True, check=False)
    text = shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()
    committed = yaml.safe_load(text)
    assert committed == config.compose([], REPO / "conf")


def test_default_config_validates() -> None:
    cfg = config.load_config(REPO / "params.yaml")
    assert cfg.model.name == "cnn"
    assert cfg.model.lr > 0  # `dvc exp run -S model.lr=0.01` works on the default config
    assert cfg.data.subset is None and 0 < cfg.split.val_size < 1
    assert cfg.tracking.uri is None


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "resnet"])
def test_every_model_group_composes(name: str) -> None:
    cfg = config.validate(config.compose([f"model={name}"], REPO / "conf"))
    assert cfg.model.name == name


@pytest.mark.parametrize("group,choice", [("optimizer", "sgd"), ("scheduler", "cosine"),
                                          ("scheduler", "none"), ("augment", "none")])
def test_every_training_group_composes(group: str, choice: str) -> None:
    cfg = config.validate(config.compose([f"{group}={choice}"], REPO / "conf"))
    assert getattr(cfg, group).name == choice


@pytest.mark.parametrize("overrides,message", [
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
    (["data.subset=-5"], "data.subset = -5: expected a value >= 20"),
    (["data.mirrors=[ftp://x]"], "data.mirrors[0] = 'ftp://x'"),
    (["data.sha256.train-images-idx3-ubyte=abc"], "data.sha256.train-images-idx3-ubyte"),
    (["tune.n_trials=0"], "tune.n_trials = 0: expected a value >= 1"),
    (["tune.sampler=annealing"], "tune.sampler = 'annealing'"),
    (["model.dropout=1.0"], "model.dropout = 1.0: expected a value < 1"),
])
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    raw = config.compose(overrides, REPO / "conf")
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_model_group_is_rejected_by_hydra() -> None:
    with pytest.raises(Exception, match="transformer"):
        config.compose(["model=transformer"], REPO / "conf")


def test_stage_exits_nonzero_with_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    raw = config.compose(["train.epochs=0"], REPO / "conf")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(REPO / "stages/train.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config error: train.epochs = 0: expected a value >= 1")
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params.yaml not found"):
        config.load_config(tmp_path / "params.yaml")


def test_flatten() -> None:
    assert config.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None}
