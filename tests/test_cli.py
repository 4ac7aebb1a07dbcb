"""`deep-repro predict` and the MLflow pyfunc flavour, on a small real model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deep_repro import cli, config, data, inference, tracking, training
from deep_repro.files import atomic_path
from tests.helpers import evidence

Make = Callable[..., config.Config]


@pytest.fixture
def exported(make_cfg: Make, splits: data.Splits, tmp_path: Path) -> Path:
    cfg = make_cfg("model=logreg", "model.max_iter=60")
    net = training.train_model(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val
    ).model
    target = tmp_path / "models/inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(
            inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
        )
    return target


@pytest.fixture
def images(splits: data.Splits, tmp_path: Path) -> dict[str, Path]:
    """A real test image saved as a large RGB product-style photo, a raw one, and a corrupt."""
    trouser = int(np.flatnonzero(splits.y_test == 1)[0])
    photo = Image.fromarray(255 - splits.x_test[trouser]).convert("RGB").resize((112, 112))
    paths = {
        "photo": tmp_path / "trouser_photo.png",
        "raw": tmp_path / "raw.png",
        "corrupt": tmp_path / "corrupt.png",
    }
    photo.save(paths["photo"])
    Image.fromarray(splits.x_test[trouser]).save(paths["raw"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return paths


def test_load_image_matches_fashion_mnist_format(
    images: dict[str, Path], splits: data.Splits
) -> None:
    raw = cli.load_image(images["raw"])
    assert raw.shape == (28, 28) and raw.dtype == np.uint8
    photo = cli.load_image(images["photo"])  # dark-on-light photo is inverted back
    assert photo.mean() < 128


def test_predict_file_model_handles_good_and_corrupt_files(
    exported: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str], tracking_env: str
) -> None:
    code = cli.main(
        [
            "predict",
            "--model",
            str(exported),
            str(images["photo"]),
            str(images["corrupt"]),
            str(images["raw"]),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1  # one file failed, the others were still classified
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{images['photo']}: Trouser ")
    assert lines[1].startswith(f"{images['raw']}: Trouser ")
    assert f"{images['corrupt']}: error: cannot read image" in err


def test_pyfunc_model_in_process_and_champion_predict(
    exported: Path,
    images: dict[str, Path],
    splits: data.Splits,
    make_cfg: Make,
    tracking_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    cfg = make_cfg()
    with tracking.stage_run("postprocess", cfg) as run:
        version = tracking.log_inference_model(run, exported, splits.x_val[:4], "cli-model")
    assert version == "1"
    tracking.validation_gate(run.client, "cli-model", version, evidence(0.9), 0.842, 0.05)
    model = mlflow.pyfunc.load_model("models:/cli-model@champion")
    frame = model.predict(splits.x_test[:8].astype(np.float64))
    assert list(frame.columns[:2]) == ["predicted", "class_name"]
    probs = frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    direct = inference.predict_logits(inference.load_inference_model(exported), splits.x_test[:8])
    assert np.array_equal(frame["predicted"].to_numpy(), direct.argmax(1).numpy())
    # The model's own check enforces the input contract: whole images of 28x28 pixels.
    with pytest.raises(MlflowException, match=r"28x28 = 784 pixels"):
        model.predict(splits.x_test[:3].reshape(-1)[:300].astype(np.float64))
    capsys.readouterr()
    assert cli.main(["predict", "--model", "models:/cli-model@champion", str(images["raw"])]) == 0
    assert "Trouser" in capsys.readouterr().out


@pytest.fixture
def two_versions(
    make_cfg: Make,
    splits: data.Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracking_env: str,
) -> dict[str, Path]:
    """A project dir whose sqlite MLflow store holds two registered versions that predict
    differently (v1: always class 0 "T-shirt/top", v2: always class 1 "Trouser"), v1 champion."""
    import yaml

    from .helpers import REPO, fixture_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(config.compose(fixture_overrides(), REPO / "conf"), sort_keys=False)
    )
    cfg = make_cfg()
    programs = {}
    for cls in (0, 1):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        with torch.no_grad():
            net[1].weight.zero_()
            net[1].bias.zero_()
            net[1].bias[cls] = 10.0
        programs[cls] = tmp_path / f"always{cls}.pt2"
        with atomic_path(programs[cls]) as tmp:
            inference.export(
                inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
            )
    versions = []
    for cls in (0, 1):
        with tracking.stage_run("postprocess", cfg) as run:
            versions.append(
                tracking.log_inference_model(
                    run, programs[cls], splits.x_val[:4], cfg.tracking.model_name
                )
            )
    assert versions == ["1", "2"]
    tracking.validation_gate(run.client, cfg.tracking.model_name, "1", evidence(0.9), 0.5, 0.05)
    return programs


def test_champion_predict_uses_a_local_copy_and_notices_the_alias_moving(
    two_versions: dict[str, Path],
    images: dict[str, Path],
    make_cfg: Make,
    tracking_env: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    name = make_cfg().tracking.model_name
    capsys.readouterr()
    assert cli.main(["predict", str(images["raw"])]) == 0
    assert ": T-shirt/top 1.000" in capsys.readouterr().out  # v1
    cached = tmp_path / ".cache/models" / name
    assert (cached / "1/inference.pt2").read_bytes() == two_versions[0].read_bytes()
    MlflowClient(tracking_env, tracking_env).set_registered_model_alias(name, "champion", "2")
    assert cli.main(["predict", str(images["raw"])]) == 0
    assert ": Trouser 1.000" in capsys.readouterr().out  # v2, noticed without any flag
    assert (cached / "2/inference.pt2").read_bytes() == two_versions[1].read_bytes()
    # A copy that no longer matches its version (a re-created store) is fetched again.
    (cached / "2/inference.pt2").write_bytes(two_versions[0].read_bytes())
    meta = cached / "2/version.json"
    meta.write_text(meta.read_text().replace('"created": ', '"created": 1'))
    assert cli.main(["predict", str(images["raw"])]) == 0
    assert ": Trouser 1.000" in capsys.readouterr().out


def test_predict_fast_path_imports_no_mlflow(
    two_versions: dict[str, Path], images: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from deep_repro import cli; rc = cli.main(['predict', {!r}{}]); "
        "heavy = sorted({{m.split('.')[0] for m in sys.modules}} & "
        "{{'mlflow', 'hydra', 'optuna', 'matplotlib', 'sqlalchemy'}}); "
        "print('HEAVY', heavy, 'DYNAMO', 'torch._dynamo' in sys.modules); sys.exit(rc)"
    )
    for extra in (f", '--model', {str(two_versions[0])!r}", ""):  # .pt2, champion
        for attempt in ("first", "again"):
            proc = subprocess.run(
                [sys.executable, "-c", code.format(str(images["raw"]), extra)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                check=True,
            )
            assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
            # torch.export.load (and its compiler stack) only the first time a program is seen:
            # then the verified fast-start copy runs (deep_repro.inference.fast_program).
            if attempt == "again":
                assert "DYNAMO False" in proc.stdout, proc.stdout + proc.stderr


def test_missing_champion_says_what_to_do(
    tracking_env: str,
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml

    from .helpers import REPO, fixture_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(config.compose(fixture_overrides(), REPO / "conf"), sort_keys=False)
    )
    tracking.connect(tracking_env, "fashion-mnist")  # a store with no registered model
    capsys.readouterr()  # MLflow's own log lines while it creates the store
    for argv in (
        ["predict", str(images["raw"])],
        ["lineage", "models:/fashion-mnist-classifier@champion"],
    ):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "@champion" in err and "--model models/inference.pt2" in err
        assert "uv run dvc repro" in err and "evaluate.baseline" in err


def test_tune_help_lists_every_tune_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from .helpers import REPO

    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    composed = config.compose([], REPO / "conf")["tune"]
    for key, value in composed.items():
        shown = "null" if value is None else str(value)
        assert f"tune.{key}={shown}" in out, key
    assert "examples:" in out and "deep-repro tune model=mlp tune.n_trials=50" in out
