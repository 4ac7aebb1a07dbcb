"""The cluster's subcommands of `deep-repro`: submit, collect."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError

POLL_S = 5.0
SBATCH_FLAGS = (
    *("partition", "time", "cpus", "mem", "gpus"),
    *("account", "qos", "constraint", "throttle"),
)


def _settings(args: argparse.Namespace) -> Any:
    from deep_repro.cluster import settings
    from deep_repro.paths import repo_root

    s = settings.load(repo_root(), Path(args.settings) if args.settings else None)
    flags = {k: getattr(args, k) for k in SBATCH_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "sbatch_arg", None):
        flags["sbatch_args"] = [*s.sbatch_args, *args.sbatch_arg]
    return s.model_copy(update=flags)


def cmd_submit(args: argparse.Namespace) -> int:
    from deep_repro.cluster import submit
    from deep_repro.paths import repo_root

    root = repo_root()
    s = _settings(args)
    if args.resubmit:
        if args.set_param:
            raise DeepReproError("--resubmit reruns a job's own overrides: it takes no -S")
        job = submit.resubmit(root, s, args.resubmit)
    else:
        job = submit.submit(root, s, args.set_param, args.name, dry_run=args.dry_run)
    if args.dry_run:
        print(f"{job.tasks} task(s); job script (not submitted): {job.path / 'job.sh'}")
        return 0
    return _follow(job, args.wait)


def submit_tune(args: argparse.Namespace) -> int:
    """`deep-repro tune OVERRIDES --submit N`: N workers of one PostgreSQL study, an array."""
    from deep_repro.cluster import submit
    from deep_repro.paths import repo_root

    s = _settings(args)
    job = submit.submit(repo_root(), s, [], "tune", tune_workers_of=(args.overrides, args.submit))
    # The workers train with the cores they were given, part of the study's setup: the export
    # (the same study, no trial left to run) names them too.
    export = ["deep-repro", "tune", *args.overrides, f"train.num_threads={s.cpus}"]
    code = _follow(job, args.wait)
    print(f"then, here, to export the study's best: uv run {' '.join(export)}")
    return code


def _follow(job: Any, wait: bool) -> int:
    """Say what was submitted; with `wait`, block until every task ended and list them."""
    from deep_repro.cluster import collect

    print(f"submitted job {job.job_id}: {job.tasks} task(s); job directory {job.path}")
    if not wait:
        print("`uv run deep-repro collect` reports the tasks and brings finished experiments here")
        return 0
    while True:
        states = collect.task_states(job.path)
        if all(t.state in ("done", "failed", "lost") for t in states):
            break
        time.sleep(POLL_S)
    for t in states:
        if t.state == "done":
            end = f"experiment {t.experiment}" if t.experiment else "a tuning worker"
        else:
            end = f"{t.reason} (log {t.log})"
        print(f"task {t.index}: {t.state}: {end}")
    return 0 if all(t.state == "done" for t in states) else 1


def cmd_collect(args: argparse.Namespace) -> int:
    from deep_repro.cluster import collect
    from deep_repro.paths import repo_root

    s = _settings(args)
    lines, failures = collect.collect(repo_root(), s.jobs_dir)
    print("\n".join(lines))
    return 1 if failures else 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="run experiments as a SLURM job array (one clone per task, results pushed back)",
        description="Each combination of the -S sweeps (the syntax of `dvc exp run --queue`) "
        "becomes one array task that clones this commit on the node, runs `dvc exp run` and "
        "pushes the experiment to the git remote and its outputs to the DVC remote. Defaults "
        "come from cluster.yaml; flags win.",
    )
    p.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="an override or sweep, e.g. -S 'model.lr=0.001,0.003' -S 'seed=1,2'",
    )
    p.add_argument("--name", default="slurm", help="experiment names: NAME-JOBID-TASK")
    p.add_argument("--partition")
    p.add_argument("--time", help="per task, e.g. 02:00:00")
    p.add_argument("--cpus", type=int, help="cores per task (also train.num_threads)")
    p.add_argument("--gpus", type=int, help="GPUs per task (0: none)")
    p.add_argument("--mem")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--throttle", type=int, help="at most N tasks at once (array %%N)")
    p.add_argument("--sbatch-arg", action="append", metavar="ARG", help="passed to sbatch as is")
    p.add_argument("--settings", help="cluster settings file (default: cluster.yaml if present)")
    p.add_argument("--wait", action="store_true", help="block until every task ended")
    p.add_argument(
        "--resubmit",
        metavar="JOB",
        help="submit again only the failed tasks of JOB (its directory name or a SLURM job id)",
    )
    p.add_argument("--dry-run", action="store_true", help="write the job script, submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "collect",
        help="bring finished cluster experiments here (dvc exp pull); report failed tasks",
    )
    p.add_argument("--settings", help="cluster settings file (default: cluster.yaml if present)")
    p.set_defaults(func=cmd_collect)
