"""The README's class setup, for real: PostgreSQL + a basic-auth `mlflow server` started by
`scripts/services.sh` (tests marked `services`), one account per student, a race-free
`@champion`, identity on every run and the per-user leaderboard."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deep_repro import cli, config, tracking
from tests.helpers import Services, evidence, pipeline_run

Make = Callable[..., config.Config]
Login = Callable[[str, str], None]


def _client(services: Services) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=services.mlflow_url, registry_uri=services.mlflow_url)


def _new_version(client: Any, model: str, run_id: str) -> str:
    return str(
        client.create_model_version(model, source=f"runs:/{run_id}/model", run_id=run_id).version
    )


def _scratch_run(client: Any) -> str:
    _, exp_id = tracking.connect(client.tracking_uri, "class-gates")
    return str(client.create_run(exp_id).info.run_id)


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{random.randrange(1 << 30):x}"


# --------------------------------------------------------------------------- the server
@pytest.mark.services
def test_server_accepts_its_host_names_and_rejects_others(services: Services) -> None:
    port = services.mlflow_url.rsplit(":", 1)[1]

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": host},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    import socket

    # Allowed host names pass the DNS-rebinding check (401: then basic auth asks who you are).
    for host in (f"localhost:{port}", f"{socket.gethostname()}:{port}"):
        assert status(host) == 401, host
    assert status(f"evil.example:{port}") == 403


@pytest.mark.services
def test_stage_run_is_stored_in_postgres(
    services: Services,
    as_user: Login,
    make_cfg: Make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    experiment = _unique("class-stage")
    cfg = make_cfg(f"tracking.experiment={experiment}", "tracking.user=carol")
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", _unique("invocation"))
    monkeypatch.setenv("DVC_EXP_NAME", "curly-bear")
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    with tracking.stage_run("split", cfg) as run:
        run.log_metrics({"val_accuracy": 0.9}, pipeline=True)
        run.log_artifact(artifact)
    client = _client(services)
    stage = client.get_run(run.run_id)
    pipeline = client.get_run(run.pipeline_run_id)
    assert stage.info.status == pipeline.info.status == "FINISHED"
    assert pipeline.info.run_name == "carol-cnn-curly-bear"
    for r in (stage, pipeline):
        assert r.data.tags["mlflow.user"] == r.data.tags["deep_repro.user"] == "carol"
    local = client.download_artifacts(run.run_id, "note.txt", str(tmp_path / "back"))
    assert Path(local).read_text() == "hello"
    # The rows are in PostgreSQL (not a fallback store).
    import sqlalchemy

    engine = sqlalchemy.create_engine(services.pg_database("mlflow"))
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sqlalchemy.text("SELECT name FROM runs WHERE run_uuid = :id"),
                {"id": run.pipeline_run_id},
            ).scalar_one()
    finally:
        engine.dispose()
    assert found == "carol-cnn-curly-bear"


@pytest.mark.services
def test_optuna_study_on_the_documented_postgresql_url(services: Services) -> None:
    """`tune.storage=postgresql://user:pass@host/optuna`: the URL form the README documents,
    shared by two independent storage handles (two machines)."""
    import optuna

    name = _unique("class-cnn")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert services.pg_url.startswith("postgresql://")
    first = optuna.create_study(study_name=name, storage=services.pg_url, direction="maximize")
    first.optimize(lambda t: -((t.suggest_float("x", -1, 1)) ** 2), n_trials=3)
    second = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(services.pg_url))
    second.optimize(lambda t: -((t.suggest_float("x", -1, 1)) ** 2), n_trials=2)
    assert len(optuna.load_study(study_name=name, storage=services.pg_url).trials) == 5
    optuna.delete_study(study_name=name, storage=services.pg_url)


@pytest.mark.services
def test_the_students_database_login_reaches_only_the_study_database(services: Services) -> None:
    """Issue 22: the one PostgreSQL role owned mlflow_auth too; a student read every password
    hash and could `UPDATE users SET is_admin = true`. Now the study login is refused there."""
    import psycopg

    base = services.pg_url.rsplit("/", 1)[0]
    for database in ("mlflow", "mlflow_auth"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(f"{base}/{database}", connect_timeout=30).close()
    with psycopg.connect(services.pg_url, connect_timeout=30) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("class_studies",)


# --------------------------------------------------------------------------- access control
@pytest.mark.services
def test_students_cannot_touch_each_others_runs_or_champion(
    services: Services, as_user: Login, tmp_path: Path
) -> None:
    from mlflow.exceptions import MlflowException

    alice, bob = _unique("alice"), _unique("bob")
    students = tmp_path / "students.csv"
    students.write_text(f"username,password\n{alice},\n{bob},bob-secret-1\n")
    out = tmp_path / "accounts.csv"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": services.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": services.admin_user,
        "MLFLOW_TRACKING_PASSWORD": services.admin_password,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deep_repro.cli",
            "class",
            "enroll",
            str(students),
            "--accounts",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    alice_pw = out.read_text().splitlines()[1].split(",")[1]
    assert bob not in out.read_text()  # only generated passwords are written

    as_user(alice, alice_pw)
    client, exp_id = tracking.connect(services.mlflow_url, f"fashion-mnist-{alice}")
    run = client.create_run(exp_id, run_name="alice-run")
    model = f"fashion-mnist-classifier-{alice}"
    first = _new_version(client, model, run.info.run_id)
    second = _new_version(client, model, run.info.run_id)
    client.set_registered_model_alias(model, "champion", first)

    as_user(bob, "bob-secret-1")
    bob_client = _client(services)
    assert bob_client.get_run(run.info.run_id).info.run_name == "alice-run"  # READ for all
    for attempt in (
        lambda: bob_client.set_tag(run.info.run_id, "graded", "0"),
        lambda: bob_client.log_metric(run.info.run_id, "test_accuracy", 1.0),
        lambda: bob_client.delete_run(run.info.run_id),
        lambda: bob_client.set_registered_model_alias(model, "champion", second),
        lambda: bob_client.delete_registered_model_alias(model, "champion"),
    ):
        with pytest.raises(MlflowException) as err:
            attempt()
        assert err.value.error_code == "PERMISSION_DENIED"
    # Bob's own experiment is his to write.
    _, bob_exp = tracking.connect(services.mlflow_url, f"fashion-mnist-{bob}")
    bob_client.set_terminated(bob_client.create_run(bob_exp).info.run_id)

    as_user(services.admin_user, services.admin_password)
    teacher = _client(services)
    teacher.set_registered_model_alias(model, "champion", second)
    teacher.set_tag(run.info.run_id, "graded", "1")
    teacher.delete_run(run.info.run_id)
    assert str(teacher.get_model_version_by_alias(model, "champion").version) == str(second)
    assert teacher.get_run(run.info.run_id).info.lifecycle_stage == "deleted"


# --------------------------------------------------------------------------- race-free champion
class _Paused:
    """An MlflowClient whose calls stop after the first `after` ones until `resume` is set."""

    def __init__(self, client: Any, after: int, resume: threading.Event) -> None:
        self._client, self._after, self._resume = client, after, resume
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls > self._after:
                assert self._resume.wait(timeout=300), "the other gate never finished"
            return method(*args, **kwargs)

        return call


def _gate_pair(
    client: Any, model: str, order: tuple[float, float], after: int, run_id: str
) -> tuple[str, int]:
    """Versions 1 and 2 scored `order`; the first gate is paused after `after` calls while the
    second runs to completion. Returns the final champion and the first gate's call count."""
    versions = [_new_version(client, model, run_id) for _ in order]
    resume = threading.Event()
    paused = _Paused(client, after, resume)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            tracking.validation_gate(paused, model, versions[0], evidence(order[0]), 0.5, 0.05)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    # Wait (bounded) until the first gate is parked at its pause point, or finished.
    for _ in range(600):
        if paused.calls > after or not thread.is_alive():
            break
        threading.Event().wait(0.1)
    tracking.validation_gate(client, model, versions[1], evidence(order[1]), 0.5, 0.05)
    resume.set()
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    return str(client.get_model_version_by_alias(model, "champion").version), paused.calls


@pytest.mark.services
def test_champion_is_the_best_validated_version_for_every_interleaving(
    services: Services, as_user: Login
) -> None:
    """Pause the first gate before each of its server calls in turn, let a second gate run
    completely, then resume: whichever was better must end as @champion."""
    client = _client(services)
    run_id = _scratch_run(client)
    for order, best in (((0.80, 0.90), "2"), ((0.90, 0.80), "1")):
        for after in range(40):
            model = _unique("race")
            client.create_registered_model(model)
            champion, calls = _gate_pair(client, model, order, after, run_id)
            assert champion == best, (order, after)
            if calls <= after:  # the first gate never paused: every point was tried
                break
        else:
            pytest.fail("the gate makes more than 40 calls")


@pytest.mark.services
def test_concurrent_gates_leave_the_best_champion(services: Services, as_user: Login) -> None:
    client = _client(services)
    model = _unique("race-many")
    client.create_registered_model(model)
    scores = [0.70, 0.91, 0.88, 0.93, 0.60]  # 0.70 and 0.60 are below the baseline
    run_id = _scratch_run(client)
    versions = [_new_version(client, model, run_id) for _ in scores]
    barrier = threading.Barrier(len(scores), timeout=120)
    errors: list[BaseException] = []

    def gate(version: str, score: float) -> None:
        barrier.wait()
        try:
            tracking.validation_gate(_client(services), model, version, evidence(score), 0.75, 0.05)
        except BaseException as exc:  # every gate must finish (a raced alias is no error)
            errors.append(exc)

    threads = [
        threading.Thread(target=gate, args=pair) for pair in zip(versions, scores, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert str(client.get_model_version_by_alias(model, "champion").version) == versions[3]


# --------------------------------------------------------------------------- identity
def test_user_defaults_to_the_mlflow_login_then_the_os_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    assert tracking.run_user(None) == "alice"
    assert tracking.run_user("teacher") == "teacher"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    import getpass

    assert tracking.run_user(None) == getpass.getuser()
    names = {tracking.pipeline_run_name("bob", "cnn", None) for _ in range(5)}
    assert len(names) == 5 and all(n.startswith("bob-cnn-") for n in names)
    assert tracking.pipeline_run_name("bob", "mlp", "curly-bear") == "bob-mlp-curly-bear"


def _board(capsys: pytest.CaptureFixture[str], *args: str) -> list[tuple[str, str]]:
    """(rank, val accuracy) of each row of `deep-repro leaderboard ARGS`."""
    assert cli.main(["leaderboard", *args]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()[2:]
    return [(line.split()[0], line.split()[1]) for line in table]


def test_leaderboard_filters_by_user_and_experiment_pattern(
    tracking_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for user, experiment, acc in (
        ("alice", "fashion-mnist-alice", 0.91),
        ("bob", "fashion-mnist-bob", 0.93),
        ("alice", "other", 0.99),
    ):
        client, exp_id = tracking.connect(tracking_env, experiment)
        pipeline_run(client, exp_id, user, acc)

    def board(*args: str) -> list[str]:
        return [acc for _, acc in _board(capsys, *args)]

    assert board("--experiment", "fashion-mnist-*") == ["0.9300", "0.9100"]
    assert board("--experiment", "fashion-mnist-*", "--user", "alice") == ["0.9100"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    assert board("--experiment", "fashion-mnist-*", "--mine") == ["0.9300"]
    assert board("--experiment", "other") == ["0.9900"]


def test_a_hand_made_pipeline_run_is_listed_but_never_ranked(
    tracking_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 22: a run tagged as a pipeline run with val_accuracy = 1.0 (no stage ran) was
    rank 1. Only numbers its own finished evaluate stage logged rank now."""
    client, exp_id = tracking.connect(tracking_env, "fashion-mnist")
    pipeline_run(client, exp_id, "alice", 0.91)
    pipeline_run(client, exp_id, "mallory", 1.0, evaluated=False)
    # A real evaluate stage, but the pipeline run claims more than it logged.
    inflated = pipeline_run(client, exp_id, "mallory", 0.80)
    client.log_metric(inflated, "val_accuracy", 0.999)
    # An evaluate run in another experiment naming the forged run as its parent, with the same
    # number: ignored (it vouched for the forgery, or could un-rank someone else's run).
    forged = client.search_runs([exp_id], "metrics.val_accuracy = 1.0")[0].info.run_id
    _, other = tracking.connect(tracking_env, "fashion-mnist-bob")
    spoiler = client.create_run(
        other,
        tags={tracking.TAG_STAGE: "evaluate", "mlflow.parentRunId": forged},
    ).info.run_id
    client.log_metric(spoiler, "val_accuracy", 1.0)
    client.set_terminated(spoiler)
    both = ("--experiment", "fashion-mnist*")
    assert _board(capsys, *both) == [("1", "0.9100"), ("-", "1.0000"), ("-", "0.9990")]
    assert cli.main(["leaderboard", "--by-seed"]) == 0
    assert "1.0000" not in capsys.readouterr().out


def test_leaderboard_creates_nothing(tracking_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    client, _ = tracking.connect(tracking_env, "fashion-mnist")
    before = [e.name for e in client.search_experiments()]
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["leaderboard", "--experiment", "not-there"])
    assert exit_code.value.code == 2
    assert "no MLflow experiment matches" in capsys.readouterr().err
    assert [e.name for e in client.search_experiments()] == before


# --------------------------------------------------------------------------- shared DVC remote
@pytest.mark.slow
def test_a_fresh_clone_pulls_from_the_shared_remote_and_runs_nothing(tmp_path: Path) -> None:
    """The README's shared DVC remote: one `dvc push`, then any clone `dvc pull`s the outputs
    and `dvc repro` has nothing left to execute (the whole pipeline; the fast logreg)."""
    from tests.helpers import make_project, project_env
    from tests.helpers import run as sh

    project = make_project(
        tmp_path / "alice",
        edits={
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 40")],
        },
    )
    env = project_env(project)
    remote = tmp_path / "shared-remote"
    sh(["dvc", "remote", "add", "-d", "class", str(remote)], project, env)
    sh(["dvc", "repro"], project, env)
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "results"], project, env)
    sh(["dvc", "push"], project, env)

    clone = tmp_path / "bob"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    from deep_repro.pipeline import INFERENCE_MODEL, SPLIT_TRAIN_VAL

    assert not (clone / SPLIT_TRAIN_VAL).exists() and not (clone / INFERENCE_MODEL).exists()
    sh(["dvc", "pull"], clone, env)
    for out in (SPLIT_TRAIN_VAL, INFERENCE_MODEL):
        assert (clone / out).read_bytes() == (project / out).read_bytes()
    repro = sh(["dvc", "repro"], clone, env)
    # Only `validate` runs (always_changed: it checks this machine); nothing after it.
    assert re.findall(r"Running stage '(\w+)'", repro.stdout + repro.stderr) == ["validate"]
    assert sh(["dvc", "status"], clone, env).stdout.split() == ["validate:", "always", "changed"]


# --------------------------------------------------------------------------- lineage across users
def test_producer_prefers_same_invocation_then_same_user_and_checkout(tracking_env: str) -> None:
    client, exp_id = tracking.connect(tracking_env, "lineage-users")
    out = f"{tracking.OUT_PREFIX}data/split/train_val.npz"
    made = {}
    for label, user, workdir, invocation in (
        ("mine-now", "alice", "/a", "inv-1"),
        ("mine-here", "alice", "/a", "inv-0"),
        ("mine-elsewhere", "alice", "/b", "inv-2"),
        ("bobs", "bob", "/c", "inv-3"),
    ):
        made[label] = client.create_run(
            exp_id,
            tags={
                out: "abc",
                tracking.TAG_INVOCATION: invocation,
                f"{tracking.TAG_PREFIX}.user": user,
                f"{tracking.TAG_PREFIX}.git.remote": workdir,
            },
        ).info.run_id
        time.sleep(0.01)  # distinct start times: "bobs" is the most recent

    def find(**kwargs: str) -> str | None:
        return tracking.find_producer(client, exp_id, "data/split/train_val.npz", "abc", **kwargs)

    assert find(invocation="inv-1", user="alice", repo="/a") == made["mine-now"]
    assert find(invocation="inv-9", user="alice", repo="/a") == made["mine-here"]
    assert find(invocation="inv-9", user="alice", repo="/z") == made["mine-elsewhere"]
    assert find(invocation="inv-9", user="carol", repo="/a") == made["bobs"]
    assert find() == made["bobs"]


def test_lineage_marks_another_users_run_and_names_commit_and_params(
    tracking_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client, exp_id = tracking.connect(tracking_env, "fashion-mnist")
    p = tracking.TAG_PREFIX
    bobs = client.create_run(
        exp_id,
        tags={
            tracking.TAG_KIND: "stage",
            tracking.TAG_STAGE: "split",
            f"{p}.user": "bob",
            f"{p}.git.commit": "c0ffee",
            f"{p}.dvc_exp_name": "bobs-local-exp",
        },
    ).info.run_id
    client.log_param(bobs, "split.val_size", "0.1")
    alices = client.create_run(
        exp_id,
        tags={
            tracking.TAG_KIND: "stage",
            tracking.TAG_STAGE: "train",
            f"{p}.user": "alice",
            f"{tracking.UPSTREAM_PREFIX}data/split/train_val.npz": bobs,
        },
    ).info.run_id
    assert cli.main(["lineage", alices]) == 0
    out = capsys.readouterr().out
    assert "by bob (another user's run)" in out
    # Issue 23: one command a third party can run, and what bob must push for it to work
    # (his DVC experiment exists only in his checkout: nobody else can `dvc exp apply` it).
    assert f"reproduce: uv run deep-repro reproduce {bobs}; its commit must be on the remote" in out
    assert "`dvc exp push origin bobs-local-exp`" in out
    assert "dvc exp apply" not in out
