"""Where a study lives, and what happens to the trials of workers that die.

Storage
-------
`tune.storage` is null (a journal file at `<store root>/optuna/journal.log`), a path ending in
`.log` (a journal file; relative paths are under the store root) or any Optuna RDB URL
(`sqlite:///...`, `postgresql://...`). Counting the study's trials and creating the next one
happen under a file lock (`Gate`), so workers on one machine never overshoot `tune.n_trials`.

Stale trials (a worker killed mid-trial)
----------------------------------------
Optuna's heartbeat (`tune.heartbeat_interval`, grace period twice that,
`RetryHeartbeatStaleTrialCallback`) exists only for RDB storages; `JournalStorage` does not
implement it (Optuna 5: it is not a `BaseHeartbeat`). So every trial also records its owner
(host, pid, process start time) in its user attrs and, on journal storage, a heartbeat timestamp
every `tune.heartbeat_interval` seconds. Before creating each trial, a worker fails RUNNING trials
whose owner process on this host is gone (immediately), or, for other hosts, whose heartbeat is
older than the grace period; the trial is re-queued with the same parameters (at most twice).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from deep_repro.errors import DeepReproError, scrub
from deep_repro.paths import store_root
from deep_repro.tracking.faults import owner as owner  # shared with pipeline/stage runs
from deep_repro.tracking.faults import owner_alive
from deep_repro.tuning.space import first_line

log = logging.getLogger(__name__)

MAX_RETRY = 2  # re-queue a trial whose worker died at most this often (a crash loop is a bug)
# Optuna user attrs of a trial (visible in optuna-dashboard).
ATTR_OWNER = "deep_repro.owner"
ATTR_HEARTBEAT = "deep_repro.heartbeat"
ATTR_RUN = "deep_repro.mlflow_run_id"
ATTR_OVERRIDES = "deep_repro.overrides"
ATTR_RETRY_OF = "deep_repro.retry_of"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass
class StudyStorage:
    storage: optuna.storages.BaseStorage
    description: str  # redacted, for logs and tags
    lock_path: Path  # serialises budget checks and trial creation on this machine
    journal: bool  # no Optuna heartbeat: we keep our own


def _resolve_journal(spec: str | None) -> Path | None:
    if spec is None:
        return store_root() / "optuna" / "journal.log"
    if spec.endswith(".log") and "://" not in spec:
        path = Path(spec).expanduser()
        return path if path.is_absolute() else store_root() / path
    return None


def open_storage(
    spec: str | None, study_name: str, heartbeat_interval: int, on_stale: StaleCallback
) -> StudyStorage:
    """Open the study storage, failing with one line if it is unreachable or unusable."""
    journal = _resolve_journal(spec)
    storage: optuna.storages.BaseStorage
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(journal))
            storage = optuna.storages.JournalStorage(backend)
        except Exception as exc:
            raise DeepReproError(
                f"tune.storage journal file {journal} is unusable "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        lock = journal.with_name(journal.name + ".tune.lock")
        return StudyStorage(storage, f"journal:{journal}", lock, journal=True)
    assert spec is not None
    url = spec
    shown = scrub(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        with contextlib.suppress(OSError):  # sqlite creates the file, not its folder
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}
    digest = hashlib.sha256(f"{url}\0{study_name}".encode()).hexdigest()[:16]
    lock_path = store_root() / "optuna" / "locks" / f"{digest}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # Creating a fresh sqlite schema from two processes at once races (as for MLflow).
    creation = FileLock(str(lock_path) + ".create") if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings(), creation or contextlib.nullcontext():
            warnings.simplefilter("ignore", ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=2 * heartbeat_interval,
                heartbeat_stale_trial_callback=on_stale,
                **kwargs,
            )
    except Exception as exc:
        raise DeepReproError(
            f"tune.storage {shown} is unreachable or unusable "
            f"({type(exc).__name__}: {scrub(first_line(exc))}); "
            "use a journal file (null or a path ending in .log) or a reachable "
            "database URL"
        ) from None
    return StudyStorage(storage, shown, lock_path, journal=False)


class Gate:
    """A file lock held from 'count the study's trials' until 'the new trial exists', so workers
    on one machine never overshoot `tune.n_trials`. The objective releases it first thing."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path), timeout=600)
        self._held = False

    def __enter__(self) -> Gate:
        self._lock.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- stale trials
def is_stale(trial: FrozenTrial, grace_s: float, by_heartbeat: bool) -> bool:
    who = trial.user_attrs.get(ATTR_OWNER)
    if isinstance(who, dict) and who.get("host") == socket.gethostname():
        return not owner_alive(who)
    if not by_heartbeat:
        return False  # RDB: Optuna's own heartbeat judges other hosts
    last = trial.user_attrs.get(ATTR_HEARTBEAT)
    if not isinstance(last, int | float):
        start = trial.datetime_start
        last = start.timestamp() if start is not None else time.time()
    return time.time() - float(last) > grace_s


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial, interval: float, enabled: bool) -> Iterator[None]:
    """Write a heartbeat timestamp into the trial every `interval` s (journal storage only)."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr(ATTR_HEARTBEAT, time.time())
            except (UpdateFinishedTrialError, KeyError):
                return
            except Exception as exc:  # a hiccup of the store must not kill the trial
                log.warning("heartbeat of trial %d failed: %s", trial.number, first_line(exc))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(
    study: optuna.Study, grace_s: float, by_heartbeat: bool, on_stale: StaleCallback
) -> None:
    """Fail the RUNNING trials whose worker is gone and hand each to `on_stale` (which closes
    its MLflow run and calls `requeue`), as Optuna's RDB heartbeat does with its callback."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, grace_s, by_heartbeat=by_heartbeat):
            continue
        storage = study._storage  # the study's (possibly cached) view of the storage
        try:
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another worker got there first
        on_stale(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed stale trial again with the same parameters (at most MAX_RETRY times)."""
    retry = copy.deepcopy(trial)
    # The retry must not inherit the dead owner (it would look stale at once) nor the run.
    retry.user_attrs = {
        k: v
        for k, v in trial.user_attrs.items()
        if k not in (ATTR_OWNER, ATTR_HEARTBEAT, ATTR_RUN, ATTR_OVERRIDES)
    }
    retry.user_attrs.setdefault(ATTR_RETRY_OF, trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, retry)


def counted(trials: list[FrozenTrial]) -> int:
    """Trials that use up the budget: all, except stale ones whose retry exists."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return len(trials) - len(retried)
