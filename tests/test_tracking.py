"""The tracking module against a real MLflow sqlite store: store safety, redaction, the parent
run of an invocation, and the model validation gate."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from deep_repro import config, tracking
from deep_repro.errors import TrackingError, ValidationError, scrub
from deep_repro.paths import store_root
from tests.helpers import evidence

Make = Callable[..., config.Config]


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("http://server:5000") == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking.tracking_uri("http://server:5000") == "sqlite:////elsewhere.db"


def test_store_root_escapes_a_queued_experiments_temp_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
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
    code = (
        "import sys; from deep_repro import tracking; "
        "c, e = tracking.connect(sys.argv[1], 'race'); print(e)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1


def test_pipeline_run_is_shared_within_an_invocation_only(
    make_cfg: Make, tracking_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEEP_REPRO_INVOCATION", raising=False)
    assert tracking.invocation_key() == tracking.invocation_key()
    monkeypatch.setenv("MLFLOW_RUN_ID", "deadbeef")
    assert "deadbeef" not in tracking.invocation_key()
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "pinned")
    assert tracking.invocation_key() == "pinned"


def _version(client: Any, name: str) -> str:
    # `connect` hands out the outage-tolerant proxy (tracking.spool.ResilientClient).
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
    return str(
        client.create_model_version(name, source="/tmp/model", run_id=run.info.run_id).version
    )


def test_champion_moves_only_for_significantly_better_validated_models(tracking_env: str) -> None:
    client, _ = tracking.connect(tracking_env, "gate")
    name = "gate-model"
    client.create_registered_model(name)
    # (validation accuracy, disagreement offset) -> status, champion after, gate outcome
    steps = [
        ((0.80, 0), "rejected", None, "rejected"),  # below the baseline
        ((0.90, 0), "validated", "2", "first"),  # no champion yet: beating the baseline is enough
        ((0.88, 0), "validated", "2", "kept"),  # worse
        # 0.905 vs 0.900 disagreeing on ~95 images both ways: McNemar p ~ 0.7, noise
        ((0.905, 50), "validated", "2", "kept"),
        ((0.93, 0), "validated", "5", "promoted"),  # right on 30 more images, wrong on none
    ]
    for (accuracy, offset), status, champion, outcome in steps:
        version = _version(client, name)
        decision = tracking.validation_gate(
            client, name, version, evidence(accuracy, offset=offset), 0.842, 0.05
        )
        assert decision.outcome == outcome, decision.reason
        tags = client.get_model_version(name, version).tags
        assert tags["validation_status"] == status
        assert tags["validation_reason"] == decision.reason
        assert tags["val_accuracy"] == f"{accuracy:.6f}"
        # Regression (issue 20 §7): the README promised these as version tags; they were not.
        assert tags["gate_decision"] == outcome
        assert ("gate_p_value" in tags) == (decision.p_value is not None)
        if decision.p_value is not None:
            assert float(tags["gate_p_value"]) == pytest.approx(decision.p_value, rel=1e-5)
            assert float(tags["gate_champion_val_accuracy"]) == pytest.approx(0.90)
        if champion is None:
            with pytest.raises(MlflowException, match="champion"):  # no alias yet
                client.get_model_version_by_alias(name, "champion")
        else:
            assert str(client.get_model_version_by_alias(name, "champion").version) == champion
        if outcome in ("kept", "promoted"):  # the decision names both accuracies and the p-value
            assert decision.champion_accuracy == pytest.approx(0.90)
            assert decision.p_value is not None and "McNemar p = " in decision.reason
            assert decision.p_value < 0.05 if outcome == "promoted" else True
    assert (
        "not better beyond noise (McNemar p = 0.6"
        in client.get_model_version(name, "4").tags["validation_reason"]
    )
    # Re-evaluating the champion itself keeps it.
    decision = tracking.validation_gate(client, name, "5", evidence(0.93), 0.842, 0.05)
    assert decision.validated and not decision.promoted and decision.outcome == "champion"
    # Validated on other images (another data.subset): never paired, never promoted.
    version = _version(client, name)
    decision = tracking.validation_gate(
        client, name, version, evidence(0.99, images="other"), 0.842, 0.05
    )
    assert decision.outcome == "incomparable" and "not comparable" in decision.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "5"


def test_predictions_file_round_trips_and_refuses_anything_else() -> None:
    import numpy as np

    from deep_repro import evaluation
    from deep_repro.evaluation import predictions as pf

    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 10, 6000), rng.integers(0, 10, 6000)
    original = evaluation.Predictions(
        {"val": evaluation.split_predictions("digest", labels, predicted)}
    )
    data = original.to_bytes()
    assert len(data) < 13_000  # one digit per image and per label
    assert original.to_bytes() == data and original.sha256() == pf.from_bytes(data, "x").sha256()
    back = pf.from_bytes(data, "x").splits["val"]
    assert np.array_equal(back.labels, labels) and np.array_equal(back.predicted, predicted)
    assert back.accuracy == float(np.mean(labels == predicted))
    body = json.loads(data)
    for broken, why in [
        (b"\x80not json", "invalid JSON"),
        (json.dumps({**body, "format": "other"}).encode(), "expected format"),
        (data.replace(b'"n": 6000', b'"n": 5999'), "expected labels as 5999 class digits"),
        (data.replace(b'"predicted": "', b'"predicted": "x', 1), "expected predicted as 6000"),
        (b" " * (pf.MAX_BYTES + 1), "expected at most"),
    ]:
        with pytest.raises(ValidationError, match=f"^v7: not a predictions file .*{why}"):
            pf.from_bytes(broken, "v7")


def test_the_gate_recomputes_evidence_and_leaves_out_a_tampered_file(tracking_env: str) -> None:
    """The gate stores each version's predictions with its run (sha256 in a tag) and recomputes
    which images it got right from them; a file replaced afterwards, or whose labels contradict
    the validation images digest, takes no part in the election (issue 21 item 5)."""
    from mlflow.artifacts import download_artifacts

    from deep_repro.tracking import gate

    client, _ = tracking.connect(tracking_env, "gate")
    name = "evidence-model"
    client.create_registered_model(name)
    first = _version(client, name)
    tracking.validation_gate(client, name, first, evidence(0.90), 0.5, 0.05)
    tags = client.get_model_version(name, first).tags
    assert "val_correct" not in tags  # no per-image bits in a tag any more
    run_id = client.get_model_version(name, first).run_id
    sha = tags["predictions_sha256"]
    assert tags["predictions"] == f"runs:/{run_id}/evidence/predictions-{sha}.json"
    local = Path(download_artifacts(tags["predictions"], tracking_uri=tracking_env))
    assert hashlib.sha256(local.read_bytes()).hexdigest() == tags["predictions_sha256"]
    assert local.read_bytes() == evidence(0.90).to_bytes()
    # Tamper with the champion's file after the fact: a later gate leaves v1 out and the
    # newcomer, unpaired, becomes champion on its own (instead of being compared to a lie).
    gate._LOADED.clear()
    forged = evidence(0.99)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"predictions-{sha}.json"
        path.write_bytes(forged.to_bytes())
        client.log_artifact(run_id, str(path), "evidence")
    second = _version(client, name)
    decision = tracking.validation_gate(client, name, second, evidence(0.91), 0.5, 0.05)
    assert decision.outcome == "first", decision.reason
    # Labels that contradict the images digest the gate knows: left out as well.
    gate._LOADED.clear()
    third = _version(client, name)
    lying = evidence(0.95)
    val = lying.splits["val"]
    lying.splits["val"] = type(val)(val.images, (val.labels + 1) % 10, (val.predicted + 1) % 10)
    tracking.validation_gate(client, name, third, lying, 0.5, 0.05)
    fourth = _version(client, name)
    decision = tracking.validation_gate(client, name, fourth, evidence(0.93), 0.5, 0.05)
    assert decision.champion_accuracy == pytest.approx(0.91), decision.reason


@pytest.mark.slow
def test_stage_runs_and_leaderboard_against_a_shared_mlflow_server(
    make_cfg: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class shares one `mlflow server`: stages log over HTTP, the leaderboard reads it back."""
    import socket
    import time
    import urllib.request

    from deep_repro import cli

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
        for i, (val, test) in enumerate(((0.91, 0.95), (0.93, 0.90))):
            monkeypatch.setenv("DEEP_REPRO_INVOCATION", f"student-{i}")
            with tracking.stage_run("evaluate", cfg) as run:
                run.log_metrics({"val_accuracy": val, "test_accuracy": test}, pipeline=True)
        client, exp_id = tracking.connect(uri, cfg.tracking.experiment)
        rows = cli.leaderboard_rows(client, exp_id, limit=10)
        # Ranked by validation accuracy; the higher test accuracy does not move a row up.
        assert [r["val_acc (ranks)"] for r in rows] == ["0.9300", "0.9100"]
        assert [r["test_acc"] for r in rows] == ["0.9000", "0.9500"]
        assert all(r["model"] == "cnn" for r in rows)
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------ what the MLflow UI shows
def _stage_project(root: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """A bare project root (dvc.yaml + params.yaml) to run stage code in-process."""
    import yaml

    from .helpers import REPO, fixture_overrides

    monkeypatch.chdir(root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    composed = config.compose([*fixture_overrides(), *overrides], REPO / "conf")
    (root / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))


def test_train_stage_logs_one_val_accuracy_point_per_epoch(
    tracking_env: str, splits: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The per-epoch curve has exactly epochs points (no step-0 point from the best value);
    the runs carry MLflow's source tags and only the params they used."""
    import runpy

    from mlflow import MlflowClient

    from deep_repro import data
    from deep_repro.pipeline import SPLIT_TRAIN_VAL

    from .helpers import REPO

    _stage_project(tmp_path, monkeypatch, "model=mlp", "train.epochs=2")
    data.save_arrays(
        tmp_path / SPLIT_TRAIN_VAL,
        x_train=splits.x_train,
        y_train=splits.y_train,
        x_val=splits.x_val,
        y_val=splits.y_val,
    )
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "host:train:1.0")
    for name in ("DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    runpy.run_path(str(REPO / "stages/train.py"), run_name="stage")["main"]()

    client = MlflowClient(tracking_uri=tracking_env)
    exp = client.get_experiment_by_name("fashion-mnist")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    [stage] = client.search_runs([exp.experiment_id], "tags.`deep_repro.kind` = 'stage'")
    [pipeline] = client.search_runs([exp.experiment_id], "tags.`deep_repro.kind` = 'pipeline'")
    history = client.get_metric_history(stage.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    best = stage.data.metrics["best_val_accuracy"]
    assert best == max(m.value for m in history)
    # The pipeline's val_accuracy comes from evaluate (not run here), never from train.
    assert "val_accuracy" not in pipeline.data.metrics
    for run, source in ((stage, "stages/train.py"), (pipeline, "stages/train.py")):
        tags = run.data.tags
        assert tags["mlflow.source.name"] == source and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] and tags["mlflow.user"]
    assert stage.data.params["optimizer.name"] == "adamw"  # an mlp uses it
    assert not any(k.startswith("tune.") for k in pipeline.data.params)
    assert pipeline.data.params["train.epochs"] == "2"


def test_pipeline_source_names_the_dvc_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from deep_repro.tracking.provenance import pipeline_source

    for name in ("DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert pipeline_source("stages/split.py") == "stages/split.py"  # run by hand
    monkeypatch.setenv("DVC_STAGE", "split")
    assert pipeline_source("stages/split.py") == "dvc repro"
    monkeypatch.setenv("DVC_EXP_NAME", "c-half")
    assert pipeline_source("stages/split.py") == "dvc exp run"


def test_logreg_runs_log_only_the_params_its_trainer_reads(make_cfg: Make, splits: Any) -> None:
    """A logreg pipeline run logs no optimizer/scheduler/augment/epochs and no tune.*; and
    training it through a view that allows ONLY the logged keys works (it reads nothing else)."""
    from deep_repro import training
    from deep_repro.config.schema import flatten, to_dict
    from deep_repro.config.stage_view import StageConfig
    from deep_repro.tracking.provenance import pipeline_params, used_params

    cfg = make_cfg("model=logreg", "model.max_iter=20")
    logged = pipeline_params(cfg)
    assert "model.C" in logged and "seed" in logged and "train.num_threads" in logged
    assert not [
        k
        for k in logged
        if k.startswith(("optimizer.", "scheduler.", "augment.", "tune.", "train.epochs"))
    ]
    # Declare whole sections where every key is logged (the trainer gets the typed object).
    full = flatten(to_dict(cfg))
    sections = {k.split(".")[0] for k in full}
    declared = [s for s in sections if all(k in logged for k in full if k.split(".")[0] == s)]
    declared += [k for k in logged if k.split(".")[0] not in declared]
    view = typing.cast(config.Config, StageConfig("logreg", cfg, tuple(declared)))
    result = training.train_model(view, splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    assert result.best_epoch == 1
    # A torch model keeps them all (tune.* only on trial runs, never on pipeline runs).
    torch_cfg = make_cfg("model=mlp")
    assert used_params(torch_cfg) == flatten(to_dict(torch_cfg))
    assert set(pipeline_params(torch_cfg)) == {
        k for k in used_params(torch_cfg) if not k.startswith("tune.")
    }


def test_connect_marks_existing_experiments_as_model_training(tracking_env: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_env).create_experiment("older")
    client, exp_id = tracking.connect(tracking_env, "older")
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.deep-repro"])  # the runs-table view
    assert "metrics.`test_accuracy`" in view["selectedColumns"]
    # A kind someone chose in the UI is left alone.
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")
    tracking.connect(tracking_env, "older")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"


def test_a_failed_stage_says_why_on_its_runs(
    make_cfg: Make, tracking_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The FAILED runs of a failed download show the reason in the UI (the run description)."""
    from mlflow import MlflowClient

    from deep_repro.errors import DataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "host:failed:1.0")
    cfg = make_cfg()
    with pytest.raises(DataError), tracking.stage_run("download", cfg):
        raise DataError("train-images-idx3-ubyte: no mirror worked (https://***@m/x: 404)")
    client = MlflowClient(tracking_uri=tracking_env)
    exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = client.search_runs([exp_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2
    for run in runs:
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith("**FAILED** in stage `download`: DataError: train-images-idx3")
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
    [pipeline] = [r for r in runs if r.data.tags["deep_repro.kind"] == "pipeline"]
    assert "Reproduce:" in pipeline.data.tags["mlflow.note.content"]


@pytest.mark.parametrize(
    ("model", "trainer_keys"),
    [("mlp", {"optimizer.name", "train.epochs", "augment.name"}), ("logreg", set())],
)
def test_a_pipeline_run_opened_by_a_data_stage_gets_its_trainer_keys_from_the_train_stage(
    make_cfg: Make, tracking_env: str, model: str, trainer_keys: set[str]
) -> None:
    """Issue 21: a data stage checks no model (no model code), so it cannot know which keys the
    trainer reads; it logs the keys every trainer reads, and the first stage that checked the
    model adds its trainer's keys to the same pipeline run (a logreg still gets no optimizer)."""
    from deep_repro.config.schema import to_dict, validate

    cfg = make_cfg(f"model={model}")
    data_cfg = validate(to_dict(cfg), model=False)
    assert isinstance(data_cfg.model, config.Unchecked) and data_cfg.model.name == model
    client, exp_id = tracking.connect(tracking_env, cfg.tracking.experiment)
    opened = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, data_cfg, {}, "k")
    first = set(client.get_run(opened).data.params)
    assert "model.name" in first and "data.subset" in first
    assert not first & {"optimizer.name", "train.epochs", "augment.name"}
    joined = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, cfg, {}, "k")
    assert joined == opened
    params = client.get_run(opened).data.params
    added = set(params) - first
    assert trainer_keys <= added if trainer_keys else not added
    assert params == {k: str(v) for k, v in pipeline_params_as_logged(cfg).items()}


def pipeline_params_as_logged(cfg: Any) -> dict[str, Any]:
    import json

    from deep_repro.tracking.provenance import pipeline_params

    return {
        k: json.dumps(v) if isinstance(v, list | dict) else v
        for k, v in pipeline_params(cfg).items()
    }


class _RacingAliasClient:
    """A real client whose first `set_registered_model_alias` loses a race: another gate sets
    the alias first (`other`; None: nobody does) and the server answers with the unique-key
    violation MLflow's non-atomic alias upsert gives two concurrent creators."""

    def __init__(self, client: Any, other: str | None) -> None:
        self._client, self._other, self.raced = client, other, False

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if not self.raced:
            self.raced = True
            if self._other is not None:
                self._client.set_registered_model_alias(name, alias, self._other)
            raise MlflowException("duplicate key value violates unique constraint")
        self._client.set_registered_model_alias(name, alias, version)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_gate_that_loses_the_race_to_create_the_alias_elects_again(tracking_env: str) -> None:
    """Regression (CI, 5 concurrent gates on PostgreSQL): two gates creating @champion at once
    made one of them fail with the server's unique-key violation; it now reads the alias the
    winner wrote and elects again. A failure no other gate explains is still raised."""
    client, _ = tracking.connect(tracking_env, "gate")
    name = "race-model"
    client.create_registered_model(name)
    first = _version(client, name)
    racing = _RacingAliasClient(client, other=first)
    decision = tracking.validation_gate(racing, name, first, evidence(0.90), 0.5, 0.05)
    assert racing.raced and decision.outcome == "first", decision.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    second = _version(client, name)
    racing = _RacingAliasClient(client, other=None)
    with pytest.raises(MlflowException, match="duplicate key"):
        tracking.validation_gate(racing, name, second, evidence(0.95), 0.5, 0.05)
