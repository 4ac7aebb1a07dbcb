"""Class mode across machines: shared Optuna studies on the documented `postgresql://` URL and
the shared MLflow server from `scripts/services.sh` (tests marked `services`).

Two "machines" are two project copies (two store roots, so no file lock can be shared) whose
worker processes meet only in PostgreSQL and the MLflow server, as real machines would.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import optuna
import pytest

from deep_repro import data, tracking, tuning
from deep_repro.pipeline import STAGES
from deep_repro.tuning import storage
from tests.helpers import Services, make_project, project_env
from tests.test_tuning import BASE, tuning_project

Login = Callable[[str, str], None]
WAIT_S = 600  # every wait on a subprocess is bounded
# The stages that record an MLflow stage run (`validate` records none).
TRACKED = {name for name, spec in STAGES.items() if spec.tracked}


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{random.randrange(1 << 30):x}"


def _client(services: Services) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=services.mlflow_url, registry_uri=services.mlflow_url)


def _pg(services: Services) -> tuple[str, str]:
    """The documented `tune.storage` form (no password: config refuses one) and the password,
    which workers get from PGPASSWORD as the README says."""
    parts = urlsplit(services.pg_url)
    assert parts.password and parts.username
    netloc = f"{parts.username}@{parts.netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


def _student(prefix: str, services: Services) -> tuple[str, str]:
    """A new MLflow account (created by the admin, whose login `as_user` set)."""
    from mlflow.server import get_app_client

    name = _unique(prefix)
    password = f"{prefix}-secret-{random.randrange(1 << 40):x}"
    get_app_client("basic-auth", tracking_uri=services.mlflow_url).create_user(name, password)
    return name, password


def _env(services: Services, login: tuple[str, str], pg_password: str) -> dict[str, str]:
    """A worker's environment: its own login, nothing of this process's services settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DEEP_REPRO_", "DVC_", "PG"))
    }
    env["MLFLOW_TRACKING_URI"] = services.mlflow_url
    env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = login
    env["PGPASSWORD"] = pg_password
    return env


def _machine(root: Path, splits: data.Splits) -> Path:
    """A minimal tuning project (conf/ with the tiny MLP space, dvc.yaml, the split file)."""
    return tuning_project(root, splits)


class _Procs:
    """Processes started by a test, killed at its end whatever happened."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.started.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[str]) -> str:
        out = proc.communicate(timeout=WAIT_S)[0]
        assert proc.returncode == 0, out[-4000:]
        return out


@pytest.fixture
def procs() -> Iterator[_Procs]:
    started = _Procs()
    yield started
    for proc in started.started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def _tune(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "deep_repro.cli", "tune", *BASE, "tune.pruner=none", *extra]


def _runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def _kind(runs: list[Any], kind: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == kind]


# --------------------------------------------------------------------------- the gate
def test_postgresql_gate_is_a_database_lock_not_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the gate was a file lock under the store root, so two machines sharing a
    PostgreSQL study each held "the" lock and both created a study run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    gate = storage.study_gate("postgresql://alice@db.example.edu/optuna", "class-cnn")
    assert isinstance(gate, storage.AdvisoryGate) and not isinstance(gate, storage.FileGate)
    # The key names the study, not the spelling of the server (machines differ in that).
    other = storage.study_gate("postgresql+psycopg://bob@10.0.0.5:5432/optuna", "class-cnn")
    assert isinstance(other, storage.AdvisoryGate) and other.key == gate.key
    mlp = storage.study_gate("postgresql://alice@db/optuna", "class-mlp")
    assert isinstance(mlp, storage.AdvisoryGate) and mlp.key != gate.key
    assert -(1 << 63) <= gate.key < (1 << 63)
    assert not (tmp_path / "optuna").exists()  # nothing was locked on disk, nothing connected
    # sqlite (one machine) keeps the file lock.
    assert isinstance(storage.study_gate(f"sqlite:///{tmp_path}/o.db", "s"), storage.FileGate)


_HOLD = """
import sys
from deep_repro.tuning import storage
gate = storage.study_gate(sys.argv[1], sys.argv[2])
print("waiting", flush=True)
with gate:
    print("acquired", flush=True)
"""


@pytest.mark.services
def test_advisory_gate_excludes_a_worker_with_another_store_root(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: _Procs
) -> None:
    url, pg_password = _pg(services)
    monkeypatch.setenv("PGPASSWORD", pg_password)
    name = _unique("gate")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    held = storage.study_gate(url, name)
    held.acquire()
    env = {**os.environ, "PGPASSWORD": pg_password}
    other = procs.start([sys.executable, "-c", _HOLD, url, name], tmp_path / "b", env)
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "waiting"
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=3)  # blocked in pg_advisory_lock
    finally:
        held.release()
    assert procs.finish(other).split() == ["acquired"]
    held.release()  # a second release is a no-op, as the objective relies on
    with storage.study_gate(url, name):  # and the lock can be taken again
        pass


@pytest.mark.services
@pytest.mark.slow
def test_worker_waits_for_the_gate_held_on_another_machine(
    services: Services,
    as_user: Login,
    splits: data.Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    procs: _Procs,
) -> None:
    """Regression: a worker took a file lock under its own store root, so a study gate held on
    another machine did not stop it from creating the study run and its trials."""
    import threading

    login = _student("tuner", services)
    url, pg_password = _pg(services)
    study, experiment = _unique("class-mlp"), _unique("class-tune")
    cmd = _tune(
        [
            "tune.n_trials=1",
            "tune.epochs=1",
            f"tune.storage={url}",
            f"tune.study_name={study}",
            f"tracking.experiment={experiment}",
        ]
    )
    monkeypatch.setenv("PGPASSWORD", pg_password)
    monkeypatch.chdir(tmp_path)
    # Another machine's spelling of the same server: the lock is the study's, not the URL's.
    held = storage.study_gate(url.replace("127.0.0.1", "localhost"), study)
    held.acquire()
    try:
        env = _env(services, login, pg_password)
        worker = procs.start(cmd, _machine(tmp_path / "b", splits), env)
        lines: list[str] = []
        assert worker.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(worker.stdout or ()), daemon=True)
        reader.start()
        deadline = time.monotonic() + WAIT_S
        # Logged right before the worker takes the gate (after connecting to MLflow).
        while not any("no tracked run produced" in line for line in lines):
            assert worker.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        time.sleep(3)
        assert worker.poll() is None, "".join(lines)
        assert _kind(_runs(_client(services), experiment), "study") == []
    finally:
        held.release()
    assert worker.wait(timeout=WAIT_S) == 0, "".join(lines)
    reader.join(timeout=60)
    trials = optuna.load_study(study_name=study, storage=services.pg_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert len(_kind(_runs(_client(services), experiment), "study")) == 1


# --------------------------------------------------------------------------- shared studies
@pytest.mark.services
@pytest.mark.slow
def test_two_machines_share_one_study_run_and_budget(
    services: Services, as_user: Login, splits: data.Splits, tmp_path: Path, procs: _Procs
) -> None:
    login = _student("tuner", services)
    url, pg_password = _pg(services)
    study, experiment = _unique("class-mlp"), _unique("class-tune")
    cmd = _tune(
        [
            "tune.n_trials=4",
            f"tune.storage={url}",
            f"tune.study_name={study}",
            f"tracking.experiment={experiment}",
        ]
    )
    env = _env(services, login, pg_password)
    machines = [_machine(tmp_path / m, splits) for m in ("machine-a", "machine-b")]
    workers = [procs.start(cmd, m, env) for m in machines]  # at once
    outputs = [procs.finish(w) for w in workers]

    trials = optuna.load_study(study_name=study, storage=services.pg_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, outputs
    runs = _runs(_client(services), experiment)
    (study_run,) = _kind(runs, "study")
    trial_runs = _kind(runs, "trial")
    assert len(trial_runs) == 4
    assert {r.data.tags[tracking.TAG_PARENT] for r in trial_runs} == {study_run.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.user"] for r in runs} == {login[0]}
    assert all(login[1] not in out for out in outputs)


_ELSEWHERE = """
import socket, sys
socket.gethostname = lambda: "machine-a"  # another host: only the heartbeat can tell it died
from deep_repro.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.services
@pytest.mark.slow
def test_trial_of_a_worker_killed_on_another_machine_is_retried(
    services: Services, as_user: Login, splits: data.Splits, tmp_path: Path, procs: _Procs
) -> None:
    """Regression too: on RDB storage a dead worker's trial still used up the budget, so the
    next worker stopped at once and left it RUNNING (Optuna checks heartbeats only when a trial
    starts)."""
    login = _student("tuner", services)
    url, pg_password = _pg(services)
    study, experiment = _unique("class-mlp"), _unique("class-tune")
    interval = 1
    # Wide layers and 10 epochs: a trial takes seconds, time enough to kill its worker in it.
    cmd = _tune(
        [
            "model.hidden_sizes=[1024,1024]",
            "tune.epochs=10",
            "tune.n_trials=1",
            f"tune.heartbeat_interval={interval}",
            f"tune.storage={url}",
            f"tune.study_name={study}",
            f"tracking.experiment={experiment}",
        ]
    )
    env = _env(services, login, pg_password)
    optuna.storages.RDBStorage(services.pg_url)  # the schema exists before anyone polls it
    dying = procs.start(
        [sys.executable, "-c", _ELSEWHERE, *cmd[3:]], _machine(tmp_path / "a", splits), env
    )
    deadline = time.monotonic() + WAIT_S
    running: list[optuna.trial.FrozenTrial] = []
    while not running and time.monotonic() < deadline and dying.poll() is None:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name=study, storage=services.pg_url).trials
        except KeyError:
            continue
        running = [
            t for t in trials if t.state.name == "RUNNING" and tuning.ATTR_RUN in t.user_attrs
        ]
    dying.kill()
    dying.communicate(timeout=60)
    assert running, "the worker never started a trial"
    time.sleep(2 * interval + 1)  # its heartbeat is now older than the grace period

    procs.finish(procs.start(cmd, _machine(tmp_path / "b", splits), env))

    trials = optuna.load_study(study_name=study, storage=services.pg_url).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs[tuning.ATTR_RETRY_OF] == 0
    assert trials[1].params == trials[0].params
    client = _client(services)
    dead = client.get_run(running[0].user_attrs[tuning.ATTR_RUN])
    assert dead.info.status == "FAILED"
    assert dead.data.tags[tuning.TAG_TRIAL_STATE] == "FAIL"
    runs = _runs(client, experiment)
    assert len(_kind(runs, "study")) == 1
    assert "RUNNING" not in {r.info.status for r in runs}


# --------------------------------------------------------------------------- two students
def _git(clone: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=clone,
        env=project_env(clone),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.services
@pytest.mark.slow
def test_two_students_run_experiments_at_once_without_leaking_passwords(
    services: Services, as_user: Login, tmp_path: Path, procs: _Procs
) -> None:
    origin = make_project(
        tmp_path / "origin",
        edits={
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 40")],
        },
    )
    students = {os_user: _student(os_user, services) for os_user in ("alice", "bob")}
    started = {}
    for os_user, (login, password) in students.items():
        clone = tmp_path / os_user
        _git(tmp_path, "clone", "-q", str(origin), str(clone))
        env = {k: v for k, v in project_env(clone).items() if not k.startswith("PG")}
        env.update(
            USER=os_user,
            LOGNAME=os_user,
            MLFLOW_TRACKING_URI=services.mlflow_url,
            MLFLOW_TRACKING_USERNAME=login,
            MLFLOW_TRACKING_PASSWORD=password,
        )
        cmd = [
            "dvc",
            "exp",
            "run",
            "-n",
            f"{os_user}-exp",
            "-S",
            f"tracking.experiment=fashion-mnist-{login}",
            "-S",
            f"tracking.model_name=fashion-mnist-classifier-{login}",
        ]
        started[os_user] = (clone, procs.start(cmd, clone, env))
    outputs = {u: procs.finish(p) for u, (_, p) in started.items()}

    client = _client(services)
    for os_user, (login, _) in students.items():
        clone = started[os_user][0]
        runs = _runs(client, f"fashion-mnist-{login}")
        (pipeline,) = _kind(runs, "pipeline")
        stages = _kind(runs, "stage")
        assert {r.data.tags[tracking.TAG_PARENT] for r in stages} == {pipeline.info.run_id}
        assert sorted(r.data.tags[tracking.TAG_STAGE] for r in stages) == sorted(TRACKED)
        assert "RUNNING" not in {r.info.status for r in runs}
        for run in runs:
            assert run.data.tags["mlflow.user"] == login
            assert run.data.tags[f"{tracking.TAG_PREFIX}.user"] == login
            recorded = {**run.data.params, **run.data.tags}
            assert not [k for k, v in recorded.items() if "secret" in f"{k}={v}"], run.info.run_id
        assert "secret" not in outputs[os_user]
        assert "secret" not in (clone / "params.yaml").read_text()
        # What `dvc exp run` committed (its refs) holds no password; the whole history neither.
        refs = _git(clone, "show-ref")
        assert "refs/exps/" in refs and "secret" not in refs
        base = _git(clone, "rev-parse", "HEAD").strip()
        exp_refs = [line.split()[1] for line in refs.splitlines() if "refs/exps/" in line]
        assert "secret" not in _git(clone, "log", "-p", *exp_refs, f"^{base}")
        history = _git(clone, "log", "--all", "-p")
        assert all(pw not in history for _, pw in students.values())
