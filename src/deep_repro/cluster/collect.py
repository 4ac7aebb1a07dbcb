"""`deep-repro collect`: the cluster's finished experiments into this checkout, and what failed.

State comes from the tasks' own records (`<job>/tasks/<i>.json`) plus `squeue` for tasks still
queued or running: many clusters have no accounting database, so `sacct` is never needed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError

COLLECTED = "collected.json"  # in a job dir: the experiments already pulled


@dataclass
class TaskState:
    index: int
    state: str  # pending | running | done | failed | lost
    experiment: str = ""
    reason: str = ""
    log: str = ""


def read_job(job_dir: Path) -> dict[str, Any]:
    """`job.json`: the SLURM job ids the job was submitted (and resubmitted) as."""
    path = job_dir / "job.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def jobs(root: Path, jobs_dir: str) -> list[Path]:
    base = root / jobs_dir / "jobs"
    return sorted(p for p in base.glob("*") if (p / "manifest.json").is_file())


def queued(job_ids: list[str]) -> dict[int, str]:
    """Array task -> squeue state (PENDING, RUNNING, ...) for the tasks SLURM still holds."""
    if not job_ids:
        return {}
    done = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%K %T"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:  # an unknown (long finished) job id: nothing queued
        return {}
    states = {}
    for line in done.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        if task.isdigit():
            states[int(task)] = state
    return states


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "empty log"


def task_states(job_dir: Path) -> list[TaskState]:
    manifest = json.loads((job_dir / "manifest.json").read_text())
    in_queue = queued(read_job(job_dir).get("job_ids", []))
    states = []
    for i in range(len(manifest["tasks"])):
        log = job_dir / "logs" / f"{i}.log"
        path = job_dir / "tasks" / f"{i}.json"
        recorded: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        state = recorded.get("state", "")
        if i in in_queue:
            state = "pending" if in_queue[i] == "PENDING" else "running"
        elif state in ("", "running", "requeued"):  # gone from the queue, no end recorded
            state = "lost"
        reason = recorded.get("reason", "")
        if state == "lost":
            reason = f"ended without recording a result: {_last_line(log)}"
        states.append(TaskState(i, state, recorded.get("experiment", ""), reason, str(log)))
    return states


def pull(root: Path, experiment: str) -> None:
    done = subprocess.run(
        ["dvc", "exp", "pull", "origin", experiment],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise DeepReproError(f"dvc exp pull origin {experiment}: {why}")


def send_spools(job_dir: Path) -> list[str]:
    """Replay what tasks spooled (no route to the server from their node, or an outage) into
    the tracking store of this environment; one line per task with a spool."""
    from deep_repro.tracking.sync import sync

    spools = sorted(
        (p for p in (job_dir / "spool").glob("*") if any(p.glob("*.jsonl"))),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    if not spools:
        return []
    from mlflow import MlflowClient

    from deep_repro import tracking

    uri = tracking.project_tracking_uri()[0]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    lines = []
    for spool in spools:
        report = sync(client, spool)
        lines.append(f"  task {spool.name}: spooled runs: {report.summary()}")
        lines += [f"    not synced: {problem}" for problem in report.problems]
    return lines


def collect(root: Path, jobs_dir: str) -> tuple[list[str], int]:
    """Pull every finished task's experiment not pulled before; (report lines, failures)."""
    lines, failures = [], 0
    for job_dir in jobs(root, jobs_dir):
        collected_path = job_dir / COLLECTED
        collected = (
            set(json.loads(collected_path.read_text())) if collected_path.exists() else set()
        )
        ids = ", ".join(read_job(job_dir).get("job_ids", [])) or "not submitted"
        lines.append(f"job {job_dir.name} (SLURM {ids}):")
        for t in task_states(job_dir):
            if t.state == "done" and not t.experiment:  # a tuning worker: its trials are
                lines.append(f"  task {t.index}: done (a tuning worker)")  # in the study
            elif t.state == "done" and t.experiment not in collected:
                pull(root, t.experiment)
                collected.add(t.experiment)
                collected_path.write_text(json.dumps(sorted(collected)) + "\n")
                lines.append(f"  task {t.index}: done -> experiment {t.experiment} (pulled)")
            elif t.state == "done":
                lines.append(f"  task {t.index}: done -> experiment {t.experiment}")
            elif t.state in ("failed", "lost"):
                failures += 1
                lines.append(f"  task {t.index}: {t.state}: {t.reason} (log {t.log})")
            else:
                lines.append(f"  task {t.index}: {t.state}")
        lines += send_spools(job_dir)
    if not lines:
        lines.append("no cluster jobs here (`deep-repro submit` makes them)")
    return lines, failures
