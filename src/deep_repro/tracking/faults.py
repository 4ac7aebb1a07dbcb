"""Runs that end badly: who owns a run, orphans of killed processes, and why a run failed.

Owner
-----
Every pipeline and stage run is tagged with the process that owns it (host, pid, process start
time): the `dvc` process of the invocation for a pipeline run, the stage's own process for a
stage run. Tuning trials record the same owner in their Optuna user attrs. A process killed with
SIGKILL (or a crashed machine) cannot close its run, so MLflow would show it RUNNING forever.

Orphans
-------
`fail_orphan_runs` (at the start of every stage run, and in `deep-repro lineage/leaderboard`)
marks FAILED, with the reason in `deep_repro.fail_reason`, the RUNNING runs of the experiment
whose owner on this host is gone: its pid is dead, or was reused by a process with another start
time. Runs owned by other hosts are left alone (their processes cannot be checked from here).

Failure reasons
---------------
A stage that fails tags its one-line error on its run and its pipeline run, and logs the last
`LOG_TAIL_LINES` lines of its log as the artifact `logs/stage.log`.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.errors import Terminated, _RedactCredentials, first_line
from deep_repro.tracking.store import TAG_FAIL_REASON, TAG_PREFIX, end_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG_OWNER_HOST = f"{TAG_PREFIX}.owner.host"
TAG_OWNER_PID = f"{TAG_PREFIX}.owner.pid"
TAG_OWNER_STARTED = f"{TAG_PREFIX}.owner.started"
LOG_TAIL_LINES = 200


# --------------------------------------------------------------------------- owner
def owner() -> dict[str, Any]:
    """This process as the owner of a run or trial: host, pid, process start time."""
    import psutil

    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def invocation_owner(key: str) -> dict[str, Any] | None:
    """The owner encoded in an invocation key (`host:pid:start`, see `invocation_key`); None
    for a key set by hand (DEEP_REPRO_INVOCATION) that names no process."""
    host, _, rest = key.partition(":")
    pid, _, started = rest.partition(":")
    try:
        return {"host": host, "pid": int(pid), "started": float(started)}
    except ValueError:
        return None


def owner_tags(who: Mapping[str, Any] | None) -> dict[str, str]:
    if who is None:
        return {}
    return {
        TAG_OWNER_HOST: str(who["host"]),
        TAG_OWNER_PID: str(who["pid"]),
        TAG_OWNER_STARTED: f"{float(who['started']):.3f}",
    }


def owner_alive(who: Mapping[str, Any]) -> bool:
    """Whether the owner process (on this host) is still running; True when it cannot tell."""
    import psutil

    try:
        proc = psutil.Process(int(who["pid"]))
        if abs(proc.create_time() - float(who["started"])) > 1.0:
            return False  # the pid was reused by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, KeyError, TypeError, ValueError):
        return True


# --------------------------------------------------------------------------- orphans
def fail_orphan_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of `exp_id` owned by a dead process on this host; returns
    their ids. Never raises: a sweep must not stop the stage or command that runs it."""
    host = socket.gethostname()
    try:
        runs = client.search_runs(
            [exp_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_OWNER_HOST}` = '{host}'",
            max_results=1000,
        )
    except Exception as exc:
        log.warning("cannot look for orphaned MLflow runs: %s", first_line(exc))
        return []
    failed = []
    for run in runs:
        tags = run.data.tags
        who = {"host": host, "pid": tags.get(TAG_OWNER_PID), "started": tags.get(TAG_OWNER_STARTED)}
        if owner_alive(who):
            continue
        reason = (
            f"orphaned: its process (pid {who['pid']} on {host}) ended without closing "
            "the run (killed?); marked FAILED by a later invocation"
        )
        try:
            end_run(client, run.info.run_id, "FAILED", {TAG_FAIL_REASON: reason}, missing_ok=True)
        except Exception as exc:
            log.warning("cannot close orphaned MLflow run %s: %s", run.info.run_id, first_line(exc))
            continue
        log.warning(
            "MLflow run %s (%s) was left RUNNING by a dead process; marked FAILED",
            run.info.run_id,
            run.info.run_name,
        )
        failed.append(run.info.run_id)
    return failed


# --------------------------------------------------------------------------- failure reasons
class LogTail(logging.Handler):
    """The last `LOG_TAIL_LINES` log lines of this process (credentials redacted)."""

    def __init__(self, lines: int = LOG_TAIL_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.addFilter(_RedactCredentials())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must never fail the stage
            self.handleError(record)

    def attach(self) -> LogTail:
        logging.getLogger().addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)


def failure_reason(exc: BaseException) -> str:
    """The one-line `deep_repro.fail_reason` for how a run's body ended."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM: kill, scancel or a time limit)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C / SIGINT)"
    return first_line(exc, limit=2000)


def record_failure(
    client: MlflowClient, run_id: str, exc: BaseException, tail: LogTail, tmp: Path
) -> str:
    """Log the tail of the stage's log (ending with its error) as `logs/stage.log` on the run;
    return the one-line reason for `deep_repro.fail_reason`."""
    reason = failure_reason(exc)
    target = tmp / "logs" / "stage.log"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join([*tail.lines, f"error: {reason}", ""]))
        client.log_artifact(run_id, str(target), "logs")
    except Exception as err:  # the stage's own error is the one the user must see
        log.warning("cannot log the stage log to MLflow run %s: %s", run_id, first_line(err))
    return reason
