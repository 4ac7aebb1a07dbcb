"""Rerun a recorded result in an isolated clone and compare it, stage by stage.

1. Refuse, in one line and before any work, what cannot be reproduced: a dirty run, a commit the
   recorded remote does not have (say what to push), data at no reachable mirror and in no DVC
   remote.
2. Clone the commit into the cache (`workspace.checkout`), take the venv of its uv.lock
   (`workspace.ensure_venv`), write back the recorded params.yaml, and run the recorded stages in
   pipeline order, one `dvc repro --force --single-item` each: forced, so nothing comes from a
   cache. The clone logs to its own MLflow store, with `DEEP_REPRO_REPRODUCES` set (no model
   version, no alias, no gate), so the original store is never written.
3. After each stage, compare its outputs' md5 with the record. Stop at the first difference that
   already decides "not reproduced" (a data stage, or the same platform); go on to the end only
   where a statistical verdict is still possible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError
from deep_repro.evaluation.predictions import from_bytes
from deep_repro.machine import differences
from deep_repro.pipeline import PREDICTIONS, RAW_FILES, STAGES
from deep_repro.reproduction import workspace
from deep_repro.reproduction.record import Record
from deep_repro.reproduction.verdict import (
    StageResult,
    Thresholds,
    Verdict,
    compare_outputs,
    decide,
    may_continue,
)
from deep_repro.tracking.store import REPRODUCES_ENV

log = logging.getLogger(__name__)


@dataclass
class Reproduction:
    record: Record
    verdict: Verdict
    stages: list[StageResult]
    platform_here: dict[str, str]
    workspace: Path
    venv: Path
    data_source: str
    commands: list[str]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)  # reproduced reports/metrics.json


# --------------------------------------------------------------------------- refusals
def check_reproducible(record: Record) -> None:
    """What makes a record impossible to reproduce, known before cloning anything."""
    if record.dirty:
        changed = f" ({record.changed})" if record.changed else ""
        raise DeepReproError(
            f"run {record.run_id} was made with uncommitted changes{changed}: nobody else can "
            "check out that code; commit, rerun the pipeline, and reproduce the new run"
        )
    if not record.remote:
        raise DeepReproError(
            f"run {record.run_id} records no git remote: it was made in a checkout without "
            "`origin`; add one, push, and rerun the pipeline"
        )
    produced = {o.md5 for s in record.stages for o in s.lock.outs}
    for s in record.stages:
        recorded = {d.path for d in s.lock.deps}
        spec = STAGES.get(s.stage)
        for path in spec.deps if spec else ():
            if path not in recorded:  # the file was absent when the stage ran
                raise DeepReproError(
                    f"{s.stage}: input {path} has no recorded producing run (none recorded "
                    "at all): the lineage is incomplete"
                )
        for dep in s.lock.deps:
            if dep.md5 not in produced and s.stage != "download":
                raise DeepReproError(
                    f"{s.stage}: input {dep.path} (md5 {dep.md5}) has no recorded producing "
                    "run: the lineage is incomplete"
                )


def fetch_commit(record: Record, cache: Path) -> Path:
    """The cache's mirror of the recorded remote, which must have the recorded commit."""
    assert record.remote is not None
    repo = workspace.mirror(record.remote, cache)
    if not workspace.has_commit(repo, record.commit):
        push = "`git push` the branch that holds it"
        if record.dvc_exp_name:
            push += f" (a DVC experiment: `dvc exp push origin {record.dvc_exp_name}`)"
        raise DeepReproError(
            f"commit {record.commit[:12]} is not in {record.remote}: {push}, then reproduce again"
        )
    return repo


def _mirror_has(mirror: str, name: str) -> bool:
    url = f"{mirror.rstrip('/')}/{name}"
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(url.removeprefix("file://"))).is_file()
    if not url.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            return True
    except (OSError, ValueError):
        return False


def data_source(record: Record, ws: Path, env: dict[str, str]) -> str:
    """Where the raw data will come from: a recorded mirror (the download stage verifies it
    by sha256), else the workspace's DVC remote (by the recorded md5); else refuse."""
    data = record.params.get("data") or {}
    mirrors = [m for m in data.get("mirrors") or [] if isinstance(m, str)]
    names = [Path(p).name for p in RAW_FILES]
    for mirror in mirrors:
        if all(_mirror_has(mirror, n) for n in names):
            return f"mirror {mirror}"
    download = record.stage("download")
    if download is None:
        return "none needed"
    # No mirror: the DVC remote, by the recorded md5 (the recorded lock entry written back).
    entry = download.lock.model_dump()
    # `hash: md5` = DVC 3's own md5 of the bytes (without it DVC reads a 2.x entry).
    entry["outs"] = [{**o, "hash": "md5"} for o in entry["outs"]]
    _write_lock(ws, {"download": entry})
    done = _dvc(["fetch", "download"], ws, env)
    if done.returncode == 0:
        checkout = _dvc(["checkout", "download"], ws, env)
        if checkout.returncode == 0:
            return "DVC remote"
    raise DeepReproError(
        "the raw data is at no reachable recorded mirror ("
        + (", ".join(mirrors) or "none recorded")
        + ") and not in the DVC remote: push it from a checkout that has it "
        "(`dvc push download`), or pass --dvc-remote"
    )


# --------------------------------------------------------------------------- running
def _dvc(args: list[str], ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    venv = Path(env["VIRTUAL_ENV"])
    return subprocess.run(
        [str(venv / "bin" / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True
    )


def _write_lock(ws: Path, stages: dict[str, Any]) -> None:
    import yaml

    body = {"schema": "2.0", "stages": stages}
    (ws / "dvc.lock").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")


def _outs(ws: Path, stage: str) -> dict[str, str | None]:
    import yaml

    lock = yaml.safe_load((ws / "dvc.lock").read_text(encoding="utf-8")) or {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    return {o["path"]: o.get("md5") for o in entry.get("outs") or []}


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "ERROR"))]
    return (errors or lines or [f"exit status {done.returncode}"])[-1][:300]


def _platform_here(ws: Path, env: dict[str, str], threads: Any) -> dict[str, str]:
    """This machine as the clone's environment sees it (its torch, its BLAS), probed with the
    thread count the stages use."""
    import json

    from deep_repro import machine

    script = Path(machine.__file__)
    args = [str(threads)] if isinstance(threads, int) else []
    python = str(Path(env["VIRTUAL_ENV"]) / "bin" / "python")
    done = subprocess.run(
        [python, str(script), *args], cwd=ws, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise DeepReproError(f"cannot probe the platform: {_error_line(done)}")
    facts = json.loads(done.stdout)
    return {str(k): str(v) for k, v in facts.items()}


def _params_for_clone(record: Record) -> dict[str, Any]:
    """The recorded params, tracking into the clone's own store (`tracking` is read by no
    stage's outputs: no stage declares it)."""
    params = dict(record.params)
    params["tracking"] = dict(params.get("tracking") or {}, uri=None)
    return params


def rerun(
    record: Record,
    thresholds: Thresholds,
    *,
    cache: Path | None = None,
    dvc_remote: str | None = None,
    keep: bool = False,
) -> Reproduction:
    import yaml

    start = time.perf_counter()
    check_reproducible(record)
    cache = cache or workspace.cache_dir()
    repo = fetch_commit(record, cache)
    ws = cache / "workspaces" / f"{record.run_id[:12]}-{os.getpid()}"
    log.info("reproduce: cloning %s at %s into %s", record.remote, record.commit[:12], ws)
    workspace.checkout(repo, record.commit, ws, record.remote)
    try:
        venv = workspace.ensure_venv(ws, cache)
        env = workspace.project_env(ws, venv, **{REPRODUCES_ENV: record.run_id})
        (ws / "params.yaml").write_text(
            yaml.safe_dump(_params_for_clone(record), sort_keys=False), encoding="utf-8"
        )
        commands = [
            f"git clone {record.remote} && git checkout {record.commit}",
            f"uv sync --locked  # uv.lock sha256 {record.uv_lock_sha256[:12]}",
            "params.yaml <- the recorded validate entry",
        ]
        if dvc_remote:
            _dvc(["remote", "add", "--local", "-f", "-d", "reproduce", dvc_remote], ws, env)
        source = data_source(record, ws, env)
        threads = (record.params.get("train") or {}).get("num_threads")
        here = _platform_here(ws, env, threads)
        results = _run_stages(record, ws, env, here, source, commands)
        metrics: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            import json

            metrics = json.loads((ws / "reports/metrics.json").read_text(encoding="utf-8"))
        recorded_pred = reproduced_pred = None
        if record.predictions is not None:
            recorded_pred = from_bytes(record.predictions.encode(), "recorded predictions")
        if (ws / PREDICTIONS).is_file() and any(r.stage == "evaluate" for r in results):
            reproduced_pred = from_bytes((ws / PREDICTIONS).read_bytes(), "reproduced predictions")
        verdict = decide(record, results, reproduced_pred, recorded_pred, thresholds)
        return Reproduction(
            record,
            verdict,
            results,
            here,
            ws,
            venv,
            source,
            commands,
            time.perf_counter() - start,
            metrics,
        )
    finally:
        if not keep:
            shutil.rmtree(ws, ignore_errors=True)


def _run_stages(
    record: Record,
    ws: Path,
    env: dict[str, str],
    here: dict[str, str],
    source: str,
    commands: list[str],
) -> list[StageResult]:
    results: list[StageResult] = []
    steps = ["validate", *(s.stage for s in record.stages)]
    for i, stage in enumerate(steps, 1):
        if stage == "download" and source == "DVC remote":
            log.info("reproduce: [%d/%d] download: from the DVC remote", i, len(steps))
            commands.append("dvc pull download  # no recorded mirror reachable")
            done = None
            seconds = 0.0
        else:
            log.info("reproduce: [%d/%d] %s ...", i, len(steps), stage)
            t0 = time.perf_counter()
            commands.append(f"dvc repro --force --single-item {stage}")
            done = _dvc(["repro", "--force", "--single-item", stage], ws, env)
            seconds = time.perf_counter() - t0
        if stage == "validate":
            if done is not None and done.returncode != 0:
                raise DeepReproError(f"the recorded config fails here: {_error_line(done)}")
            continue
        recorded = record.stage(stage)
        assert recorded is not None
        result = StageResult(stage, round(seconds, 1), [])
        if done is not None and done.returncode != 0:
            result.failed = _error_line(done)
        else:
            result.outputs = compare_outputs(
                {o.path: o.md5 for o in recorded.lock.outs}, _outs(ws, stage)
            )
        result.platform_differences = differences(recorded.platform, here)
        results.append(result)
        log.info("reproduce: %s: %s (%.1f s)", stage, result.summary(), seconds)
        # Decided by the FIRST difference: later stages differ anyway (their inputs do).
        first = next((r for r in results if not r.identical), None)
        if first is not None and not may_continue(first):
            log.info("reproduce: stopping after %s: the verdict is decided", stage)
            break
    return results
