"""A tracking outage never throws away finished work: against a real `mlflow server` that is
killed mid-run (by PID) and restarted on the same port and database, runs go to the local spool
with one warning line, and `deep-repro sync` completes them on the server."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from deep_repro import cli, config, tracking
from deep_repro.tracking import spool
from deep_repro.tracking.store import TAG_INVOCATION, TAG_KIND, TAG_PARENT

from .helpers import REPO, fixture_overrides, make_project, project_env, run

Make = Callable[..., config.Config]


class Server:
    """One `mlflow server` (sqlite in tmp) on a fixed free port; killable and restartable."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session: the server's workers are children, and killing means all of them.
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.tmp / 'server.db'}",
                "--artifacts-destination",
                str(self.tmp / "server-artifacts"),
            ],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600  # slow when the machine is busy
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise AssertionError(f"mlflow server on {self.uri} did not start") from None
                time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is None:
            return
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 30  # the port must really refuse before we go on
        while _port_open(self.port):
            assert time.monotonic() < deadline, "killed mlflow server still answers"
            time.sleep(0.2)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return kind is ProcessLookupError


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(REPO / "conf", root / "conf")  # `deep-repro sync` reads tracking.*
    monkeypatch.chdir(root)
    # A busy machine can take more than the 10 s default to answer: that would already count as
    # an outage (rightly, but then the test's own kill would not be what it exercises).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "outage-test")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return root


def _spool_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    # urllib3's retry chatter is silenced by the stages' logging setup (errors.setup_logging).
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("urllib3")
    ]


@pytest.mark.slow
def test_runs_spool_through_an_outage_and_sync_completes_them(
    server: Server,
    workdir: Path,
    make_cfg: Make,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(One test: each `mlflow server` start costs a minute or more on a busy machine.)

    A stage run opened while the server is up keeps its id; runs created during the outage get
    placeholder ids that sync maps to real ones, parent links included.
    """
    from mlflow.entities import Metric

    cfg = make_cfg()
    other, other_exp = tracking.connect(server.uri, "offline")
    with tracking.stage_run("train", cfg) as handle:
        handle.log_metrics({"val_loss": 1.0}, step=1)
        run_id, parent_id = handle.run_id, handle.pipeline_run_id
        caplog.clear()
        server.kill()
        start = time.monotonic()
        handle.log_metrics({"val_loss": 0.5}, step=2)
        assert time.monotonic() - start < 20  # the retries are bounded
        for step in (3, 4):
            handle.log_metrics({"val_loss": 1.0 / step}, step=step)
        handle.log_metrics({"val_accuracy": 0.9}, pipeline=True)
        handle.set_tags({"stop_reason": "epochs"})
        handle.log_dict({"extra": 1}, "tables/extra.json")
    lines = _spool_warnings(caplog)
    assert len(lines) == 1, lines
    assert "spooled" in lines[0] and "deep-repro sync" in lines[0] and "\n" not in lines[0]

    pipeline = other.create_run(
        other_exp, run_name="pipeline", tags={TAG_KIND: "pipeline", TAG_INVOCATION: "never-seen"}
    )
    stage = other.create_run(
        other_exp, run_name="train", tags={TAG_KIND: "stage", TAG_PARENT: pipeline.info.run_id}
    )
    assert stage.info.run_id.startswith(spool.PLACEHOLDER_PREFIX)
    assert other.search_runs([other_exp]) == []  # offline: nothing found, no stall
    other.log_batch(
        stage.info.run_id, metrics=[Metric("loss", 1.0 / s, 1000 + s, s) for s in (1, 2, 3)]
    )
    other.set_terminated(stage.info.run_id, "FINISHED")
    other.set_terminated(pipeline.info.run_id, "FINISHED")
    spooled = list((workdir / spool.SPOOL_DIR).glob("*.jsonl"))
    assert len(spooled) == 2

    # Still down: sync says so in one line and keeps the spool.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sync"])
    assert exit_info.value.code == 2 and all(p.exists() for p in spooled)

    backup = shutil.copytree(workdir / spool.SPOOL_DIR, workdir.parent / "spool-backup")
    server.start()
    capsys.readouterr()
    assert cli.main(["sync"]) == 0
    out = capsys.readouterr().out
    assert "synced 2 of 2" in out and "2 run creations" in out, out
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.tags["stop_reason"] == "epochs"
    assert run.data.metrics["val_accuracy"] == 0.9
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"dvc_lock_entry.json", "tables"} <= names
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["val_accuracy"] == 0.9

    made = {r.data.tags[TAG_KIND]: r for r in client.search_runs([other_exp])}
    assert set(made) == {"pipeline", "stage"}
    assert made["stage"].data.tags[TAG_PARENT] == made["pipeline"].info.run_id
    assert all(r.info.status == "FINISHED" for r in made.values())
    assert not list((workdir / spool.SPOOL_DIR).glob("*"))
    assert cli.main(["sync"]) == 0  # nothing left: a rerun is harmless
    assert "nothing to sync" in capsys.readouterr().out

    # A sync replayed from the start (as after a crash before its state was saved) finds the
    # runs it made instead of making them twice, and adds no metric twice.
    shutil.copytree(backup, workdir / spool.SPOOL_DIR, dirs_exist_ok=True)
    assert cli.main(["sync"]) == 0
    assert len(client.search_runs([other_exp])) == 2
    history = client.get_metric_history(made["stage"].info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert len(client.get_metric_history(run_id, "val_loss")) == 4


_KILL_AFTER_FIRST_EPOCH = '''
"""Test hook (put on PYTHONPATH): kill the mlflow server once the first epoch is logged."""
import os, signal, sys

if os.environ.get("OUTAGE_KILL_PGID") and sys.orig_argv[-1:] == ["stages/train.py"]:
    from deep_repro import training

    _train = training.train_model

    def train_model(cfg, *args, on_epoch, **kwargs):
        def hook(m):
            on_epoch(m)
            if m.step == 1:
                os.killpg(int(os.environ.pop("OUTAGE_KILL_PGID")), signal.SIGKILL)
        return _train(cfg, *args, on_epoch=hook, **kwargs)

    training.train_model = train_model
'''


@pytest.mark.slow
def test_dvc_repro_train_survives_the_server_dying_after_the_first_epoch(
    tmp_path: Path, server: Server
) -> None:
    project = make_project(tmp_path / "project", fixture_overrides(**{"train.epochs": 2}))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_AFTER_FIRST_EPOCH)
    env = project_env(project) | {
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
    }  # see `workdir`
    run(["dvc", "repro", "split"], project, env, timeout=600)
    assert server.proc is not None
    proc = run(
        ["dvc", "repro", "train"],
        project,
        env | {"PYTHONPATH": str(hook), "OUTAGE_KILL_PGID": str(server.proc.pid)},
        check=False,
        timeout=600,
    )
    assert server.proc.wait(timeout=30) is not None  # the hook did kill it
    server.proc = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "spooled" in warnings[0], warnings
    assert (project / "models/checkpoint.pt").exists()
    assert "models/checkpoint.pt" in (project / "dvc.lock").read_text()

    server.start()
    out = run(["deep-repro", "sync"], project, env).stdout
    assert "synced 1 of 1" in out
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("fashion-mnist")
    train = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("deep_repro.stage") == "train"
    ]
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(train[0].info.run_id, "val_loss"))
    assert steps == [1, 2]
    assert not list((project / spool.SPOOL_DIR).glob("*.jsonl"))
    shutil.rmtree(hook)


def test_offline_writes_replay_into_a_store_without_a_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tracking_env: str,
) -> None:
    """The spool/sync round trip alone (quick): a dead port (refused at once) is the outage, a
    sqlite store the place it is replayed into. Regression: `update_run(name=...)` used to
    clash with the retry helper's own argument name."""
    from mlflow.entities import Metric, Param

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setattr(spool, "RETRY_DELAYS_S", (0.01,))
    store, exp_id = tracking.connect(tracking_env, "replay")
    offline = spool.ResilientClient(MlflowClient("http://127.0.0.1:9"), "http://127.0.0.1:9")
    parent = offline.create_run(exp_id, tags={TAG_KIND: "pipeline"})
    assert offline.offline and parent.info.run_id.startswith(spool.PLACEHOLDER_PREFIX)
    offline.update_run(parent.info.run_id, status="RUNNING", name="renamed")
    child = offline.create_run(exp_id, tags={TAG_PARENT: parent.info.run_id})
    offline.log_batch(
        child.info.run_id,
        metrics=[Metric("loss", 0.5, 1000 + s, s) for s in (1, 2)],
        params=[Param("lr", "0.1")],
    )
    offline.set_tag(child.info.run_id, "note", "x")
    (tmp_path / "a.txt").write_text("a")
    offline.log_artifact(child.info.run_id, str(tmp_path / "a.txt"), "files")
    for made in (child, parent):
        offline.set_terminated(made.info.run_id, "FINISHED")
    assert (
        "2 run creations, 1 run updates, 2 metrics, 1 params, 1 tags, 1 artifacts"
        in offline.summary()
    )

    from deep_repro.tracking.sync import sync

    report = sync(store)
    assert report.completed == 1 and not report.problems
    runs = {r.data.tags.get(TAG_KIND, "child"): r for r in store.search_runs([exp_id])}
    assert runs["pipeline"].info.run_name == "renamed"
    assert runs["child"].data.tags[TAG_PARENT] == runs["pipeline"].info.run_id
    assert runs["child"].data.params == {"lr": "0.1"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert [a.path for a in store.list_artifacts(runs["child"].info.run_id, "files")] == [
        "files/a.txt"
    ]
    assert sync(store).files == 0


def test_refusals_are_not_mistaken_for_an_outage() -> None:
    from mlflow.exceptions import MlflowException

    assert spool.is_transient(ConnectionRefusedError())
    assert not spool.is_transient(
        MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST")
    )
