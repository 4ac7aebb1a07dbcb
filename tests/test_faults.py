"""Faults, end to end with real git, DVC and MLflow: passwords never leak, a bad config never
deletes outputs, runs of killed processes do not stay RUNNING, and failed runs say why."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from deep_repro import config, tracking
from deep_repro.errors import ConfigError
from deep_repro.pipeline import STAGES

from .helpers import VENV_BIN, copy_project, make_project, project_env, run
from .test_pipeline import client_for, dvc, runs_of

# Joined at run time: the test projects copy this file into their git history.
SECRET = "-".join(("s3cr3t", "pw"))

# A small MLP (so `-S model.lr=...` works as on the real default) trained for 2 epochs; conf/
# itself is edited because `dvc exp run` recomposes params.yaml from it.
PROJECT_EDITS = {
    "conf/config.yaml": [
        ("  - model: cnn", "  - model: mlp"),
        ("  epochs: 15\n  batch_size: 256", "  epochs: 2\n  batch_size: 64"),
        ("n_trials: 20", "n_trials: 3"),
    ],
    "conf/model/mlp.yaml": [("hidden_sizes: [512, 256]", "hidden_sizes: [32]")],
}


@pytest.fixture(scope="module")
def split_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after a successful `dvc repro split` (validate, download, preprocess, split:
    no training, so it is cheap) and its MLflow store (do not modify: tests use `project`)."""
    project = make_project(tmp_path_factory.mktemp("faults") / "project", edits=PROJECT_EDITS)
    dvc(project, "repro", "split")
    return project


@pytest.fixture
def project(split_state: Path, tmp_path: Path) -> Path:
    return copy_project(split_state, tmp_path / "project")


def outputs(root: Path) -> dict[str, bytes]:
    """The bytes of every pipeline output (and dvc.lock)."""
    paths = [out for spec in STAGES.values() for out in spec.outs] + ["dvc.lock"]
    return {p: (root / p).read_bytes() for p in paths if (root / p).exists()}


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def git_text(root: Path) -> str:
    """Every ref and every committed change reachable from any ref (DVC experiments included)."""
    env = project_env(root)
    refs = run(["git", "for-each-ref"], root, env).stdout
    history = run(["git", "log", "--all", "-p", "--no-color"], root, env).stdout
    return refs + history


def store_bytes(*paths: Path) -> bytes:
    """Raw bytes of MLflow stores (sqlite files, artifact folders)."""
    blob = b""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        blob += b"".join(p.read_bytes() for p in files)
    return blob


# --------------------------------------------------------------------------- 1. passwords
@pytest.mark.parametrize(
    ("override", "where"),
    [
        (f"tracking.uri=http://user:{SECRET}@mlflow.example:5000", "MLFLOW_TRACKING_PASSWORD"),
        (f"tune.storage=postgresql://user:{SECRET}@db.example/optuna", "PGPASSWORD"),
        (f"tune.storage='postgresql://user@db.example/optuna?password={SECRET}'", "PGPASSWORD"),
    ],
)
def test_schema_rejects_a_password_in_a_uri(
    make_cfg: Callable[..., config.Config], override: str, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_cfg(override)
    message = str(err.value)
    assert "\n" not in message and SECRET not in message
    assert message.startswith(f"config error: {override.split('=')[0]} = '")
    assert "expected a URL without credentials" in message
    assert where in message


@pytest.mark.parametrize(
    "uri", ["garbage", "http://", "ftp://host/x", "sqlite://", "http://host:port"]
)
def test_schema_rejects_an_unusable_tracking_uri(
    make_cfg: Callable[..., config.Config], uri: str
) -> None:
    with pytest.raises(ConfigError, match=r"^config error: tracking\.uri = "):
        make_cfg(f"tracking.uri={uri}")


def test_schema_accepts_usable_tracking_uris(make_cfg: Callable[..., config.Config]) -> None:
    for uri in (
        "http://host:5000",
        "sqlite:////tmp/m.db",
        "postgresql+psycopg2://mlflow@db/mlflow",
        "file:///tmp/mlruns",
        "databricks",
    ):
        assert make_cfg(f"tracking.uri='{uri}'").tracking.uri == uri


def test_schema_rejects_an_infinite_learning_rate(make_cfg: Callable[..., config.Config]) -> None:
    with pytest.raises(ConfigError, match=r"^config error: model\.lr = inf: expected a finite"):
        make_cfg("model.lr=inf")


def test_credentials_in_the_environment_uri_move_to_mlflow_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://ana:{SECRET}@mlflow.example/x")
    assert tracking.tracking_uri(None) == "https://mlflow.example/x"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ana"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    # Values already set win; a PostgreSQL backend's password goes where libpq reads it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:other@host")
    assert tracking.tracking_uri(None) == "http://host"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert tracking.credentials_to_env(f"postgresql://ml:{SECRET}@db/ml") == "postgresql://ml@db/ml"
    assert os.environ["PGPASSWORD"] == SECRET


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, no auth: it ignores credentials)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / "server"
    home.mkdir()
    env = project_env(home)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300  # slow to start on a loaded machine
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", home
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()  # uvicorn/gunicorn workers, by pid
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def test_a_password_in_the_tracking_uri_never_leaks(
    project: Path, mlflow_server: tuple[str, Path]
) -> None:
    address, server_home = mlflow_server
    env = project_env(project) | {"MLFLOW_TRACKING_URI": f"http://ana:{SECRET}@{address}"}
    proc = run(["dvc", "repro", "-f", "-s", "split"], project, env)
    shown = proc.stdout + proc.stderr
    assert f"View run split at: http://{address}/" in shown  # MLflow's own console line
    assert SECRET not in shown
    client = MlflowClient(tracking_uri=f"http://{address}")
    exp = client.get_experiment_by_name("fashion-mnist")
    assert exp is not None
    found = client.search_runs([exp.experiment_id])
    assert {r.data.tags.get(tracking.TAG_STAGE) for r in found} == {None, "split"}
    assert SECRET.encode() not in store_bytes(server_home / "mlflow.db", server_home / "artifacts")
    assert SECRET not in json.dumps([(r.data.params, r.data.tags) for r in found])
    assert SECRET not in git_text(project)
    assert SECRET not in (project / "params.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"tracking.uri=http://ana:{SECRET}@127.0.0.1:9", "tracking.uri"),
        (f"data.mirrors=[http://u:{SECRET}@127.0.0.1:9/fmnist]", "data.mirrors[0]"),
    ],
)
def test_a_password_given_with_dash_s_is_rejected_and_stored_nowhere(
    project: Path, override: str, key: str
) -> None:
    before = outputs(project)
    params = (project / "params.yaml").read_bytes()
    proc = dvc(project, "exp", "run", "-S", override, check=False)
    assert proc.returncode != 0
    # DVC wrote the override into params.yaml before validate ran; validate put back the
    # committed file, so the next `git commit -a` cannot take the password along.
    assert (project / "params.yaml").read_bytes() == params
    assert [line.split(" = ")[0] for line in error_lines(proc)] == [f"error: config error: {key}"]
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in git_text(project)  # no experiment ref records that params.yaml
    assert SECRET.encode() not in store_bytes(project / "mlflow.db")
    assert outputs(project) == before


# --------------------------------------------------------------------------- 2. bad configs
@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("model.lr=-0.1", "error: config error: model.lr = -0.1: expected a value > 0"),
        ("split.val_size=1.5", "error: config error: split.val_size = 1.5: expected a value < 1.0"),
        (
            "data.sha256.train-images-idx3-ubyte=abc",
            "error: config error: data.sha256.train-images-idx3-ubyte = 'abc': expected 64 "
            "lowercase hex digits",
        ),
        (
            "tracking.uri=garbage",
            "error: config error: tracking.uri = 'garbage': expected a "
            "tracking URI with a scheme among",
        ),
        # Values that passed validate and then cost the split or the checkpoint: refused by
        # validate (deep_repro.preflight), which knows the data on disk (2,000 images).
        ("seed=-1", "error: config error: seed = -1: expected a value >= 0"),
        (
            "data.subset=1000000",
            "error: config error: data.subset = 1000000: expected at most 2000",
        ),
        (
            "split.val_size=0.0001",
            "error: config error: split.val_size = 0.0001: expected a fraction that leaves every "
            "class at least 10 validation images",
        ),
    ],
)
def test_a_bad_config_fails_in_one_line_and_keeps_every_output(
    project: Path, override: str, error: str
) -> None:
    before = outputs(project)
    assert {
        "reports/validate.json",
        "data/raw/train-images-idx3-ubyte.gz",
        "data/split/train_val.npz",
    } <= set(before)
    proc = dvc(project, "exp", "run", "-S", override, check=False)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1 and errors[0].startswith(error), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert outputs(project) == before


def test_validate_output_is_constant_so_a_param_change_reruns_only_its_readers(
    project: Path,
) -> None:
    assert json.loads((project / "reports/validate.json").read_text()) == {"config": "valid"}
    client, exp_id = client_for(project)
    before = len(client.search_runs([exp_id]))
    lock = (project / "dvc.lock").read_bytes()
    # Nothing changed: validate runs all the same (`always_changed`: memory, CUDA, the data on
    # disk and the tracking host can change with no param), and nothing after it reruns.
    out = dvc(project, "repro", "split").stdout
    assert {name for name in STAGES if f"Running stage '{name}'" in out} == {"validate"}, out
    assert (project / "dvc.lock").read_bytes() == lock
    # tune.n_trials is read by no stage: only validate reruns (and records no MLflow run).
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["n_trials"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", "split").stdout
    ran = {name for name in STAGES if f"Running stage '{name}'" in out}
    assert ran == {"validate"}, out
    assert len(client.search_runs([exp_id])) == before
    # split.val_size is read by split: validate and split rerun, nothing upstream.
    params["split"]["val_size"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", "split").stdout
    assert {name for name in STAGES if f"Running stage '{name}'" in out} == {"validate", "split"}


# --------------------------------------------------------------------------- 3. orphan runs
def _running(client: MlflowClient, exp_id: str) -> list[Any]:
    return client.search_runs([exp_id], "attributes.status = 'RUNNING'")


def test_a_killed_stage_leaves_no_run_running(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=500, patience=0)  # long enough to be killed mid-training
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    client, exp_id = client_for(project)
    env = project_env(project)
    dvc_proc = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", "train"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not [
            r for r in _running(client, exp_id) if r.data.tags.get(tracking.TAG_STAGE) == "train"
        ]:
            assert dvc_proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        # DVC starts the stage through a shell; depending on the shell (bash execs a lone
        # command, some dash versions fork) the stage is the shell itself or its child, so
        # take the innermost process whose command line names the stage script.
        matches = [
            p
            for p in psutil.Process(dvc_proc.pid).children(recursive=True)
            if "stages/train.py" in " ".join(p.cmdline())
        ]
        stage = next(p for p in matches if not set(p.children(recursive=True)) & set(matches))
        os.kill(stage.pid, signal.SIGKILL)
        assert dvc_proc.wait(timeout=120) != 0
    finally:
        if dvc_proc.poll() is None:
            dvc_proc.kill()
    orphans = _running(client, exp_id)
    assert {r.data.tags[tracking.TAG_KIND] for r in orphans} == {"pipeline", "stage"}
    stage_run = next(r for r in orphans if r.data.tags[tracking.TAG_KIND] == "stage")
    assert stage_run.data.tags[tracking.TAG_OWNER_PID] == str(stage.pid)
    pipeline_run = next(r for r in orphans if r.data.tags[tracking.TAG_KIND] == "pipeline")
    assert pipeline_run.data.tags[tracking.TAG_OWNER_PID] == str(dvc_proc.pid)
    # The next stage run (here: a stage started by hand) sweeps them.
    run([sys.executable, "stages/split.py"], project, env)
    assert not _running(client, exp_id)
    for orphan in orphans:
        swept = client.get_run(orphan.info.run_id)
        assert swept.info.status == "FAILED"
        assert swept.data.tags[tracking.TAG_FAIL_REASON].startswith(
            f"orphaned: its process (pid {orphan.data.tags[tracking.TAG_OWNER_PID]} on "
        )


def test_lineage_and_leaderboard_fail_runs_of_dead_owners_only(project: Path) -> None:
    client, exp_id = client_for(project)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    host = socket.gethostname()
    me = tracking.owner()
    owners = {
        "dead": {"host": host, "pid": dead.pid, "started": started},
        "reused-pid": {**me, "started": me["started"] - 1000},  # same pid, another process
        "alive": me,
        "other-host": {"host": "elsewhere", "pid": dead.pid, "started": started},
    }
    ids = {}
    for name, who in owners.items():
        ids[name] = client.create_run(
            exp_id,
            run_name=name,
            tags={tracking.TAG_KIND: "stage", **tracking.faults.owner_tags(who)},
        ).info.run_id
    run(["deep-repro", "leaderboard"], project, project_env(project))
    status = {name: client.get_run(rid).info.status for name, rid in ids.items()}
    assert status == {
        "dead": "FAILED",
        "reused-pid": "FAILED",
        "alive": "RUNNING",
        "other-host": "RUNNING",
    }
    for name in ("alive", "other-host"):
        client.set_terminated(ids[name])


# --------------------------------------------------------------------------- 4. fail reasons
def test_a_failed_stage_run_says_why(project: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["mirrors"] = [(tmp_path / "no-mirror-here").as_uri()]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(project, "repro", "-f", "-s", "download", check=False)
    assert proc.returncode != 0
    (error,) = error_lines(proc)
    client, exp_id = client_for(project)
    pipeline = runs_of(client, exp_id, "pipeline")[-1]
    (stage,) = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")
    reason = error.removeprefix("error: ")
    assert reason.startswith("could not get train-images-idx3-ubyte.gz from any of data.mirrors")
    for failed in (stage, client.get_run(pipeline.info.run_id)):
        assert failed.info.status == "FAILED"
        assert failed.data.tags[tracking.TAG_FAIL_REASON] == reason
    log_file = Path(client.download_artifacts(stage.info.run_id, "logs/stage.log", str(tmp_path)))
    lines = log_file.read_text().splitlines()
    assert lines[-1] == error and len(lines) <= 201
    assert any("MLflow: stage run" in line for line in lines)  # the stage's own log lines


_STOPPABLE = """
import sys, time
from deep_repro.errors import entrypoint

@entrypoint
def main():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:  # the clean-up a stage does: close its runs KILLED
        time.sleep(float(sys.argv[1]))
        print("closed", flush=True)
        raise

main()
"""


@pytest.mark.parametrize(
    ("gap_s", "cleanup_s", "closed"),
    [(0.2, 1.0, True), (3.0, 6.0, False)],
    ids=["the same stop twice (scancel + the task passing it on)", "a second stop later"],
)
def test_a_sigterm_delivered_twice_still_lets_the_runs_close(
    tmp_path: Path, gap_s: float, cleanup_s: float, closed: bool
) -> None:
    """SLURM's scancel signals every process of a job and the cluster task passes the stop on
    to its stages: the copy that arrives at once is ignored (the clean-up closes the runs); a
    SIGTERM that comes later still kills at once, as before."""
    script = tmp_path / "stoppable.py"
    script.write_text(_STOPPABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cleanup_s)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap_s)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert ("closed" in out) is closed
    assert proc.returncode == (143 if closed else -signal.SIGTERM)


def test_a_stop_outside_the_stage_body_still_says_why(tracking_env: str) -> None:
    """Regression (CI, cluster test): a SIGTERM that lands after the stage body (while the
    finished stage logs its outputs) closed the stage and pipeline runs without a reason."""
    from mlflow import MlflowClient

    from deep_repro.errors import Terminated

    client: Any = MlflowClient(tracking_uri=tracking_env)
    exp = client.create_experiment("stop")
    parent = client.create_run(exp).info.run_id
    stage = client.create_run(exp).info.run_id
    with pytest.raises(Terminated), tracking.closing(client, stage, parent_id=parent) as outcome:
        outcome.status = "RUNNING"  # the body is done; the close-out work is interrupted
        raise Terminated()
    for rid, status in ((stage, "KILLED"), (parent, "FAILED")):
        run = client.get_run(rid)
        assert run.info.status == status
        assert "SIGTERM" in run.data.tags[tracking.TAG_FAIL_REASON]
