"""`deep-repro submit`: a sweep of experiments as one SLURM job array.

Why not `dvc exp run --queue` on the cluster: DVC holds a repository lock, so parallel jobs in one
checkout block each other (treeverse/dvc#7419). Each array task therefore works in its own clone
of the submitted commit on the node's scratch space, with the venv of that commit's uv.lock from
the shared cache (built once, reused by every task), runs `dvc exp run` there and sends the
experiment back: its git refs to the remote (`dvc exp push`), its outputs and run cache to the
DVC remote. `collect` brings them into this checkout. Plain `sbatch` is used rather than
submitit: a task runs shell commands (git, dvc) in a fresh clone rather than a pickled Python
function of this process, and nothing but the job script has to exist on the nodes.

A job is a directory on the shared filesystem, `<jobs_dir>/<job>/`: `manifest.json` (commit,
remote, each task's overrides), `job.sh` (what was submitted), `job.json` (the SLURM job id),
`tasks/<i>.json` (each task's state, written by the task) and `logs/<i>.log`.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deep_repro.cluster.settings import ClusterSettings
from deep_repro.errors import DeepReproError, first_line

log = logging.getLogger(__name__)

FORMAT = "deep-repro/cluster-job/1"


def expand(sets: list[str]) -> list[list[str]]:
    """`-S` overrides -> one override list per task, by `dvc exp run --queue`'s own sweep rules
    (`a=1,2` -> two tasks, `range(1,4)`, `choice(...)`; several sweeps multiply)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    if not sets:
        return [[]]
    path_overrides = to_path_overrides(sets)
    try:
        sweep = any(
            o.is_sweep_override() for ov in path_overrides.values() for o in to_hydra_overrides(ov)
        )
        if not sweep:
            return [list(next(iter(path_overrides.values())))]
        return [list(next(iter(s.values()))) for s in get_hydra_sweeps(path_overrides)]
    except Exception as exc:  # Hydra's parser: a malformed override
        raise DeepReproError(f"-S {' '.join(sets)}: {first_line(exc)}") from None


def check_overrides(root: Path, tasks: list[list[str]]) -> None:
    """Every task's config composes and validates here, before anything is submitted."""
    from deep_repro import config, models  # noqa: F401 - models registers the architectures

    for overrides in tasks:
        try:
            config.validate(config.compose(overrides, root / "conf"))
        except DeepReproError as exc:
            raise DeepReproError(f"task {' '.join(overrides) or '(defaults)'}: {exc}") from None


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DeepReproError(f"git {args[0]}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def pushed_commit(root: Path, remote_name: str) -> tuple[str, str]:
    """(HEAD, the remote's URL): a clean tree whose commit the remote has, since every task
    clones it from there (and pushes its experiment back there)."""
    from deep_repro.reproduction import workspace

    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    if changed:
        files = ", ".join(line[3:] for line in changed.splitlines()[:5])
        raise DeepReproError(
            f"uncommitted changes ({files}): tasks run the commit, not the working tree; commit "
            "them (and push)"
        )
    commit = _git(root, "rev-parse", "HEAD")
    try:
        url = _git(root, "remote", "get-url", remote_name)
    except DeepReproError:
        raise DeepReproError(
            f"no git remote {remote_name!r}: tasks clone the commit from a remote the nodes "
            "reach (a bare repository on the shared filesystem: `git init --bare ...; git remote "
            "add origin ...`)"
        ) from None
    if not workspace.has_commit(workspace.mirror(url), commit):
        raise DeepReproError(
            f"commit {commit[:12]} is not in {remote_name} ({url}): `git push {remote_name}` first"
        )
    return commit, url


@dataclass(frozen=True)
class Job:
    path: Path
    job_id: str
    tasks: int


def job_script(s: ClusterSettings, job_dir: Path, n: int, name: str, commit: str, url: str) -> str:
    """The batch script: one array task per override list; the task itself runs in Python
    from the submitted commit's own code."""
    array = f"0-{n - 1}" + (f"%{s.throttle}" if s.throttle else "")
    opts = [
        f"--job-name={name}",
        f"--array={array}",
        f"--output={job_dir}/logs/%a.log",
        f"--cpus-per-task={s.cpus}",
        f"--time={s.time}",
        # A minute before the time limit, SIGUSR1 to the task: its stages stop (runs closed
        # KILLED), what they finished goes to the run cache, and it requeues itself.
        f"--signal=B:USR1@{s.warn_s}",
        "--open-mode=append",  # a requeued task's log continues its first one
    ]
    if s.requeue:
        opts.append("--requeue")
    for flag, value in (
        ("partition", s.partition),
        ("mem", s.mem),
        ("account", s.account),
        ("qos", s.qos),
        ("constraint", s.constraint),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    if s.gpus:
        opts.append(f"--gpus-per-task={s.gpus}")
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts + s.sbatch_args)]
    lines += ["set -euo pipefail", *s.setup]
    work = f"{s.scratch}/deep-repro-${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    q = shlex.quote
    lines += [
        f'work="{work}"',
        'rm -rf "$work"',
        f'git clone -q --no-checkout {q(url)} "$work"',
        f'git -C "$work" checkout -q --detach {commit}',
        'cd "$work"',
        'export PYTHONPATH="$work/src"',
        f"exec {q(sys.executable)} -m deep_repro.cluster.task {q(str(job_dir))} "
        '"$SLURM_ARRAY_TASK_ID" "$work"',
    ]
    return "\n".join(lines) + "\n"


def tune_workers(root: Path, overrides: list[str], n: int) -> list[list[str]]:
    """`deep-repro tune OVERRIDES --submit N`: N identical workers of one study, which must be
    in PostgreSQL (the workers run on several nodes: a journal file or sqlite database is
    safe on one machine only, not on a shared filesystem)."""
    from deep_repro import config
    from deep_repro.tuning.storage import is_postgresql

    if n < 1:
        raise DeepReproError(f"--submit {n}: expected a number of workers >= 1")
    check_overrides(root, [overrides])
    storage = config.compose(overrides, root / "conf")["tune"]["storage"]
    if not storage or not is_postgresql(str(storage)):
        raise DeepReproError(
            f"tune.storage = {storage}: workers on a cluster share one study through "
            "PostgreSQL (tune.storage=postgresql://USER@HOST/DB, password in PGPASSWORD); a "
            "journal file or sqlite database is for one machine"
        )
    return [list(overrides) for _ in range(n)]


def submit(
    root: Path,
    s: ClusterSettings,
    sets: list[str],
    name: str,
    dry_run: bool = False,
    tune_workers_of: tuple[list[str], int] | None = None,
) -> Job:
    """Validate, write the job directory, `sbatch` the array; returns the job. With
    `tune_workers_of` = (tune overrides, N): N workers of one Optuna study instead of a sweep."""
    import shutil

    from deep_repro.files import atomic_path

    if shutil.which("sbatch") is None:
        raise DeepReproError("sbatch not found: run this on the cluster's login node")
    if tune_workers_of is None:
        command, tasks = "exp", expand(sets)
        check_overrides(root, tasks)
    else:
        command, tasks = "tune", tune_workers(root, *tune_workers_of)
    commit, url = pushed_commit(root, s.git_remote)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    job_dir = (root / s.jobs_dir / "jobs" / f"{stamp}-{secrets.token_hex(2)}").resolve()
    (job_dir / "logs").mkdir(parents=True)
    (job_dir / "tasks").mkdir()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "command": command,
        "commit": commit,
        "remote": url,
        "cpus": s.cpus,
        "cache": s.cache,
        "tasks": tasks,
    }
    with atomic_path(job_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    script = job_script(s, job_dir, len(tasks), name, commit, url)
    (job_dir / "job.sh").write_text(script)
    if dry_run:
        return Job(job_dir, "", len(tasks))
    try:
        job_id = _sbatch(root, job_dir / "job.sh", "the job")
    except DeepReproError:
        shutil.rmtree(job_dir)
        raise
    with atomic_path(job_dir / "job.json") as tmp:
        tmp.write_text(json.dumps({"job_ids": [job_id], "submitted": stamp}) + "\n")
    return Job(job_dir, job_id, len(tasks))


def _sbatch(root: Path, script: Path, what: str, *options: str) -> str:
    """Submit `script` (its #SBATCH lines, then `options`); the SLURM job id."""
    done = subprocess.run(
        ["sbatch", "--parsable", *options, str(script)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise DeepReproError(f"sbatch refused {what}: {why}")
    return done.stdout.strip().split(";")[0]


def find_job(root: Path, s: ClusterSettings, ref: str) -> Path:
    """A job directory by its name or by a SLURM job id it was (re)submitted as."""
    from deep_repro.cluster.collect import jobs, read_job

    for job_dir in jobs(root, s.jobs_dir):
        if ref == job_dir.name or ref in read_job(job_dir).get("job_ids", []):
            return job_dir
    raise DeepReproError(f"--resubmit {ref}: no job of that name or id in {s.jobs_dir}/jobs")


def resubmit(root: Path, s: ClusterSettings, ref: str) -> Job:
    """Submit again, as one array, only the tasks of job `ref` that failed or were lost: the
    same commit and overrides (the job script is reused), new experiment names."""
    from deep_repro.cluster.collect import read_job, task_states
    from deep_repro.files import atomic_path

    job_dir = find_job(root, s, ref)
    failed = [t.index for t in task_states(job_dir) if t.state in ("failed", "lost")]
    if not failed:
        raise DeepReproError(f"job {job_dir.name}: no failed task to resubmit")
    for i in failed:  # their old end is history now: the log keeps it
        (job_dir / "tasks" / f"{i}.json").unlink(missing_ok=True)
    array = ",".join(map(str, failed)) + (f"%{s.throttle}" if s.throttle else "")
    job_id = _sbatch(root, job_dir / "job.sh", "the resubmission", f"--array={array}")
    job = read_job(job_dir)
    job["job_ids"] = [*job.get("job_ids", []), job_id]
    with atomic_path(job_dir / "job.json") as tmp:
        tmp.write_text(json.dumps(job) + "\n")
    return Job(job_dir, job_id, len(failed))
