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
def test_three_students_two_at_once_graded_from_what_the_teacher_recomputed(
    services: Services,
    as_user: Login,
    tmp_path: Path,
    procs: _Procs,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The class lab end to end: the teacher enrols three students, two of them run the
    pipeline (`dvc exp run`) in their own clones at the same time and the third after them,
    each with their own login and config, and `deep-repro grade` scores every champion
    itself; its numbers equal an independent `torch.export.load` of each program, and no
    password reaches a run, params.yaml, git or an output."""
    import csv
    import io

    import numpy as np
    import torch

    from deep_repro import cli
    from deep_repro.serving.model_cache import program_path

    origin = make_project(
        tmp_path / "origin",
        edits={
            # the fixture's few hundred images do not reach the published baseline
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg"), ("0.842", "0.1")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 40")],
        },
    )
    prefix, models = _unique("lab"), _unique("lab-clf")
    students = {"alice": "40", "bob": "25", "carol": "10"}  # each their own model.max_iter
    logins = {os_user: _unique(os_user) for os_user in students}
    names = ["--experiment-prefix", prefix, "--model-prefix", models]
    roster, accounts = tmp_path / "students.csv", tmp_path / "teacher" / "accounts.csv"
    roster.write_text("username,password\n" + "".join(f"{u}\n" for u in logins.values()))
    assert cli.main(["class", "enroll", str(roster), "--accounts", str(accounts), *names]) == 0
    passwords = {r["username"]: r["password"] for r in csv.DictReader(accounts.open())}

    def run(os_user: str) -> tuple[Path, subprocess.Popen[str]]:
        login, clone = logins[os_user], tmp_path / os_user
        _git(tmp_path, "clone", "-q", str(origin), str(clone))
        env = {k: v for k, v in project_env(clone).items() if not k.startswith("PG")}
        env.update(
            USER=os_user,
            LOGNAME=os_user,
            MLFLOW_TRACKING_URI=services.mlflow_url,
            MLFLOW_TRACKING_USERNAME=login,
            MLFLOW_TRACKING_PASSWORD=passwords[login],
        )
        cmd = ["dvc", "exp", "run", "-n", f"{os_user}-exp",
               "-S", f"tracking.experiment={prefix}-{login}",
               "-S", f"tracking.model_name={models}-{login}",
               "-S", f"model.max_iter={students[os_user]}"]  # fmt: skip
        return clone, procs.start(cmd, clone, env)

    started = {u: run(u) for u in ("alice", "bob")}  # two at once
    outputs = {u: procs.finish(p) for u, (_, p) in started.items()}
    started["carol"] = run("carol")  # and one after them
    outputs["carol"] = procs.finish(started["carol"][1])

    client = _client(services)
    for os_user, login in logins.items():
        clone = started[os_user][0]
        runs = _runs(client, f"{prefix}-{login}")
        (pipeline,) = _kind(runs, "pipeline")
        stages = _kind(runs, "stage")
        assert {r.data.tags[tracking.TAG_PARENT] for r in stages} == {pipeline.info.run_id}
        assert sorted(r.data.tags[tracking.TAG_STAGE] for r in stages) == sorted(TRACKED)
        assert "RUNNING" not in {r.info.status for r in runs}
        secret = passwords[login]
        for r in runs:
            assert r.data.tags["mlflow.user"] == login
            recorded = {**r.data.params, **r.data.tags}
            assert not [k for k, v in recorded.items() if secret in f"{k}={v}"], r.info.run_id
        assert secret not in outputs[os_user]
        assert secret not in (clone / "params.yaml").read_text()
        # What `dvc exp run` committed (its refs) holds no password; the whole history neither.
        refs = _git(clone, "show-ref")
        assert "refs/exps/" in refs
        history = _git(clone, "log", "--all", "-p")
        assert all(pw not in history for pw in passwords.values())

    # ---- the teacher grades, on the class split (every clone made the same one)
    teacher = started["carol"][0]
    split, test = teacher / "data/split/train_val.npz", teacher / "data/split/test.npz"
    out = tmp_path / "grades"
    args = ["grade", "--split", str(split), "--test", str(test), "--out", str(out), *names]
    assert cli.main(args) == 0
    print(capsys.readouterr().out)  # the board, for the record (pytest -s)
    board = {r["student"]: r for r in csv.DictReader(io.StringIO((out / "grades.csv").read_text()))}
    assert sorted(board) == sorted(logins.values())

    # ---- independently: each champion's files, torch.export.load, a forward pass
    import mlflow.artifacts

    val, held_out = np.load(split), np.load(test)
    for login in logins.values():
        mv = client.get_model_version_by_alias(f"{models}-{login}", "champion")
        assert board[login]["version"] == mv.version and board[login]["rank"] != "-"
        location = client.get_model_version_download_uri(mv.name, mv.version)
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(tmp_path / "check" / login)
        ))  # fmt: skip
        program = local / program_path((local / "MLmodel").read_text(), login)
        module = torch.export.load(str(program)).module()
        for column, x, y in (
            ("val_acc (ranks)", val["x_val"], val["y_val"]),
            ("test_acc", held_out["x_test"], held_out["y_test"]),
        ):
            with torch.no_grad():
                accuracy = float(np.mean(module(torch.from_numpy(x)).argmax(1).numpy() == y))
            assert board[login][column].split(" ± ")[0] == f"{accuracy:.4f}", (login, column)
        assert "claimed" not in board[login]["flags"], board[login]  # honest claims match
        assert "split:" not in board[login]["flags"], board[login]
