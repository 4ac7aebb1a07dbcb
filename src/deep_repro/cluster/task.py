"""One array task on a node: `python -m deep_repro.cluster.task JOB_DIR INDEX CLONE`.

Started by the job script in a fresh clone of the submitted commit (this very code comes from
it). It gets the venv of the commit's uv.lock from the shared cache, runs `dvc exp run` with the
task's overrides, sends the experiment back (git refs to the remote, outputs + run cache to the
DVC remote), records its state in `<job>/tasks/<INDEX>.json` and removes the clone. The MLflow
login comes from the submitter's environment (sbatch exports it), never from a file. SIGTERM
(scancel, or the time-limit warning) is passed on to DVC, whose stages close their runs as
KILLED; the task then records itself as failed with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The tracking server and its login are the submitter's: kept when the rest of the submitter's
# MLflow/DVC settings are dropped from the task's environment.
PASS_THROUGH = (
    "PGPASSWORD",  # a shared study's PostgreSQL login (tune.storage names no password)
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
)


def task_name(manifest: dict[str, Any], index: int) -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "local")
    return f"{manifest['name']}-{job}-{index + 1}"


def write_state(job_dir: Path, index: int, **state: Any) -> None:
    path = job_dir / "tasks" / f"{index}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


GRACE_S = 45  # for the stages to close their runs (warn_s leaves 120 s before the limit)


class Stopped(Exception):
    """SIGTERM: `scancel` (or the scheduler's end of the job): the task fails, with why."""


class TimeLimit(Stopped):
    """SIGUSR1, which the job script asks for a minute before the time limit: the stages
    stop, what they finished goes to the remote's run cache, and the task is requeued."""


def run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    """Run one step; its output goes to the task's log. SIGTERM stops it (and us)."""
    print(f"+ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    tree: list[Any] = []

    def forward(signum: int, _frame: Any) -> None:
        # SIGTERM to every process below: the time-limit warning (USR1) reaches this process
        # only, and DVC does not pass a signal on to the stage it runs. (After `scancel` they
        # all have SIGTERM already: a stage ignores the copy, see errors._on_sigterm.)
        import psutil

        with contextlib.suppress(psutil.Error):
            tree.extend(psutil.Process(proc.pid).children(recursive=True))
        for p in [proc, *tree]:
            with contextlib.suppress(Exception):
                p.send_signal(signal.SIGTERM)
        if signum == signal.SIGUSR1:
            raise TimeLimit(f"{what}: stopped, the time limit is near (SIGUSR1)")
        raise Stopped(f"{what}: stopped by SIGTERM (scancel)")

    old = signal.signal(signal.SIGTERM, forward)
    old_usr1 = signal.signal(signal.SIGUSR1, forward)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip())
        proc.wait()
    except Stopped:
        # The stage closes its runs (KILLED) before this task exits: once the batch process
        # ends, SLURM kills what is left of the job at once.
        import psutil

        waiting = list(tree)
        with contextlib.suppress(psutil.Error):
            waiting.append(psutil.Process(proc.pid))
        _, alive = psutil.wait_procs(waiting, timeout=GRACE_S)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGUSR1, old_usr1)
        sys.stdout.flush()
    if proc.returncode != 0:
        reason = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {reason.strip()}")
    return "\n".join(lines)


def close_leftover_runs(clone: Path, reason: str) -> None:
    """Runs of this SLURM job still RUNNING once its processes are gone: the pipeline run
    between two stages (no stage was there to close it), a stage killed before it could. They
    are closed KILLED with the reason here, on the node, rather than left for a later
    invocation on the same host to notice (on a cluster there may be none)."""
    import yaml

    job = os.environ.get("SLURM_JOB_ID")
    if not job or not os.environ.get("MLFLOW_TRACKING_URI") or not server_reachable(5.0):
        return  # a local store goes with the clone; an unreachable one has the spool
    try:
        from mlflow import MlflowClient

        from deep_repro.tracking import TAG_FAIL_REASON, TAG_PREFIX

        params = yaml.safe_load((clone / "params.yaml").read_text())
        client = MlflowClient()
        exp = client.get_experiment_by_name(params["tracking"]["experiment"])
        if exp is None:
            return
        left = client.search_runs(
            [exp.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{TAG_PREFIX}.slurm.job_id` = '{job}'",
        )
        for run in left:
            client.set_tag(run.info.run_id, TAG_FAIL_REASON, reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            print(f"closed run {run.info.run_id} as KILLED", flush=True)
    except Exception as exc:  # the server is gone too: a later invocation will notice
        print(f"could not close this job's runs: {str(exc).splitlines()[0]}", flush=True)


def server_reachable(timeout_s: float = 10.0) -> bool:
    """Whether this node reaches the tracking server (its /health page); a local store, or
    none configured, counts as reachable."""
    import urllib.error
    import urllib.request

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def requeue(clone: Path, env: dict[str, str], dvc: str, has_remote: bool) -> str | None:
    """Send what the finished stages computed to the DVC remote's run cache, then ask SLURM to
    requeue this task: the next start restores those stages instead of rerunning them (resume
    at stage granularity). Returns why it could not, or None."""
    if has_remote:
        try:
            run([dvc, "push", "--run-cache"], clone, env, "dvc push --run-cache")
        except RuntimeError as exc:
            print(f"(finished stages not saved: {exc})", flush=True)
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a SLURM job"
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["scontrol requeue failed"])[-1]
    return None


def main(job_dir: Path, index: int, clone: Path) -> int:
    from deep_repro.reproduction import workspace
    from deep_repro.tracking.spool import OFFLINE_ENV, SPOOL_DIR_ENV

    manifest = json.loads((job_dir / "manifest.json").read_text())
    overrides: list[str] = manifest["tasks"][index]
    name = task_name(manifest, index)
    started = time.time()
    is_exp = manifest.get("command", "exp") == "exp"
    common = {
        "experiment": name if is_exp else "",
        "overrides": overrides,
        "node": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }
    write_state(job_dir, index, state="running", **common)
    # The time-limit warning outside a step (while the venv is built) must not kill the task
    # (SIGUSR1's default action): the steps handle it; before them, the limit itself decides.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cache = Path(os.path.expandvars(manifest["cache"])) if manifest.get("cache") else None
    try:
        venv = workspace.ensure_venv(clone, cache)
        keep = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        # Spooled runs (an outage, or no route to the server at all) go next to the job, not
        # into the clone that is removed at the end: `collect` sends them.
        keep[SPOOL_DIR_ENV] = spool = str(job_dir / "spool" / str(index))
        if not server_reachable():
            keep[OFFLINE_ENV] = "1"
            common["spooled"] = True
            print(f"no route to the tracking server: runs spooled to {spool}", flush=True)
        env = workspace.project_env(clone, venv, **keep)
        dvc = str(venv / "bin" / "dvc")
        has_remote = bool(
            subprocess.run(
                [dvc, "remote", "list"], cwd=clone, env=env, capture_output=True, text=True
            ).stdout.strip()
        )
        if has_remote:  # what other runs already computed: no stage reruns for nothing
            try:
                run([dvc, "pull", "--run-cache", "--allow-missing"], clone, env, "dvc pull")
            except RuntimeError as exc:
                print(f"(going on without the remote's outputs: {exc})", flush=True)
        threads = f"train.num_threads={manifest['cpus']}"
        # A stage whose inputs, params and code match a run-cache entry (another task's, or
        # this task's before a requeue) is restored from the remote instead of rerun.
        pull = ["--pull"] if has_remote else []
        if not is_exp:  # a worker of one shared Optuna study
            run([dvc, "repro", *pull, "split"], clone, env, "dvc repro split")
            python = str(venv / "bin" / "python")
            tune = [python, "-m", "deep_repro.cli", "tune", *overrides, threads]
            run(tune, clone, env, "deep-repro tune")
        else:
            sets = [a for o in [*overrides, threads] for a in ("-S", o)]
            run([dvc, "exp", "run", "-n", name, *pull, *sets], clone, env, "dvc exp run")
            push = [dvc, "exp", "push", "origin", name]
            push += ["--run-cache"] if has_remote else ["--no-cache"]
            run(push, clone, env, "dvc exp push")
    except TimeLimit as exc:
        close_leftover_runs(clone, f"{exc}: requeued to resume")
        # Recorded first: requeueing ends this process (SLURM stops the job to queue it again).
        write_state(job_dir, index, state="requeued", reason=str(exc),
                    seconds=round(time.time() - started, 1), **common)  # fmt: skip
        print("requeueing: the task resumes from the stages it finished", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        why = requeue(clone, env, dvc, has_remote)
        if why is None:
            return 0
        write_state(job_dir, index, state="failed", reason=f"{exc}; not requeued: {why}",
                    seconds=round(time.time() - started, 1), **common)  # fmt: skip
        print(f"task failed: not requeued: {why}", flush=True)
        return 1
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, Stopped):
            close_leftover_runs(clone, reason)
        write_state(job_dir, index, state="failed", reason=reason[:500],
                    seconds=round(time.time() - started, 1), **common)  # fmt: skip
        print(f"task failed: {reason}", flush=True)
        return 1
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    write_state(job_dir, index, state="done", seconds=round(time.time() - started, 1), **common)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
