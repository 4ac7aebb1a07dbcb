"""Riding out a tracking outage: retry, then spool locally, and `deep-repro sync` later.

`connect` hands out a `ResilientClient`: the MlflowClient calls that runs *write* with
(create_run, log_batch, set_tag, update_run, set_terminated, log_artifact, log_figure,
log_inputs) are retried with a bounded backoff on transient errors (connection refused, timeouts,
HTTP 5xx/429). If the store stays down, the client goes offline for the rest of the process and
appends every further write, in order, to `<store root>/.deep_repro_spool/<key>.jsonl`
(artifacts as file copies next to it), so the stage still finishes and writes its outputs.
Runs created before the outage keep their ids; a run created during it gets a placeholder id
(`offline-...`) that `sync` maps to the real one, in every later op and in tag values (parent
and upstream links). The process ends with one warning line naming what was spooled.
Replay lives in `tracking/sync.py`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deep_repro.errors import scrub
from deep_repro.paths import store_root

log = logging.getLogger(__name__)

SPOOL_DIR = ".deep_repro_spool"
PLACEHOLDER_PREFIX = "offline-"
TAG_SPOOL_ID = "deep_repro.spool_id"  # on a run created by sync: its placeholder id
# Bounded stall per outage: 3 tries, waiting 1 s then 3 s, never starting a try after 10 s.
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 3.0)
RETRY_BUDGET_S = 10.0

_TRANSIENT_TEXT = re.compile(
    r"Max retries exceeded|Connection (refused|reset|aborted)|timed out|Read timed out|"
    r"RemoteDisconnected|failed with exception|error code (5\d\d|429)|"
    r"TEMPORARILY_UNAVAILABLE|database is locked",
    re.IGNORECASE,
)


# Set by a cluster task: where to spool (a shared directory that outlives the task's clone),
# and "1" to spool from the start (the node cannot reach the tracking server at all).
SPOOL_DIR_ENV = "DEEP_REPRO_SPOOL_DIR"
OFFLINE_ENV = "DEEP_REPRO_TRACKING_OFFLINE"
# An experiment known by name only (the store was never reached): `sync` finds or creates it.
OFFLINE_EXPERIMENT = f"{PLACEHOLDER_PREFIX}experiment:"


def spool_dir() -> Path:
    explicit = os.environ.get(SPOOL_DIR_ENV)
    return Path(explicit) if explicit else store_root() / SPOOL_DIR


def offline_from_start() -> bool:
    return os.environ.get(OFFLINE_ENV) == "1"


def is_transient(exc: BaseException) -> bool:
    """A failure to reach the store (worth a retry), not a refusal by it (a real error)."""
    import requests

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(
            cur, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError
        ):
            return True
        code = getattr(cur, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED"):
            return True
        if _TRANSIENT_TEXT.search(str(cur)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class ResilientClient:
    """An MlflowClient whose run-writing calls survive an outage (everything else forwards).

    `offline` turns true at the first write that still fails after the retries; from then on
    writes go only to the spool (keeping their order) and searches answer "nothing found".
    """

    def __init__(self, client: Any, uri: str) -> None:
        self.inner = client
        self.uri = uri
        self.offline = False
        self.counts: Counter[str] = Counter()
        self._file: Path | None = None
        self._reported = 0
        self._runs: set[str] = set()
        self._since = ""
        self._exit_hook = False

    def __getattr__(self, name: str) -> Any:  # every other MlflowClient method, unchanged
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ retry / spool
    def _call(self, method: str, /, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """(True, result) if the store took the call; (False, None) if it is down."""
        if self.offline:
            return False, None
        start = time.monotonic()
        delays = list(RETRY_DELAYS_S)
        while True:
            try:
                return True, getattr(self.inner, method)(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not delays or time.monotonic() - start + delays[0] > RETRY_BUDGET_S:
                    log.debug("tracking store down (%s): spooling from now on", exc)
                    self.offline = True
                    self._since = time.strftime("%H:%M:%S")
                    return False, None
                time.sleep(delays.pop(0))

    @property
    def spool_file(self) -> Path:
        if self._file is None:
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self._file = spool_dir() / f"{name}.jsonl"
        return self._file

    def _spool(self, record: dict[str, Any], **counts: int) -> None:
        path = self.spool_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a crash later in the stage must not lose what was spooled
        self.counts.update({k.replace("_", " "): n for k, n in counts.items()})
        self._runs.add(record.get("run_id") or record["id"])
        if not self._exit_hook:  # paths that never call `report` still end with the line
            self._exit_hook = True
            atexit.register(self.report)

    def _copy_artifact(self, local_path: str) -> str:
        src = Path(local_path)
        rel = f"{self.spool_file.stem}/{sum(self.counts.values())}-{uuid.uuid4().hex[:6]}"
        dest = self.spool_file.parent / rel / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return f"{rel}/{src.name}"

    # ------------------------------------------------------------------ wrapped writes
    def create_run(
        self,
        experiment_id: str,
        start_time: int | None = None,
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
    ) -> Any:
        ok, run = self._call(
            "create_run", experiment_id, start_time=start_time, tags=tags, run_name=run_name
        )
        if ok:
            return run
        run_id = f"{PLACEHOLDER_PREFIX}{uuid.uuid4().hex}"
        start = start_time or int(time.time() * 1000)
        self._spool(
            {
                "op": "create_run",
                "id": run_id,
                "experiment_id": str(experiment_id),
                "start_time": start,
                "run_name": run_name,
                "tags": {k: str(v) for k, v in (tags or {}).items()},
            },
            run_creations=1,
        )
        info = SimpleNamespace(
            run_id=run_id,
            experiment_id=str(experiment_id),
            run_name=run_name,
            start_time=start,
            status="RUNNING",
        )
        return SimpleNamespace(
            info=info, data=SimpleNamespace(tags=dict(tags or {}), params={}, metrics={})
        )

    def log_batch(
        self,
        run_id: str,
        metrics: Any = (),
        params: Any = (),
        tags: Any = (),
        synchronous: bool | None = None,
    ) -> None:
        metrics, params, tags = list(metrics or ()), list(params or ()), list(tags or ())
        ok, _ = self._call("log_batch", run_id, metrics=metrics, params=params, tags=tags)
        if ok:
            return
        self._spool(
            {
                "op": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params],
                "tags": [[t.key, t.value] for t in tags],
            },
            metrics=len(metrics),
            params=len(params),
            tags=len(tags),
        )

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> None:
        from mlflow.entities import RunTag

        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        ok, _ = self._call("update_run", run_id, status=status, name=name)
        if not ok:
            self._spool(
                {"op": "update_run", "run_id": run_id, "status": status, "name": name},
                run_updates=1,
            )

    def set_terminated(
        self, run_id: str, status: str | None = None, end_time: int | None = None
    ) -> None:
        end = end_time or int(time.time() * 1000)
        ok, _ = self._call("set_terminated", run_id, status=status, end_time=end)
        if not ok:
            self._spool(
                {
                    "op": "set_terminated",
                    "run_id": run_id,
                    "status": status or "FINISHED",
                    "end_time": end,
                },
                terminal_statuses=1,
            )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        ok, _ = self._call("log_artifact", run_id, local_path, artifact_path)
        if not ok:
            self._spool(
                {
                    "op": "log_artifact",
                    "run_id": run_id,
                    "file": self._copy_artifact(local_path),
                    "artifact_path": artifact_path,
                },
                artifacts=1,
            )

    def log_figure(self, run_id: str, figure: Any, artifact_file: str, **kwargs: Any) -> None:
        ok, _ = self._call("log_figure", run_id, figure, artifact_file, **kwargs)
        if not ok:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                figure.savefig(path)
                self.log_artifact(run_id, str(path), os.path.dirname(artifact_file) or None)

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        ok, _ = self._call("log_inputs", run_id, datasets=datasets, models=models)
        if not ok and datasets:
            from google.protobuf.json_format import MessageToDict

            self._spool(
                {
                    "op": "log_inputs",
                    "run_id": run_id,
                    "datasets": [MessageToDict(d.to_proto()) for d in datasets],
                },
                dataset_inputs=len(datasets),
            )

    # ------------------------------------------------------------------ reads while offline
    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        ok, runs = self._call("search_runs", *args, **kwargs)
        return runs if ok else []

    def search_model_versions(self, *args: Any, **kwargs: Any) -> Any:
        ok, versions = self._call("search_model_versions", *args, **kwargs)
        return versions if ok else []

    # ------------------------------------------------------------------ the one line
    def summary(self) -> str:
        parts = [f"{n} {what}" for what, n in self.counts.items() if n > 0]
        runs = ", ".join(sorted(self._runs))
        return (
            f"tracking store {scrub(self.uri)} unreachable since {self._since}: spooled "
            f"{', '.join(parts)} of run(s) {runs} to {self.spool_file}; run "
            "`uv run deep-repro sync` once it is back"
        )

    def report(self) -> None:
        """Warn once (one line) about what went to the spool since the last report."""
        total = sum(self.counts.values())
        if total > self._reported and self.spool_file.exists():  # (not synced meanwhile)
            self._reported = total
            log.warning(self.summary())


def report(client: Any) -> None:
    """The one warning line of a spooling client (nothing for a plain MlflowClient)."""
    if isinstance(client, ResilientClient):
        client.report()


def is_offline(client: Any) -> bool:
    return bool(getattr(client, "offline", False))


def mark_offline(client: Any) -> None:
    """Spool from now on (a write outside the client, e.g. MLflow's fluent API, hit the outage)."""
    if isinstance(client, ResilientClient) and not client.offline:
        client.offline = True
        client._since = time.strftime("%H:%M:%S")
