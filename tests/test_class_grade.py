"""The class board from recomputed numbers, on the real class services (PostgreSQL + the
basic-auth MLflow server): rerunnable enrolment, pre-claimed resources taken back, and
`deep-repro grade` scoring every champion itself — against forged claims, a copied program,
training on another split and a version made after the deadline."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deep_repro import cli, config, data, evaluation, inference, tracking, tuning
from deep_repro.files import atomic_path, file_digest
from deep_repro.pipeline import SPLIT_TRAIN_VAL
from tests.helpers import Services, evidence, pipeline_run
from tests.test_tuning import tuning_project


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{random.randrange(1 << 30):x}"


def _client(services: Services) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=services.mlflow_url, registry_uri=services.mlflow_url)


def _centroid_program(splits: data.Splits, n: int, path: Path) -> Path:
    """A real classifier, cheap to make: nearest class centroid of the first `n` training
    images (a linear layer on the normalised pixels), exported like the postprocess stage."""
    n = min(n, len(splits.x_train))
    x = (splits.x_train[:n].reshape(n, -1) / 255.0 - config.PIXEL_MEAN) / config.PIXEL_STD
    y = splits.y_train[:n]
    centroids = np.stack([x[y == k].mean(0) for k in range(10)])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        net[1].weight.copy_(torch.from_numpy(centroids))
        net[1].bias.copy_(torch.from_numpy(-0.5 * (centroids**2).sum(1)))
    with atomic_path(path) as tmp:
        inference.export(
            inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
        )
    return path


def _predicted(path: Path, x: np.ndarray) -> np.ndarray:
    """Scored independently of the project's loader: torch.export.load and a forward pass."""
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(torch.from_numpy(x)).argmax(1).numpy()


def mlflow_download(uri: str, dest: Path) -> str:
    import mlflow.artifacts

    dest.mkdir(parents=True)
    return str(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(text: str) -> dict[str, dict[str, str]]:
    return {r["student"]: r for r in csv.DictReader(io.StringIO(text))}


@pytest.mark.services
def test_class_enrolment_and_a_board_from_recomputed_numbers(
    services: Services,
    as_user: Any,
    make_cfg: Any,
    splits: data.Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.exceptions import MlflowException

    prefix, models = _unique("gc"), _unique("gc-clf")
    alice, bob, carol, dave = (_unique(n) for n in ("alice", "bob", "carol", "dave"))
    names = ["--experiment-prefix", prefix, "--model-prefix", models]
    roster = tmp_path / "students.csv"
    accounts = tmp_path / "teacher" / "accounts.csv"

    def enroll(*students: str, extra: tuple[str, ...] = ()) -> str:
        roster.write_text("username,password\n" + "".join(f"{s}\n" for s in students))
        as_user(services.admin_user, services.admin_password)
        args = ["class", "enroll", str(roster), "--accounts", str(accounts), *names, *extra]
        assert cli.main(args) == 0
        return capsys.readouterr().out

    def passwords() -> dict[str, str]:
        return {
            r["username"]: r["password"] for r in csv.DictReader(io.StringIO(accounts.read_text()))
        }

    # ---- a login that is not on the roster (a TA, a former student) creates the teacher's
    # grading and studies experiments first, and another class's roster experiment
    from mlflow.server import get_app_client

    mallory, mallory_pw = _unique("mallory"), f"pw-{random.randrange(1 << 60):x}"
    as_user(services.admin_user, services.admin_password)
    get_app_client("basic-auth", tracking_uri=services.mlflow_url).create_user(mallory, mallory_pw)
    as_user(mallory, mallory_pw)
    planted_grading = _client(services).create_experiment(f"{prefix}-grading")
    planted_studies = _client(services).create_experiment(f"{prefix}-studies")
    other_class = _unique("gcx")
    _client(services).create_experiment(f"{other_class}-class", tags={
        "deep_repro.roster": f'{{"format": "deep-repro/roster/1", "experiment_prefix": '
        f'"{other_class}", "model_prefix": "{models}", "students": ["{mallory}"]}}'
    })  # fmt: skip

    # ---- enrolment, then a rerun with one more student: nobody's password changes
    report = enroll(alice, bob)
    assert f"{prefix}-grading: {mallory} had MANAGE on it: revoked" in report
    assert f"{prefix}-studies: {mallory} had MANAGE on it: revoked" in report
    as_user(mallory, mallory_pw)
    for exp_id in (planted_grading, planted_studies):
        with pytest.raises(MlflowException) as err:
            _client(services).create_run(exp_id)
        assert err.value.error_code == "PERMISSION_DENIED"
    roster.write_text(f"username,password\n{alice}\n")
    as_user(services.admin_user, services.admin_password)
    with pytest.raises(SystemExit):  # a roster someone else can rewrite is refused
        cli.main(["class", "enroll", str(roster), "--accounts", str(accounts),
                  "--experiment-prefix", other_class, "--model-prefix", models])  # fmt: skip
    assert f"{other_class}-class holds a roster, but {mallory} (MANAGE) can change it" in (
        capsys.readouterr().err
    )
    first = passwords()
    enroll(alice, bob, carol)
    assert {k: passwords()[k] for k in first} == first and carol in passwords()
    assert oct(accounts.stat().st_mode & 0o777) == "0o600" and b"\r" not in accounts.read_bytes()
    pw = passwords()
    as_user(alice, pw[alice])
    _client(services).search_experiments(max_results=1)  # alice's first password still works

    # ---- bob pre-claims the experiment of dave, who is not enrolled yet
    as_user(bob, pw[bob])
    claimed = _client(services).create_experiment(f"{prefix}-{dave}")
    report = enroll(alice, bob, carol, dave)
    assert f"{prefix}-{dave}: {bob} had MANAGE on it" in report
    pw = passwords()
    as_user(bob, pw[bob])
    with pytest.raises(MlflowException) as err:
        _client(services).set_experiment_tag(claimed, "mine", "yes")
    assert err.value.error_code == "PERMISSION_DENIED"

    # ---- a planted experiment (with a run in it) for erin, not enrolled yet: refused whole
    erin = _unique("erin")
    as_user(bob, pw[bob])
    planted = _client(services).create_experiment(f"{prefix}-{erin}")
    _client(services).create_run(planted)
    with pytest.raises(SystemExit):
        enroll(alice, bob, carol, dave, erin)
    assert f"experiment {prefix}-{erin} was created before enrolment and holds runs" in (
        capsys.readouterr().err
    )
    with pytest.raises(MlflowException):  # nothing was done: no account for erin
        get_app_client("basic-auth", tracking_uri=services.mlflow_url).get_user(erin)
    with pytest.raises(SystemExit):  # --remove of a name still in the file: refused
        enroll(alice, bob, carol, dave, extra=("--remove", dave))

    # ---- the class data the teacher grades on
    canon = tmp_path / "canon"
    canon.mkdir()
    np.savez(canon / "train_val.npz", x_train=splits.x_train, y_train=splits.y_train,
             x_val=splits.x_val, y_val=splits.y_val)  # fmt: skip
    np.savez(canon / "test.npz", x_test=splits.x_test, y_test=splits.y_test)
    split_md5 = file_digest(canon / "train_val.npz")
    images = data.array_digest(splits.x_val, splits.y_val)

    def publish(student: str, program: Path, claim: Any = None, trained_on: str = split_md5,
                alpha: float = 0.05) -> str:  # fmt: skip
        """What a student's postprocess + evaluate stages do, as that student."""
        as_user(student, pw[student])
        monkeypatch.setenv("DEEP_REPRO_INVOCATION", _unique("inv"))
        cfg = make_cfg(f"tracking.experiment={prefix}-{student}",
                       f"tracking.model_name={models}-{student}")  # fmt: skip
        with tracking.stage_run("postprocess", cfg) as run:
            version = tracking.log_inference_model(
                run, program, splits.x_val[:4], cfg.tracking.model_name
            )
            run.client.set_tag(run.run_id, f"{tracking.IN_PREFIX}{SPLIT_TRAIN_VAL}", trained_on)
        assert version is not None
        predicted = _predicted(program, splits.x_val)
        honest = evaluation.Predictions(
            {"val": evaluation.split_predictions(images, splits.y_val, predicted)}
        )
        tracking.validation_gate(
            run.client, cfg.tracking.model_name, version, claim or honest, 0.1, alpha
        )
        return version

    weak = _centroid_program(splits, 60, tmp_path / "weak.pt2")
    strong = _centroid_program(splits, 2000, tmp_path / "strong.pt2")
    medium = _centroid_program(splits, 300, tmp_path / "medium.pt2")
    other = _centroid_program(splits, 150, tmp_path / "other.pt2")
    v1 = publish(alice, weak)
    as_user(services.admin_user, services.admin_password)
    deadline = int(_client(services).get_model_version(f"{models}-{alice}", v1).creation_timestamp)
    assert cli.main(["grade", "--snapshot", *names]) == 0  # at the deadline (cron, `at`)
    snap = capsys.readouterr().out
    assert f"{alice}: v{v1} sha256 " in snap and f"{bob}: not pinned" in snap
    snapshot_run = snap.split("snapshot run ")[1].split()[0]
    publish(bob, medium)
    publish(
        carol, medium, claim=evidence(0.99, n=len(splits.y_val))
    )  # bob's program, a forged claim
    publish(dave, other, trained_on="0" * 32)  # trained on a split of his own
    assert publish(alice, strong, alpha=0.99) == "2"  # after the deadline; the gate elects it

    # ---- the board, now and at the deadline
    def grade(*extra: str) -> dict[str, dict[str, str]]:
        out = tmp_path / f"board{len(extra)}"
        as_user(services.admin_user, services.admin_password)
        args = ["grade", "--split", str(canon / "train_val.npz"), "--test", str(canon / "test.npz")]
        assert cli.main([*args, "--out", str(out), *names, *extra]) == 0
        capsys.readouterr()
        return _rows((out / "grades.csv").read_text())

    board = grade()
    champions = {alice: strong, bob: medium, carol: medium, dave: other}
    for student, program in champions.items():
        row = board[student]
        for split, x, y in (
            ("val", splits.x_val, splits.y_val),
            ("test", splits.x_test, splits.y_test),
        ):
            measured = float(np.mean(_predicted(program, x) == y))
            column = "val_acc (ranks)" if split == "val" else "test_acc"
            assert row[column].split(" ± ")[0] == f"{measured:.4f}", (student, split)
    assert [board[s]["rank"] for s in (alice, bob)] == ["1", "2"]  # strong beats medium on val
    assert board[alice]["flags"] == "" and board[alice]["p_vs_best"] == ""
    assert f"same program as {carol}" in board[bob]["flags"]
    assert "claimed 0.9900 but measured" in board[carol]["flags"]
    assert f"same program as {bob}" in board[carol]["flags"]
    assert "split: trained on" in board[dave]["flags"]
    assert board[carol]["claimed_val"] == "0.9900"

    from datetime import UTC, datetime

    as_of = datetime.fromtimestamp(deadline / 1000, tz=UTC).isoformat(timespec="milliseconds")
    # After the deadline alice uploads other bytes under v1 (EDIT on her experiment lets her):
    # creation times cannot see it, the snapshot does. She cannot touch the snapshot itself.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from deep_repro.serving.model_cache import program_path

    as_user(alice, pw[alice])
    client = _client(services)
    location = client.get_model_version_download_uri(f"{models}-{alice}", v1)
    model_dir = Path(mlflow_download(location, tmp_path / "v1"))
    rel = program_path((model_dir / "MLmodel").read_text(), "v1")
    swapped = tmp_path / "swap" / Path(rel).name
    swapped.parent.mkdir()
    swapped.write_bytes(strong.read_bytes())
    get_artifact_repository(location).log_artifact(str(swapped), str(Path(rel).parent))
    with pytest.raises(Exception, match="403") as err:  # requests' HTTPError: the proxy's 403
        client.log_artifact(snapshot_run, str(swapped), "programs")
    then = grade("--as-of", as_of)
    assert then[alice]["version"] == v1 and "late: @champion v2" in then[alice]["flags"]
    assert f"replaced: v{v1}'s program changed after the snapshot" in then[alice]["flags"]
    weak_val = float(np.mean(_predicted(weak, splits.x_val) == splits.y_val))
    assert then[alice]["val_acc (ranks)"].startswith(f"{weak_val:.4f}")  # the pinned bytes
    assert then[alice]["sha256"] == file_sha256(weak)[:12]

    # dave registers alice's logged model as a version of his own (MLflow allows it with READ)
    # and makes it his champion: graded as nobody's work, not as dave's.
    as_user(dave, pw[dave])
    theirs = _client(services).get_model_version(f"{models}-{alice}", "2")
    copied = _client(services).create_model_version(
        f"{models}-{dave}",
        source=theirs.source,
        run_id=theirs.run_id,
        model_id=theirs.source.removeprefix("models:/"),
    )
    _client(services).set_registered_model_alias(f"{models}-{dave}", "champion", copied.version)
    board = grade("--reproduce", "1")
    stolen = board[dave]
    assert stolen["rank"] == "-" and "made outside" in stolen["flags"], stolen
    # The top of the board handed to `reproduce`: alice's version came from a postprocess run
    # whose inputs no recorded run produced (this test made it by hand), so it cannot be rerun
    # from its record, and the board says so in one line instead of believing it.
    assert board[alice]["reproduced"].startswith("cannot: "), board[alice]
    why = board[alice]["reproduced"]
    assert (
        "no recorded producing run" in why
        or "uncommitted changes" in why  # (the tests run in a checkout being edited)
        or "records no git remote" in why  # (... or in one without `origin`)
    ), why
    assert board[bob]["reproduced"] == ""  # rank 2: not asked for

    client = _client(services)
    grading = client.get_experiment_by_name(f"{prefix}-grading")
    runs = client.search_runs([grading.experiment_id], "tags.`deep_repro.kind` = 'grading'")
    assert len(runs) == 3
    (deadline_run,) = [r for r in runs if r.data.tags["deep_repro.as_of"] == as_of]
    graded = json.loads(
        Path(
            client.download_artifacts(deadline_run.info.run_id, "graded.json", str(tmp_path))
        ).read_text()
    )
    assert graded[alice]["version"] == v1 and graded[alice]["sha256"] == file_sha256(weak)
    assert graded[alice]["program"] == f"snapshot {snapshot_run}"
    metrics = next(r for r in runs if r.data.tags["deep_repro.as_of"] == "now").data.metrics
    assert metrics[f"val_accuracy.{alice}"] == pytest.approx(
        float(np.mean(_predicted(strong, splits.x_val) == splits.y_val))
    )

    # ---- the students' own leaderboard: owners by experiment, enrolled students only
    as_user(bob, pw[bob])
    client = _client(services)
    mine = client.get_experiment_by_name(f"{prefix}-{bob}").experiment_id
    pipeline_run(client, mine, alice, 0.70)  # `-S tracking.user=alice` in bob's clone
    # ... and `runs/create` over REST with `user_id: alice` (what the run's owner field says)
    from mlflow.entities import RunTag

    rest = client._tracking_client.store.create_run(
        mine, alice, 0, [RunTag(tracking.TAG_KIND, "pipeline"), RunTag("mlflow.user", alice)], None
    )
    assert rest.info.user_id == alice  # the server keeps what the client declared
    evaluate = client.create_run(
        mine, tags={tracking.TAG_KIND: "stage", tracking.TAG_STAGE: "evaluate",
                    "mlflow.parentRunId": rest.info.run_id},
    ).info.run_id  # fmt: skip
    for run_id in (evaluate, rest.info.run_id):
        client.log_metric(run_id, "val_accuracy", 0.65)
        client.set_terminated(run_id)
    shadow = client.create_experiment(f"{prefix}-teacher-x")  # not enrolled: never on the board
    pipeline_run(client, shadow, bob, 1.0)
    pattern = f"{prefix}-*"
    assert cli.main(["leaderboard", "--experiment", pattern, "--user", alice]) == 0
    out = capsys.readouterr().out
    assert "0.7000" not in out and "0.6500" not in out
    assert cli.main(["leaderboard", "--experiment", pattern]) == 0
    table = capsys.readouterr().out
    assert "1.0000" not in table
    for claimed in ("0.7000", "0.6500"):
        (row,) = [line for line in table.splitlines() if claimed in line]
        assert f" {bob} " in row and alice not in row

    # ---- one student's password reset: only theirs changes; the old one is refused by name
    enroll(alice, bob, carol, dave, extra=("--reset", carol))
    new = passwords()
    assert new[carol] != pw[carol] and {k: new[k] for k in (alice, bob)} == {
        k: pw[k] for k in (alice, bob)
    }
    as_user(carol, pw[carol])
    with pytest.raises(SystemExit):
        cli.main(["leaderboard", "--experiment", pattern])
    assert f"refused the login '{carol}' (401)" in capsys.readouterr().err

    # ---- one shared study, two students' workers: one study run, in the class's studies
    # experiment (every enrolled student may write it), whoever's worker came first
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(services.pg_url)
    storage = urlunsplit(
        parts._replace(netloc=parts.netloc.split(":", 1)[0] + "@" + parts.netloc.rsplit("@", 1)[1])
    )
    monkeypatch.setenv("PGPASSWORD", unquote(parts.password or ""))
    monkeypatch.chdir(tuning_project(tmp_path / "tuning", splits))
    (tmp_path / "tuning/conf/search/logreg.yaml").write_text(
        "params:\n  model.C: {type: float, low: 1.0e-2, high: 1.0, log: true}\n"
    )
    study = _unique("shared")
    for n, student in enumerate((alice, bob), start=1):
        as_user(student, passwords()[student])
        tuning.run_study([
            "model=logreg", "model.max_iter=30", "train.num_threads=1", f"tune.n_trials={n}",
            f"tune.storage={storage}", f"tune.study_name={study}",
            f"tune.experiment={prefix}-studies", f"tracking.experiment={prefix}-{student}",
        ])  # fmt: skip
    client = _client(services)
    studies = client.get_experiment_by_name(f"{prefix}-studies").experiment_id
    kinds = [r.data.tags.get(tracking.TAG_KIND) for r in client.search_runs([studies])]
    assert sorted(kinds) == ["study", "trial", "trial"]


# --------------------------------------------------------------------------- TLS
class _TlsServer:
    """A basic-auth `mlflow server` serving https with a certificate of a throwaway CA (sqlite
    stores in a temp dir), stopped with its process group at the end."""

    def __init__(self, root: Path) -> None:
        import shutil
        import socket
        import subprocess
        import sys

        if shutil.which("openssl") is None:
            pytest.skip("openssl not installed")
        self.ca = root / "ca.pem"

        def sh(*cmd: str) -> None:
            subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=60)

        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
           "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=throwaway class CA")  # fmt: skip
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
           "-out", "server.csr", "-subj", "/CN=localhost")  # fmt: skip
        (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem",
           "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "san.ext",
           "-out", "server.pem")  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.admin_password = f"admin-{random.randrange(1 << 40):x}"
        (root / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
            f"admin_password = {self.admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "throwaway",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self.url = f"https://localhost:{port}"
        tls_opts = f"--ssl-keyfile {root / 'server.key'} --ssl-certfile {root / 'server.pem'}"
        self.log = open(root / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--allowed-hosts", f"localhost:{port}",
             "--uvicorn-opts", tls_opts],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        import ssl
        import time
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.ca))
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5, context=context).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        self.stop()
        pytest.fail("TLS mlflow server did not start: " + (root / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        import signal

        self.log.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.mark.slow
def test_the_class_flow_over_tls_with_a_private_ca(
    make_cfg: Any,
    splits: data.Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Basic auth sends passwords in the clear over http://: the class server speaks TLS and
    every client (MLflow's, and the project's own REST lookups) checks its certificate against
    the class CA named by MLFLOW_TRACKING_SERVER_CERT_PATH."""
    (tmp_path / "tls").mkdir()
    server = _TlsServer(tmp_path / "tls")
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        # Without the class CA the certificate is refused, in one line.
        with pytest.raises(SystemExit):
            cli.main(["leaderboard", "--experiment", "anything"])
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(server.ca))

        prefix, models, student = "tls", "tls-clf", "alice"
        roster = tmp_path / "students.csv"
        roster.write_text(f"username,password\n{student},short\n")  # MLflow wants >= 12
        with pytest.raises(SystemExit):
            cli.main(["class", "enroll", str(roster), "--experiment-prefix", "x"])
        assert "students.csv:2: alice's password is 5 characters" in capsys.readouterr().err
        roster.write_text(f"username,password\n{student},alice-pw-1-long\n")
        names = ["--experiment-prefix", prefix, "--model-prefix", models]
        accounts = ["--accounts", str(tmp_path / "accounts.csv")]
        assert cli.main(["class", "enroll", str(roster), *accounts, *names]) == 0

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", student)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-pw-1-long")
        monkeypatch.setenv("DEEP_REPRO_INVOCATION", _unique("inv"))
        program = _centroid_program(splits, 2000, tmp_path / "alice.pt2")
        cfg = make_cfg(f"tracking.experiment={prefix}-{student}",
                       f"tracking.model_name={models}-{student}")  # fmt: skip
        with tracking.stage_run("postprocess", cfg) as run:
            version = tracking.log_inference_model(
                run, program, splits.x_val[:4], cfg.tracking.model_name
            )
        assert version is not None
        predicted = _predicted(program, splits.x_val)
        images = data.array_digest(splits.x_val, splits.y_val)
        claim = evaluation.Predictions(
            {"val": evaluation.split_predictions(images, splits.y_val, predicted)}
        )
        tracking.validation_gate(run.client, cfg.tracking.model_name, version, claim, 0.1, 0.05)
        # The project's own REST lookup (predict's fast path, grade) trusts the class CA too.
        from deep_repro.serving import model_cache

        found = model_cache.resolve(server.url, f"models:/{models}-{student}@champion")
        assert found is not None and found.version == version

        canon = tmp_path / "canon"
        canon.mkdir()
        np.savez(canon / "train_val.npz", x_val=splits.x_val, y_val=splits.y_val)
        np.savez(canon / "test.npz", x_test=splits.x_test, y_test=splits.y_test)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
        out = tmp_path / "board"
        args = ["grade", "--split", str(canon / "train_val.npz"),
                "--test", str(canon / "test.npz"), "--out", str(out), *names]  # fmt: skip
        assert cli.main(args) == 0
        row = _rows((out / "grades.csv").read_text())[student]
        measured = float(np.mean(predicted == splits.y_val))
        assert row["rank"] == "1" and row["val_acc (ranks)"].startswith(f"{measured:.4f}")
    finally:
        server.stop()
