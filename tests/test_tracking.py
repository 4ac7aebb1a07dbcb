"""The tracking module against a real MLflow sqlite store: store safety, redaction, the parent
run of an invocation, and the model validation gate."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from deep_repro import config, tracking
from deep_repro.errors import TrackingError, scrub
from deep_repro.paths import store_root

Make = Callable[..., config.Config]


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("http://server:5000") == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking.tracking_uri("http://server:5000") == "sqlite:////elsewhere.db"


def test_store_root_escapes_a_queued_experiments_temp_copy(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    temp_copy = tmp_path / ".dvc/tmp/exps/tmpabc123"
    temp_copy.mkdir(parents=True)
    (temp_copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(temp_copy)
    assert store_root() == tmp_path
    assert tracking.artifact_root() == tmp_path / "mlartifacts"


def test_redaction() -> None:
    assert scrub("postgresql://me:secret@db:5432/x") == "postgresql://***@db:5432/x"
    assert scrub("sqlite:////a/b.db") == "sqlite:////a/b.db"


def test_unreachable_store_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # The credentials move into MLflow's variables (of this process: undone after the test).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    with pytest.raises(TrackingError) as info:
        tracking.connect("http://alice:hunter2@127.0.0.1:9", "x")
    message = str(info.value)
    assert message.startswith("tracking store http://127.0.0.1:9 unreachable")
    assert "hunter2" not in message and "\n" not in message


def test_store_and_experiment_created_once_in_parallel(tmp_path: Path) -> None:
    # Several processes opening a fresh store at once: the file lock serialises creation.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("import sys; from deep_repro import tracking; "
            "c, e = tracking.connect(sys.argv[1], 'race'); print(e)")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1


def test_pipeline_run_is_shared_within_an_invocation_only(
        make_cfg: Make, tracking_env: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    cfg = make_cfg()
    client, exp_id = tracking.connect(tracking_env, cfg.tracking.experiment)
    tags = tracking.environment_tags(cfg)
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "host:1:1.0")
    first = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, cfg, tags)
    again = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, cfg, tags)
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "host:2:1.0")
    other = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, cfg, tags)
    assert first == again != other
    params = client.get_run(first).data.params
    assert params["model.name"] == "cnn" and params["seed"] == "42"


def test_invocation_key_is_stable_in_a_process_and_ignores_mlflow_run_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEP_REPRO_INVOCATION", raising=False)
    assert tracking.invocation_key() == tracking.invocation_key()
    monkeypatch.setenv("MLFLOW_RUN_ID", "deadbeef")
    assert "deadbeef" not in tracking.invocation_key()
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "pinned")
    assert tracking.invocation_key() == "pinned"


def _version(client: object, name: str) -> str:
    from mlflow import MlflowClient

    assert isinstance(client, MlflowClient)
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
    return str(client.create_model_version(name, source="/tmp/model",
                                           run_id=run.info.run_id).version)


def test_champion_moves_only_for_better_validated_models(tracking_env: str) -> None:
    client, _ = tracking.connect(tracking_env, "gate")
    name = "gate-model"
    client.create_registered_model(name)
    steps = [(0.80, "rejected", None), (0.90, "validated", "2"), (0.88, "validated", "2"),
             (0.93, "validated", "4")]
    for accuracy, status, champion in steps:
        version = _version(client, name)
        decision = tracking.validation_gate(client, name, version, accuracy, baseline=0.842)
        tags = client.get_model_version(name, version).tags
        assert tags["validation_status"] == status
        assert tags["validation_reason"] == decision.reason
        if champion is None:
            with pytest.raises(MlflowException, match="champion"):  # no alias yet
                client.get_model_version_by_alias(name, "champion")
        else:
            assert str(client.get_model_version_by_alias(name, "champion").version) == champion
    # Re-evaluating the champion itself keeps it.
    decision = tracking.validation_gate(client, name, "4", 0.93, baseline=0.842)
    assert decision.validated and not decision.promoted


@pytest.mark.slow
def test_stage_runs_and_leaderboard_against_a_shared_mlflow_server(
        make_cfg: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class shares one `mlflow server`: stages log over HTTP, the leaderboard reads it back."""
    import socket
    import time
    import urllib.request

    from deep_repro import cli

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "dvc.yaml").write_text("stages: {}\n")
        cfg = make_cfg()
        for i, accuracy in enumerate((0.91, 0.93)):
            monkeypatch.setenv("DEEP_REPRO_INVOCATION", f"student-{i}")
            with tracking.stage_run("evaluate", cfg) as run:
                run.log_metrics({"test_accuracy": accuracy}, pipeline=True)
        client, exp_id = tracking.connect(uri, cfg.tracking.experiment)
        rows = cli.leaderboard_rows(client, exp_id, limit=10)
        assert [r["test_acc"] for r in rows] == ["0.9300", "0.9100"]
        assert all(r["model"] == "cnn" for r in rows)
    finally:
        server.terminate()
        server.wait(timeout=30)
