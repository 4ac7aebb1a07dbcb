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

Make = Callable[..., config.Config]


@pytest.fixture
def exported(make_cfg: Make, splits: data.Splits, tmp_path: Path) -> Path:
    cfg = make_cfg("model=logreg", "model.max_iter=60")
    net = training.train_model(cfg, splits.x_train, splits.y_train, splits.x_val,
                               splits.y_val).model
    target = tmp_path / "models/inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(inference.build_inference_module(net),
                         torch.from_numpy(splits.x_val[:2]), tmp)
    return target


@pytest.fixture
def images(splits: data.Splits, tmp_path: Path) -> dict[str, Path]:
    """A real test image saved as a large RGB product-style photo, a raw one, and a corrupt."""
    trouser = int(np.flatnonzero(splits.y_test == 1)[0])
    photo = Image.fromarray(255 - splits.x_test[trouser]).convert("RGB").resize((112, 112))
    paths = {"photo": tmp_path / "trouser_photo.png", "raw": tmp_path / "raw.png",
             "corrupt": tmp_path / "corrupt.png"}
    photo.save(paths["photo"])
    Image.fromarray(splits.x_test[trouser]).save(paths["raw"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return paths


def test_load_image_matches_fashion_mnist_format(images: dict[str, Path],
                                                 splits: data.Splits) -> None:
    raw = cli.load_image(images["raw"])
    assert raw.shape == (28, 28) and raw.dtype == np.uint8
    photo = cli.load_image(images["photo"])  # dark-on-light photo is inverted back
    assert photo.mean() < 128


def test_predict_file_model_handles_good_and_corrupt_files(
        exported: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str],
        tracking_env: str) -> None:
    code = cli.main(["predict", "--model", str(exported), str(images["photo"]),
                     str(images["corrupt"]), str(images["raw"])])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed, the others were still classified
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{images['photo']}: Trouser ")
    assert lines[1].startswith(f"{images['raw']}: Trouser ")
    assert f"{images['corrupt']}: error: cannot read image" in err


def test_pyfunc_model_in_process_and_champion_predict(
        exported: Path, images: dict[str, Path], splits: data.Splits, make_cfg: Make,
        tracking_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    cfg = make_cfg()
    with tracking.stage_run("postprocess", cfg) as run:
        version = tracking.log_inference_model(run, exported, splits.x_val[:4], "cli-model")
    assert version == "1"
    tracking.validation_gate(run.client, "cli-model", version, 0.9, baseline=0.842)
    model = mlflow.pyfunc.load_model("models:/cli-model@champion")
    # The signature takes float64 pixels so JSON reaches the model's own 0..255 integer check.
    frame = model.predict(splits.x_test[:8].astype(np.float64))
    assert list(frame.columns[:2]) == ["predicted", "class_name"]
    probs = frame[[c for c in frame.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    direct = inference.predict_logits(inference.load_inference_model(exported), splits.x_test[:8])
    assert np.array_equal(frame["predicted"].to_numpy(), direct.argmax(1).numpy())
    # The logged signature enforces the input contract: pixel values shaped [N, 28, 28].
    with pytest.raises(MlflowException, match=r"28, 28"):
        model.predict(splits.x_test[:3].reshape(3, 784).astype(np.float64))
    capsys.readouterr()
    assert cli.main(["predict", "--model", "models:/cli-model@champion",
                     str(images["raw"])]) == 0
    assert "Trouser" in capsys.readouterr().out
