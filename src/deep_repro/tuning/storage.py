"""Where a study lives, and what happens to the trials of workers that die.

Storage
-------
`tune.storage` is null (a journal file at `<store root>/optuna/journal.log`), a path ending in
`.log` (a journal file; relative paths are under the store root) or any Optuna RDB URL
(`sqlite:///...`, `postgresql://...`). Counting the study's trials and creating the next one
(and creating the study's MLflow run) happen under a `Gate`, so workers never overshoot
`tune.n_trials` nor create two study runs: on PostgreSQL a session advisory lock in the study's
database (`AdvisoryGate`: every machine sharing the database), otherwise a file lock next to the
journal file or under the store root (`FileGate`: sqlite and journal files are single-machine).

Stale trials (a worker killed mid-trial)
----------------------------------------
Optuna's heartbeat (`tune.heartbeat_interval`, grace period twice that,
`RetryHeartbeatStaleTrialCallback`) exists only for RDB storages; `JournalStorage` does not
implement it (Optuna 5: it is not a `BaseHeartbeat`). So every trial also records its owner
(host, pid, process start time) in its user attrs and, on journal storage, a heartbeat timestamp
every `tune.heartbeat_interval` seconds. Before creating each trial, a worker fails RUNNING trials
whose owner process on this host is gone (immediately), or, for other hosts, whose heartbeat
(Optuna's on RDB storages) is older than the grace period; the trial is re-queued with the same
parameters (at most twice).
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

from deep_repro.errors import DeepReproError, first_line, scrub
from deep_repro.paths import store_root
from deep_repro.tracking.faults import owner as owner  # shared with pipeline/stage runs
from deep_repro.tracking.faults import owner_alive
from deep_repro.tuning.journal import check_journal

log = logging.getLogger(__name__)

MAX_RETRY = 2  # re-queue a trial whose worker died at most this often (a crash loop is a bug)
# Optuna user attrs of a trial (visible in optuna-dashboard).
ATTR_OWNER = "deep_repro.owner"
ATTR_HEARTBEAT = "deep_repro.heartbeat"
ATTR_RUN = "deep_repro.mlflow_run_id"
ATTR_OVERRIDES = "deep_repro.overrides"
ATTR_RETRY_OF = "deep_repro.retry_of"
# Tags of a trial's MLflow run naming its study and trial: what ties a trial to its evidence.
TAG_STUDY = "deep_repro.study"
TAG_TRIAL_NUMBER = "deep_repro.trial_number"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass
class StudyStorage:
    storage: optuna.storages.BaseStorage
    description: str  # redacted, for logs and tags
    gate: Gate  # serialises budget checks, trial creation and the study run's creation
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
        except OSError as exc:
            raise DeepReproError(
                f"tune.storage journal file {journal} is unusable ({exc})"
            ) from None
        # Before Optuna reads it: a damaged line would end every later run in a traceback.
        try:
            check_journal(journal)
        except OSError as exc:
            raise DeepReproError(
                f"tune.storage journal file {journal} is unreadable ({exc})"
            ) from None
        try:
            backend = JournalFileBackend(str(journal))
            storage = optuna.storages.JournalStorage(backend)
        except Exception as exc:
            raise DeepReproError(
                f"tune.storage journal file {journal} is unusable "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        lock = journal.with_name(journal.name + ".tune.lock")
        return StudyStorage(storage, f"journal:{journal}", FileGate(lock), journal=True)
    assert spec is not None
    url = spec
    shown = scrub(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        with contextlib.suppress(OSError):  # sqlite creates the file, not its folder
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    gate = study_gate(url, study_name)
    creation: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(gate, AdvisoryGate):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
        # Optuna creates its tables on first use; two machines doing that at once race.
        creation = AdvisoryGate(url, advisory_key("schema"), "the Optuna schema")
    elif url.startswith("sqlite"):
        from filelock import FileLock

        # Creating a fresh sqlite schema from two processes at once races (as for MLflow).
        creation = FileLock(str(gate.path) + ".create")
    try:
        with warnings.catch_warnings(), creation:
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
    return StudyStorage(storage, shown, gate, journal=False)


# --------------------------------------------------------------------------- the gate
GATE_TIMEOUT_S = 600  # a worker never waits longer than this for another one's gate
CONNECT_TIMEOUT_S = 10


def is_postgresql(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in ("postgresql", "postgres")


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_lock` (advisory locks are per database)."""
    digest = hashlib.sha256(f"deep-repro.tune\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def study_gate(url: str, study_name: str) -> FileGate | AdvisoryGate:
    """The gate of a study in an RDB storage: a lock in the database itself on PostgreSQL
    (shared by every machine), a file lock under the store root otherwise (sqlite)."""
    if is_postgresql(url):
        # Keyed by the study name only: two machines may spell the same server differently.
        return AdvisoryGate(url, advisory_key(f"study\0{study_name}"), f"study {study_name!r}")
    digest = hashlib.sha256(f"{url}\0{study_name}".encode()).hexdigest()[:16]
    return FileGate(store_root() / "optuna" / "locks" / f"{digest}.lock")


class Gate:
    """Held from 'count the study's trials' until 'the new trial exists' (and while the study's
    MLflow run is looked up or created), so workers never overshoot `tune.n_trials` nor create
    two study runs. The objective releases it first thing; `release` may be called twice."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Gate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileGate(Gate):
    """A file lock: exclusive among the processes of one machine (journal files, sqlite)."""

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = FileLock(str(path), timeout=GATE_TIMEOUT_S)
        self._held = False

    def acquire(self) -> None:
        self._lock.acquire()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class AdvisoryGate(Gate):
    """A PostgreSQL session advisory lock in the study's database: exclusive among all workers
    on all machines that share it, whatever their checkouts.

    Each acquisition opens its own connection (no pool), so the lock lives exactly as long as
    that connection: closing it releases the lock, and so does the death of the worker (the
    server ends the session when the socket closes)."""

    def __init__(self, url: str, key: int, what: str, timeout_s: float = GATE_TIMEOUT_S) -> None:
        self.url, self.key, self.what, self.timeout_s = url, key, what, timeout_s
        self._engine: Any = None
        self._conn: Any = None

    def acquire(self) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url,
                poolclass=NullPool,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
                # No transaction stays open while the gate is held (idle-in-transaction limits).
                isolation_level="AUTOCOMMIT",
            )
        conn = self._engine.connect()
        try:
            conn.execute(
                sqlalchemy.text("SELECT set_config('lock_timeout', :ms, false)"),
                {"ms": f"{int(self.timeout_s * 1000)}ms"},
            )
            conn.execute(
                sqlalchemy.text("SELECT pg_advisory_lock(CAST(:key AS bigint))"), {"key": self.key}
            )
        except sqlalchemy.exc.OperationalError as exc:
            conn.close()
            if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                raise DeepReproError(
                    f"tune.storage {scrub(self.url)}: another worker held the lock on "
                    f"{self.what} for more than {self.timeout_s:.0f}s; is one stuck?"
                ) from None
            raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        import sqlalchemy

        try:
            conn.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(CAST(:key AS bigint))"),
                {"key": self.key},
            )
        except Exception as exc:  # closing the session below releases the lock anyway
            log.warning("releasing the lock on %s failed: %s", self.what, first_line(exc))
        finally:
            conn.close()


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
    if not by_heartbeat:
        # RDB: Optuna's heartbeat judges other machines' trials, but by itself only when a trial
        # starts; checking here (under the gate, before the budget is counted) fails and
        # re-queues a dead worker's trial even when the budget looks used up.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
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
