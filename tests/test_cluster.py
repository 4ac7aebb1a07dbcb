"""`deep-repro submit` / `collect` against a real single-node SLURM cluster (scripts/slurm.sh:
slurmctld + slurmd on 127.0.0.1), a bare git remote and a local DVC remote, tasks logging to
the class MLflow server of scripts/services.sh."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from deep_repro import tracking
from deep_repro.cluster import settings, submit
from deep_repro.errors import DeepReproError
from tests.helpers import VENV_BIN, Services, make_project, project_env, run


def test_sweeps_expand_like_dvc_exp_run_queue() -> None:
    tasks = submit.expand(["model.lr=0.001,0.003", "seed=1,2", "model=logreg"])
    assert len(tasks) == 4 and ["model.lr=0.003", "seed=2", "model=logreg"] in tasks
    assert submit.expand(["seed=range(1,4)"]) == [["seed=1"], ["seed=2"], ["seed=3"]]
    assert submit.expand([]) == [[]]
    with pytest.raises(DeepReproError, match="-S seed=1,,"):
        submit.expand(["seed=1,,"])


def test_a_bad_override_or_setting_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    from tests.helpers import REPO

    with pytest.raises(DeepReproError, match=r"task seed=-1: .*seed"):
        submit.check_overrides(REPO, [["seed=1"], ["seed=-1"]])
    (tmp_path / "cluster.yaml").write_text("cpus: 0\n")
    with pytest.raises(DeepReproError, match=r"cluster.yaml: cpus: "):
        settings.load(tmp_path)
    (tmp_path / "cluster.yaml").write_text("partiton: gpu\n")
    with pytest.raises(DeepReproError, match=r"cluster.yaml: partiton: Extra inputs"):
        settings.load(tmp_path)


def test_the_job_script_passes_every_cluster_option(tmp_path: Path) -> None:
    s = settings.ClusterSettings(
        partition="gpu", time="02:00:00", cpus=8, mem="16G", gpus=1, account="lab",
        qos="normal", constraint="avx512", sbatch_args=["--exclusive"],
        setup=["module load cuda/12.4"], throttle=3,
    )  # fmt: skip
    script = submit.job_script(s, tmp_path, 5, "sweep", "a" * 40, "/shared/repo.git")
    for line in ("--array=0-4%3", "--partition=gpu", "--time=02:00:00", "--cpus-per-task=8",
                 "--mem=16G", "--gpus-per-task=1", "--account=lab", "--qos=normal",
                 "--constraint=avx512", "--exclusive", "--signal=B:USR1@120",
                 "--requeue"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda/12.4\n" in script and f"checkout -q --detach {'a' * 40}" in script


def _git(cwd: Path, *args: str) -> str:
    return run(["git", *args], cwd, project_env(cwd)).stdout


def _cluster_project(
    tmp_path: Path, slurm: str, services: Services, env_cache: Path
) -> tuple[Path, dict[str, str]]:
    """A project pushed to a bare git remote, with a local DVC remote and cluster.yaml (one
    core per task, clones under tmp, the session's venv cache), and the submitter's env."""
    origin = make_project(
        tmp_path / "origin",
        edits={
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg"), ("0.842", "0.1")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 30")],
        },
    )
    remote = tmp_path / "remote.git"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    env = project_env(origin)
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], origin, env)
    (origin / "cluster.yaml").write_text(
        f"cpus: 1\ntime: '00:20:00'\nscratch: {tmp_path / 'scratch'}\ncache: {env_cache}\n"
    )
    _git(origin, "add", "-A")
    _git(origin, "commit", "-qm", "cluster settings and the DVC remote")
    _git(origin, "remote", "add", "origin", str(remote))
    _git(origin, "push", "-q", "origin", "HEAD:refs/heads/main")
    env.update(
        SLURM_CONF=slurm,
        DEEP_REPRO_CACHE=str(env_cache),
        MLFLOW_TRACKING_URI=services.mlflow_url,
        MLFLOW_TRACKING_USERNAME=services.admin_user,
        MLFLOW_TRACKING_PASSWORD=services.admin_password,
    )
    return origin, env


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.slurm
def test_a_sweep_on_slurm_is_collected_and_a_cancelled_task_resubmitted(
    slurm: str, services: Services, as_user: Any, env_cache: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    experiment = f"cluster-{os.getpid()}-{random.randrange(1 << 30):x}"
    origin, env = _cluster_project(tmp_path, slurm, services, env_cache)
    cli = str(VENV_BIN / "deep-repro")
    client: Any = MlflowClient(tracking_uri=services.mlflow_url)

    def runs_of(task: str) -> list[Any]:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return list(client.search_runs(
            [exp.experiment_id], f"tags.`deep_repro.slurm.array_task_id` = '{task}'"
        ))  # fmt: skip

    # ---- a two-task sweep; task 1 is cancelled while one of its stages runs
    submitted = run(
        [cli, "submit", "-S", "seed=1,2", "-S", f"tracking.experiment={experiment}", "--name", "t"],
        origin,
        env,
    ).stdout
    job_id = submitted.split("submitted job ")[1].split(":")[0]
    deadline = time.monotonic() + 600
    while not any(r.info.status == "RUNNING" and r.data.tags.get(tracking.TAG_KIND) == "stage"
                  for r in runs_of("1")):  # fmt: skip
        assert time.monotonic() < deadline, "task 1 never started a stage"
        time.sleep(0.5)
    subprocess.run(["scancel", f"{job_id}_1"], env=env, check=True, timeout=60)
    while run(["squeue", "-h", "-j", job_id], origin, env).stdout.strip():
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(1)

    done = subprocess.run([cli, "collect"], cwd=origin, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"task 0: done -> experiment t-{job_id}-1 (pulled)" in done.stdout, done.stdout
    assert "task 1: failed: dvc exp run: stopped by SIGTERM" in done.stdout, done.stdout
    assert "/logs/1.log" in done.stdout
    cancelled = runs_of("1")
    assert "RUNNING" not in {r.info.status for r in cancelled}, [
        (r.data.tags.get("deep_repro.stage"), r.info.status) for r in cancelled
    ]
    stopped = [r for r in cancelled if r.info.status != "FINISHED"]
    assert stopped and {r.info.status for r in stopped} <= {"KILLED", "FAILED"}
    assert all("SIGTERM" in r.data.tags[tracking.TAG_FAIL_REASON] for r in stopped), [
        r.data.tags.get(tracking.TAG_FAIL_REASON) for r in stopped
    ]

    # ---- only the failed task again, one command; then everything is collected
    again = run([cli, "submit", "--resubmit", job_id, "--wait"], origin, env).stdout
    second = again.split("submitted job ")[1].split(":")[0]
    assert again.count("done: experiment") == 2 and f"t-{second}-2" in again, again
    collected = run([cli, "collect"], origin, env).stdout
    assert collected.count("(pulled)") == 1 and "failed" not in collected, collected
    names = {f"t-{job_id}-1", f"t-{second}-2"}
    listed = run(["dvc", "exp", "list", "--name-only"], origin, env).stdout.split()
    assert names <= set(listed), listed
    import csv
    import io

    table = run(["dvc", "exp", "show", "--csv", "--only-changed"], origin, env).stdout
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(table))}
    assert names <= set(rows), table  # with their metrics and params, as `exp show` lists them
    assert all(float(rows[n]["val.accuracy"]) > 0.5 for n in names), table
    assert {rows[n]["seed"] for n in names} == {"1", "2"}, table

    exp = client.get_experiment_by_name(experiment)
    pipelines = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
    finished = [r for r in pipelines if r.info.status == "FINISHED"]
    assert len(finished) == 2 and len(pipelines) == 3, [r.info.status for r in pipelines]
    assert {r.data.tags["deep_repro.slurm.array_job_id"] for r in finished} == {job_id, second}
    assert {r.data.tags["deep_repro.slurm.array_task_id"] for r in finished} == {"0", "1"}
    assert {r.data.tags["deep_repro.seed"] for r in finished} == {"1", "2"}


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.slurm
def test_tuning_workers_as_an_array_share_one_postgresql_study(
    slurm: str, services: Services, as_user: Any, env_cache: Path, tmp_path: Path
) -> None:
    """`deep-repro tune ... --submit 2`: two workers on the cluster, one PostgreSQL study,
    exactly `tune.n_trials` COMPLETE trials and one study run; the winner is exported by
    running the same command here without --submit (the budget is spent: no trial runs)."""
    import optuna
    from mlflow import MlflowClient

    from tests.test_class_tune import _pg

    origin, env = _cluster_project(tmp_path, slurm, services, env_cache)
    storage, pg_password = _pg(services)
    env["PGPASSWORD"] = pg_password
    study, experiment = (
        f"tune-{os.getpid()}-{random.randrange(1 << 30):x}",
        f"studies-{os.getpid()}",
    )
    overrides = [
        "model=logreg", "tune.n_trials=3", "tune.pruner=none",
        f"tune.storage={storage}", f"tune.study_name={study}", f"tune.experiment={experiment}",
    ]  # fmt: skip
    cli = str(VENV_BIN / "deep-repro")
    refused = subprocess.run(
        [cli, "tune", "model=logreg", "--submit", "2"], cwd=origin, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "tune.storage = None: workers on a cluster" in (
        refused.stderr
    ), refused.stderr
    out = run([cli, "tune", *overrides, "--submit", "2", "--wait"], origin, env).stdout
    assert out.count("done: a tuning worker") == 2, out

    loaded = optuna.load_study(study_name=study, storage=_with_password(storage, pg_password))
    states = [t.state for t in loaded.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3, states
    client: Any = MlflowClient(tracking_uri=services.mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags.get(tracking.TAG_KIND) for r in runs)
    assert kinds == ["study", "trial", "trial", "trial"], kinds
    trials = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    assert all(r.data.tags.get("deep_repro.slurm.array_job_id") for r in trials)

    run(["dvc", "repro", "split"], origin, env)
    assert f"tune {' '.join(overrides)} train.num_threads=1" in out, out
    exported = run([cli, "tune", *overrides, "train.num_threads=1"], origin, env)
    assert (origin / "conf/experiment/tuned_logreg.yaml").is_file(), exported.stdout
    assert len(optuna.load_study(study_name=study, storage=_with_password(storage, pg_password))
               .trials) == 3  # fmt: skip


def _with_password(url: str, password: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    user, host = parts.netloc.split("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password)}@{host}"))


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.slurm
def test_a_node_without_the_server_spools_and_a_warned_task_requeues_and_resumes(
    slurm: str, services: Services, as_user: Any, env_cache: Path, tmp_path: Path
) -> None:
    """One task on a node that cannot reach the tracking server (its runs spooled next to the
    job from the start), warned of its time limit (SIGUSR1, what `--signal=B:USR1@...` sends):
    it stops its stages, saves what they finished to the DVC remote's run cache and requeues;
    the second start restores those stages instead of rerunning them. `collect` then sends
    both starts' runs to the server."""
    import socket

    from mlflow import MlflowClient

    experiment = f"requeue-{os.getpid()}-{random.randrange(1 << 30):x}"
    origin, env = _cluster_project(tmp_path, slurm, services, env_cache)
    with socket.socket() as free:  # a port nothing listens on: the node has no route
        free.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{free.getsockname()[1]}"
    cli = str(VENV_BIN / "deep-repro")
    out = run(
        [cli, "submit", "-S", f"tracking.experiment={experiment}", "--name", "r"],
        origin,
        {**env, "MLFLOW_TRACKING_URI": unreachable},
    ).stdout
    job_id = out.split("submitted job ")[1].split(":")[0]
    job_dir = Path(out.split("job directory ")[1].split()[0])
    log_file, state_file = job_dir / "logs" / "0.log", job_dir / "tasks" / "0.json"

    # The warning comes once a stage after split has started (DVC has then saved split's
    # outputs and run-cache entry: a stop during that bookkeeping would lose them).
    deadline = time.monotonic() + 600
    while not any(f"Running stage '{s}'" in (log_file.read_text() if log_file.exists() else "")
                  for s in ("analyze", "train")):  # fmt: skip
        assert time.monotonic() < deadline, "no stage after split ever started"
        time.sleep(0.5)
    warned = f"{job_id}_0"
    subprocess.run(["scancel", "--batch", "--signal=USR1", warned], env=env, check=True, timeout=60)
    while True:
        state = json.loads(state_file.read_text())
        if (
            state["state"] in ("done", "failed")
            and not run(["squeue", "-h", "-j", job_id], origin, env).stdout.strip()
        ):
            break
        assert time.monotonic() < deadline, state
        time.sleep(1)
    log = log_file.read_text()
    assert state["state"] == "done" and state["restarts"] == 1, (state, log[-3000:])
    assert state["spooled"] and "no route to the tracking server" in log
    assert "requeueing: the task resumes from the stages it finished" in log

    client: Any = MlflowClient(tracking_uri=services.mlflow_url)
    assert client.get_experiment_by_name(experiment) is None  # nothing reached the server
    collected = run([cli, "collect"], origin, env).stdout
    assert "task 0: spooled runs: synced" in collected, collected
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    pipelines = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "pipeline"]
    assert len(pipelines) == 2, [(r.info.status, r.data.tags) for r in pipelines]
    second = max(pipelines, key=lambda r: r.info.start_time)
    assert second.info.status == "FINISHED"
    assert second.data.tags["deep_repro.slurm.array_job_id"] == job_id
    rerun = {
        r.data.tags[tracking.TAG_STAGE]
        for r in runs
        if r.data.tags.get(tracking.TAG_PARENT) == second.info.run_id
    }
    assert "evaluate" in rerun and not rerun & {"download", "preprocess", "split"}, rerun
