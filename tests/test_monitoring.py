"""Monitoring: prediction log, drift checks on real Fashion-MNIST batches, `deep-repro monitor`."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from deep_repro import cli, config, data, inference, monitoring, tracking, training
from deep_repro.files import atomic_path, file_digest
from deep_repro.serving import pyfunc as serving
from tests.helpers import REPO, fixture_overrides

Scenario = Callable[[np.ndarray, np.random.Generator], np.ndarray]
FOOTWEAR = (5, 7, 9)


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = x / 255.0 + rng.normal(0, 0.2, x.shape)
    return np.round(np.clip(noisy, 0, 1) * 255).astype(np.uint8)


SCENARIOS: dict[str, Scenario] = {
    "inverted": lambda x, rng: 255 - x,
    "rotated90": lambda x, rng: np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))),
    "darkened": lambda x, rng: (x * 0.5).astype(np.uint8),
    "noise0.2": _noise,
    "footwear": lambda x, rng: x,  # the batch is drawn from classes 5, 7, 9 only
}


@pytest.fixture(scope="module")
def model_file(splits: data.Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = config.validate(
        config.compose(
            [*fixture_overrides(), "model=mlp", "model.hidden_sizes=[128]", "train.epochs=3"],
            REPO / "conf",
        )
    )
    net = training.train_model(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val
    ).model
    target = tmp_path_factory.mktemp("model") / "inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(
            inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
        )
    return target


@pytest.fixture(scope="module")
def predictor(model_file: Path) -> monitoring.Predictor:
    program = inference.load_inference_model(model_file)
    return lambda x: torch.softmax(inference.predict_logits(program, x), dim=1).numpy()


@pytest.fixture(scope="module")
def reference(splits: data.Splits, predictor: monitoring.Predictor) -> monitoring.Reference:
    return monitoring.Reference(splits.x_val, splits.y_val, predictor)


def draw(splits: data.Splits, scenario: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap batch of 500 test images (footwear: from those classes only), transformed."""
    rng = np.random.default_rng(seed)
    pool = (
        np.flatnonzero(np.isin(splits.y_test, FOOTWEAR))
        if scenario == "footwear"
        else np.arange(len(splits.y_test))
    )
    idx = rng.choice(pool, 500)
    x = splits.x_test[idx]
    return (SCENARIOS[scenario](x, rng) if scenario != "clean" else x), splits.y_test[idx]


def alarms(
    splits: data.Splits,
    reference: monitoring.Reference,
    predictor: monitoring.Predictor,
    scenario: str,
    n: int,
) -> int:
    count = 0
    for seed in range(n):
        images, _ = draw(splits, scenario, seed)
        count += reference.compare(monitoring.features_from_images(images, predictor)).drift
    return count


@pytest.mark.parametrize("n", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_clean_batches_raise_no_alarm_and_drifted_ones_do(
    splits: data.Splits, reference: monitoring.Reference, predictor: monitoring.Predictor, n: int
) -> None:
    # The bar: >= 19 of 20 right, i.e. at most one miss per scenario.
    assert alarms(splits, reference, predictor, "clean", n) <= 1
    for scenario in SCENARIOS:
        assert alarms(splits, reference, predictor, scenario, n) >= n - 1, scenario


def test_rotation_is_caught_in_output_space_and_labels_add_accuracy(
    splits: data.Splits, reference: monitoring.Reference, predictor: monitoring.Predictor
) -> None:
    images, labels = draw(splits, "rotated90", 0)
    report = reference.compare(monitoring.features_from_images(images, predictor, labels))
    fired = {c.name for c in report.fired}
    # Rotation leaves every intensity statistic unchanged: only the model can tell.
    assert not fired & {"mean", "std", "dark"}
    assert {"mmd", "classes", "accuracy"} <= fired
    assert report.verdict().startswith("DRIFT: ") and "mmd p=" in report.verdict()
    assert len(report.checks) == 7 and report.threshold == pytest.approx(0.01 / 7)
    # Deterministic: the same batch gives the same p-values.
    again = reference.compare(monitoring.features_from_images(images, predictor, labels))
    assert [c.p_value for c in again.checks] == [c.p_value for c in report.checks]


def test_log_format_is_shared_and_monitorable(
    splits: data.Splits,
    reference: monitoring.Reference,
    predictor: monitoring.Predictor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # serving/pyfunc.py cannot import the package: its statistics must equal the monitor's.
    ours = monitoring.image_stats(splits.x_test)
    assert np.allclose(np.stack(serving.image_stats(splits.x_test), axis=1), ours)
    monkeypatch.setenv(serving.LOG_ENV, str(tmp_path / "clean"))
    images, _ = draw(splits, "clean", 1)
    serving.log_predictions(images, predictor(images), {"md5": "abc"})
    monkeypatch.setenv(serving.LOG_ENV, str(tmp_path / "inverted"))
    serving.log_predictions(255 - images, predictor(255 - images), {"md5": "abc"})
    clean = monitoring.load_batch(tmp_path / "clean", predictor)
    assert len(clean) == 500 and clean.models == [{"md5": "abc"}]
    assert not reference.compare(clean).drift
    assert reference.compare(monitoring.load_batch(tmp_path / "inverted", predictor)).drift


def _writer(root: str, seed: int) -> None:
    import os

    os.environ[serving.LOG_ENV] = root
    rng = np.random.default_rng(seed)
    for _ in range(20):
        probs = rng.dirichlet(np.ones(10), size=25)
        serving.log_predictions(
            rng.integers(0, 256, (25, 28, 28), dtype=np.uint8), probs, {"md5": str(seed)}
        )


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (log_file,) = tmp_path.glob("predictions-*.jsonl")
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(records) == 4 * 20 * 25
    assert {r["model"]["md5"] for r in records} == {"0", "1", "2", "3"}


def test_predict_writes_the_prediction_log_with_a_bounded_sample(
    model_file: Path,
    splits: data.Splits,
    tmp_path: Path,
    tracking_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(splits.x_test[i]).save(paths[-1])
    logdir = tmp_path / "preds"
    monkeypatch.setenv("DEEP_REPRO_PREDICTION_LOG", str(logdir))
    monkeypatch.setenv("DEEP_REPRO_PREDICTION_LOG_SAMPLE", "2")
    assert cli.main(["predict", "--model", str(model_file), *map(str, paths)]) == 0
    printed = capsys.readouterr().out.splitlines()
    (log_file,) = logdir.glob("predictions-*.jsonl")
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(records) == 5
    assert {r["model"]["md5"] for r in records} == {file_digest(model_file)}
    for record, line in zip(records, printed, strict=True):
        assert data.CLASS_NAMES[record["predicted"]] in line
        assert 0 < record["confidence"] <= 1 and len(record["probs"]) == 10
        assert {"time", "mean", "std", "dark"} <= record.keys()
    (sample,) = {r["sample"] for r in records if "sample" in r}
    with np.load(logdir / sample) as npz:
        assert npz["images"].shape == (2, 28, 28)
        assert np.array_equal(npz["images"], splits.x_test[npz["index"]])


def test_served_pyfunc_model_logs_its_predictions(
    model_file: Path,
    splits: data.Splits,
    make_cfg: Callable[..., config.Config],
    tracking_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.pyfunc

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("DEEP_REPRO_PREDICTION_LOG", str(tmp_path / "served"))
    with tracking.stage_run("postprocess", make_cfg()) as run:
        tracking.log_inference_model(run, model_file, splits.x_val[:4], "mon-model")
    assert not (tmp_path / "served").exists()  # the signature probe is not a prediction
    model = mlflow.pyfunc.load_model("models:/mon-model/1")
    frame = model.predict(splits.x_test[:7].astype(np.float64))  # the float64 signature
    records = [
        json.loads(line)
        for f in (tmp_path / "served").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert [r["predicted"] for r in records] == frame["predicted"].tolist()
    assert records[0]["model"] == {"md5": file_digest(model_file)}


def test_monitor_cli_exit_codes_and_mlflow_run(
    model_file: Path,
    splits: data.Splits,
    tracking_env: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    ref = tmp_path / "train_val.npz"
    data.save_arrays(
        ref,
        x_train=splits.x_train[:1],
        y_train=splits.y_train[:1],
        x_val=splits.x_val,
        y_val=splits.y_val,
    )
    images, labels = draw(splits, "clean", 3)
    np.savez(tmp_path / "clean.npz", images=images, labels=labels)
    np.savez(tmp_path / "inverted.npz", images=255 - images)
    base = ["monitor", "--model", str(model_file), "--reference", str(ref)]
    assert cli.main([*base, str(tmp_path / "clean.npz")]) == 0
    assert capsys.readouterr().out.startswith("no drift")
    assert cli.main([*base, str(tmp_path / "inverted.npz")]) == 3
    verdict = capsys.readouterr().out.strip()
    assert verdict.startswith("DRIFT: ") and "mean p=" in verdict and "\n" not in verdict

    client = MlflowClient(tracking_env)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`deep_repro.kind` = 'monitor'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.data.metrics["drift"] for r in runs] == [0.0, 1.0]
    assert runs[0].data.metrics["batch_accuracy"] > 0.5 and "p_accuracy" in runs[0].data.metrics
    assert runs[1].data.tags["deep_repro.monitor.model_md5"] == file_digest(model_file)
    assert runs[1].data.tags["deep_repro.monitor.verdict"] == verdict
    artifacts = {a.path for a in client.list_artifacts(runs[1].info.run_id, "monitor")}
    assert artifacts == {"monitor/drift.png", "monitor/report.json"}


def test_monitor_cli_user_errors(
    model_file: Path, tracking_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, good = tmp_path / "bad.npz", tmp_path / "good.npz"
    np.savez(bad, images=np.zeros((3, 32, 32), dtype=np.float32))
    np.savez(good, images=np.zeros((3, 28, 28), dtype=np.uint8), labels=np.zeros(3))
    for path, ref in ((good, bad), (tmp_path / "missing", good)):
        with pytest.raises(SystemExit) as exc:
            cli.main(
                [
                    "monitor",
                    "--model",
                    str(model_file),
                    "--no-log",
                    str(path),
                    "--reference",
                    str(ref),
                ]
            )
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]
