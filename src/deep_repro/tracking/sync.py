"""`deep-repro sync`: replay the spool of a tracking outage (see `tracking/spool.py`).

Safe to rerun at any point: each spool file has a `.state.json` next to it recording how many of
its ops the store has taken and which real run each placeholder became, so a sync that stops
(store down again, Ctrl-C) resumes where it stopped. A spool file and its artifact copies are
removed only after every op in it was sent. A placeholder run is created with its placeholder
id as a tag (found again rather than created twice); a placeholder *pipeline* run joins the
invocation's pipeline run if the store already has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deep_repro.errors import scrub
from deep_repro.files import write_json
from deep_repro.tracking.spool import (
    OFFLINE_EXPERIMENT,
    PLACEHOLDER_PREFIX,
    TAG_SPOOL_ID,
    is_transient,
    spool_dir,
)
from deep_repro.tracking.store import TAG_INVOCATION, TAG_KIND, _search_one

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    files: int = 0
    completed: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.files:
            return "nothing to sync"
        sent = ", ".join(f"{n} {what}" for what, n in self.counts.items() if n) or "nothing new"
        return f"synced {self.completed} of {self.files} spool file(s): sent {sent}" + (
            f"; {self.files - self.completed} left, rerun `deep-repro sync`"
            if self.completed < self.files
            else ""
        )


def _state_path(spool: Path) -> Path:
    return spool.with_name(spool.stem + ".state.json")


def sync(client: Any, directory: Path | None = None) -> SyncReport:
    """Replay every spool file in `directory` (default: the store root's spool) into `client`."""
    client = getattr(client, "inner", client)  # never spool the replay itself
    directory = directory or spool_dir()
    report = SyncReport()
    ids: dict[str, str] = {}
    for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
        report.files += 1
        state_path = _state_path(path)
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        done, local_ids = int(state.get("done", 0)), dict(state.get("ids", {}))
        ids.update(local_ids)
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for index in range(done, len(records)):
            record = records[index]
            try:
                what = _apply(client, record, ids, path.parent)
            except Exception as exc:
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                report.problems.append(
                    f"{path.name}: op {index + 1} ({record.get('op')}): "
                    f"{type(exc).__name__}: {scrub(text)[:300]}"
                )
                if is_transient(exc):
                    return report  # the store is down again: the rest would fail the same way
                break
            if record["op"] == "create_run":
                local_ids[record["id"]] = ids[record["id"]]
            report.counts.update(what)
            write_json(state_path, {"done": index + 1, "ids": local_ids})
        else:
            path.unlink()
            state_path.unlink(missing_ok=True)
            shutil.rmtree(path.parent / path.stem, ignore_errors=True)
            report.completed += 1
    return report


def _apply(client: Any, record: dict[str, Any], ids: dict[str, str], base: Path) -> dict[str, int]:
    """Send one spooled op; returns what it sent, by kind."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "create_run":
        ids[record["id"]] = _create_run(client, record, ids)
        return {"run creations": 1}
    run_id = ids.get(record["run_id"], record["run_id"])
    if run_id.startswith(PLACEHOLDER_PREFIX):
        raise KeyError(f"placeholder run {run_id} was never created")
    if op == "log_batch":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        params = [Param(k, v) for k, v in record["params"]]
        tags = [RunTag(k, ids.get(v, v)) for k, v in record["tags"]]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        return {"metrics": len(metrics), "params": len(params), "tags": len(tags)}
    if op == "update_run":
        client.update_run(run_id, status=record.get("status"), name=record.get("name"))
        return {"run updates": 1}
    if op == "set_terminated":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        return {"terminal statuses": 1}
    if op == "log_artifact":
        local = base / record["file"]
        if local.is_dir():
            sub = "/".join(p for p in (record.get("artifact_path"), local.name) if p)
            client.log_artifacts(run_id, str(local), sub)
        else:
            client.log_artifact(run_id, str(local), record.get("artifact_path"))
        return {"artifacts": 1}
    if op == "log_inputs":
        from google.protobuf.json_format import ParseDict
        from mlflow.entities import DatasetInput
        from mlflow.protos.service_pb2 import DatasetInput as DatasetInputProto

        datasets = [
            DatasetInput.from_proto(ParseDict(d, DatasetInputProto())) for d in record["datasets"]
        ]
        client.log_inputs(run_id, datasets=datasets)
        return {"dataset inputs": len(datasets)}
    raise ValueError(f"unknown spooled op {op!r}")


def _experiment_id(client: Any, recorded: str) -> str:
    """A spooled experiment id, or (spooled from the start: never reached) its name's id now."""
    if not recorded.startswith(OFFLINE_EXPERIMENT):
        return recorded
    name = recorded.removeprefix(OFFLINE_EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    from deep_repro.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))


def _create_run(client: Any, record: dict[str, Any], ids: dict[str, str]) -> str:
    """The real run for a placeholder: one already made by an earlier sync, the invocation's
    pipeline run, or a new one (with the original start time, and links mapped to real ids)."""
    exp_id, tags = _experiment_id(client, record["experiment_id"]), dict(record["tags"])
    found = _search_one(client, exp_id, f"tags.`{TAG_SPOOL_ID}` = '{record['id']}'")
    if found is None and tags.get(TAG_KIND) == "pipeline" and tags.get(TAG_INVOCATION):
        found = _search_one(
            client,
            exp_id,
            f"tags.`{TAG_INVOCATION}` = "
            f"'{tags[TAG_INVOCATION]}' and "
            f"tags.`{TAG_KIND}` = 'pipeline'",
        )
    if found is not None:
        return str(found.info.run_id)
    tags = {k: ids.get(v, v) for k, v in tags.items()} | {TAG_SPOOL_ID: record["id"]}
    run = client.create_run(
        exp_id, start_time=record["start_time"], tags=tags, run_name=record.get("run_name")
    )
    return str(run.info.run_id)
