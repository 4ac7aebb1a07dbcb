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


GRACE_S = 45  # within the minute `--signal=B:TERM@60` leaves before the time limit


class Stopped(Exception):
    pass


def run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    """Run one step; its output goes to the task's log. SIGTERM stops it (and us)."""
    print(f"+ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    tree: list[Any] = []

    def forward(signum: int, _frame: Any) -> None:
        # Every process below: `--signal=B:TERM@60` (the time limit near) reaches this process
        # only, and DVC does not pass a signal on to the stage it runs. (After `scancel` they
        # all have it already: a stage ignores the copy, see errors._on_sigterm.)
        import psutil

        with contextlib.suppress(psutil.Error):
            tree.extend(psutil.Process(proc.pid).children(recursive=True))
        for p in [proc, *tree]:
            with contextlib.suppress(Exception):
                p.send_signal(signum)
        name = signal.Signals(signum).name
        raise Stopped(f"{what}: stopped by {name} (scancel, or the time limit is near)")

    old = signal.signal(signal.SIGTERM, forward)
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
    if not job or not os.environ.get("MLFLOW_TRACKING_URI"):
        return  # a local store lives in the clone, which goes with it
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


def main(job_dir: Path, index: int, clone: Path) -> int:
    from deep_repro.reproduction import workspace

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
    }
    write_state(job_dir, index, state="running", **common)
    cache = Path(os.path.expandvars(manifest["cache"])) if manifest.get("cache") else None
    try:
        venv = workspace.ensure_venv(clone, cache)
        keep = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
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
        if not is_exp:  # a worker of one shared Optuna study
            run([dvc, "repro", "split"], clone, env, "dvc repro split")  # restored if pulled
            python = str(venv / "bin" / "python")
            tune = [python, "-m", "deep_repro.cli", "tune", *overrides, threads]
            run(tune, clone, env, "deep-repro tune")
        else:
            sets = [a for o in [*overrides, threads] for a in ("-S", o)]
            run([dvc, "exp", "run", "-n", name, *sets], clone, env, "dvc exp run")
            push = [dvc, "exp", "push", "origin", name]
            push += ["--run-cache"] if has_remote else ["--no-cache"]
            run(push, clone, env, "dvc exp push")
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
