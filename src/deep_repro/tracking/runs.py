"""Pipeline, stage and trial runs: one pipeline run per DVC invocation, a child per stage."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.config.schema import Config, flatten, to_dict
from deep_repro.config.stage_view import unrestricted
from deep_repro.errors import first_line, scrub
from deep_repro.files import file_hashes
from deep_repro.machine import platform_facts
from deep_repro.paths import repo_root
from deep_repro.pipeline import ALL_PARAMS, STAGES, StageSpec
from deep_repro.tracking import faults, spool
from deep_repro.tracking.lineage import producer_run
from deep_repro.tracking.provenance import (
    environment_tags,
    invocation_key,
    pipeline_params,
    pipeline_run_name,
    pipeline_source,
    repo_relative,
    run_user,
    source_tags,
    used_params,
)
from deep_repro.tracking.store import (
    IN_PREFIX,
    LOCK_ENTRY_ARTIFACT,
    OUT_PREFIX,
    PLATFORM_PREFIX,
    TAG_FAIL_REASON,
    TAG_INVOCATION,
    TAG_KIND,
    TAG_PARENT,
    TAG_PREFIX,
    TAG_STAGE,
    UPSTREAM_PREFIX,
    UPSTREAM_USER_PREFIX,
    VALIDATE_ENTRY_ARTIFACT,
    _search_one,
    _store_lock,
    connect,
    end_run,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pipeline run
def get_or_create_pipeline_run(
    client: MlflowClient,
    exp_id: str,
    uri: str,
    cfg: Config,
    tags: Mapping[str, str],
    key: str | None = None,
    script: str | None = None,
) -> str:
    key = key or invocation_key()
    source = pipeline_source(script or repo_relative(sys.argv[0]))
    with _store_lock(uri):
        found = _search_one(
            client, exp_id, f"tags.`{TAG_INVOCATION}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'"
        )
        if found is not None:
            client.update_run(found.info.run_id, status="RUNNING")
            # Opened by a data stage, which logs only the keys every trainer reads: a stage that
            # checked the model adds the keys its trainer reads (never changing a logged one).
            missing = {k: v for k, v in pipeline_params(cfg).items() if k not in found.data.params}
            if missing:
                log_params(client, found.info.run_id, missing)
            return found.info.run_id
        run_name = pipeline_run_name(
            tags.get(f"{TAG_PREFIX}.user") or run_user(cfg.tracking.user),
            cfg.model.name,
            os.environ.get("DVC_EXP_NAME"),
        )
        run = client.create_run(
            exp_id,
            run_name=run_name,
            tags={
                **tags,
                **source_tags(source),
                TAG_KIND: "pipeline",
                TAG_INVOCATION: key,
                "mlflow.note.content": pipeline_note(cfg, tags),
            },
        )
    log_params(client, run.info.run_id, pipeline_params(cfg))
    if tags.get(f"{TAG_PREFIX}.git.dirty") == "true":
        log.warning(
            "working tree has uncommitted code changes (%s): runs are tagged "
            "deep_repro.git.dirty=true and cannot be reproduced from the commit alone",
            tags.get(f"{TAG_PREFIX}.git.changed"),
        )
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """The one way params reach MLflow (pipeline, stage, study and trial runs alike).

    Lists and mappings as JSON; credentials in URLs (tracking.uri, tune.storage, data.mirrors)
    scrubbed; values cut to MLflow's 6000 characters, in batches of its 100-param limit.
    """
    from mlflow.entities import Param

    items = [
        Param(k, scrub(json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000])
        for k, v in params.items()
    ]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


@dataclass
class Outcome:
    """How a run ends (set inside `closing`): its MLflow status and final tags."""

    status: str = "FAILED"
    tags: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def closing(
    client: MlflowClient, run_id: str, *, parent_id: str | None = None, missing_ok: bool = False
) -> Iterator[Outcome]:
    """However the body ends, close the run through `end_run` with the outcome's tags and
    status: FAILED unless the body set another (FINISHED once its work is done), KILLED on
    Ctrl-C. `parent_id` (a pipeline run) ends too: FINISHED only if this run did.

    A close-out error after the body failed is logged, never raised: the body's error is the
    one the user has to see.
    """
    outcome = Outcome()
    failed = True
    try:
        yield outcome
        failed = False
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            outcome.status = "KILLED"
        # A stop can land outside the body's own handler (SIGTERM while the finished stage
        # logs its outputs): the run still says why it ended.
        if outcome.status != "FINISHED":  # a pruned trial ends FINISHED: no failure
            outcome.tags.setdefault(TAG_FAIL_REASON, faults.failure_reason(exc))
        raise
    finally:
        ends = [(run_id, outcome.status, outcome.tags)]
        if parent_id is not None:
            ends.append(
                (
                    parent_id,
                    "FINISHED" if outcome.status == "FINISHED" else "FAILED",
                    {k: v for k, v in outcome.tags.items() if k == TAG_FAIL_REASON},
                )
            )
        for rid, status, tags in ends:
            try:
                end_run(client, rid, status, tags, missing_ok=missing_ok)
            except Exception as exc:
                if not failed:
                    raise
                log.warning("cannot close MLflow run %s: %s", rid, first_line(exc))


def _metric_batch(metrics: Mapping[str, float], step: int | None) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]


def pipeline_note(cfg: Config, tags: Mapping[str, str]) -> str:
    commit = tags.get(f"{TAG_PREFIX}.git.commit", "unknown")
    exp = tags.get(f"{TAG_PREFIX}.dvc_exp_name")
    push = f" (DVC experiment `{exp}`: push its commit, `git push`)" if exp else ""
    return (
        f"Pipeline run of `{cfg.model.name}` at commit {commit}{push}. Reproduce: "
        "`uv run deep-repro reproduce <this run's id>` reruns it in a clean clone and compares "
        "every output. Per-stage details are in the child runs; "
        "`uv run deep-repro lineage <run id>` prints the chain back to the raw files."
    )


# --------------------------------------------------------------------------- stage runs
@dataclass
class StageRun:
    """An open MLflow run for one executed stage (use via `stage_run`)."""

    client: MlflowClient
    run_id: str
    pipeline_run_id: str
    spec: StageSpec
    experiment_id: str
    _tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deep-repro-")))

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, *, pipeline: bool = False
    ) -> None:
        """Log metrics on this stage run (and, for headline numbers, on the pipeline run)."""
        batch = _metric_batch(metrics, step)
        self.client.log_batch(self.run_id, metrics=batch)
        if pipeline:
            self.client.log_batch(self.pipeline_run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str], *, pipeline: bool = False) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=batch)
        if pipeline:
            self.client.log_batch(self.pipeline_run_id, tags=batch)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        target = self._tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        self.log_artifact(target, os.path.dirname(name) or None)

    def log_figure(self, fig: Any, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)


def _stage_params(spec: StageSpec, cfg: Config) -> dict[str, Any]:
    flat = flatten(to_dict(cfg))
    wanted = spec.params or ()
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in wanted)}


def _lock_entry(
    spec: StageSpec, cfg: Config, deps: dict[str, str], outs: dict[str, str]
) -> dict[str, Any]:
    """This execution's dvc.lock entry (DVC writes the same md5s once the stage ends)."""
    return {
        "cmd": f"python {spec.script}",
        "deps": [{"path": p, "md5": h} for p, h in sorted(deps.items())],
        "params": {"params.yaml": _stage_params(spec, cfg)},
        "outs": [{"path": p, "md5": h} for p, h in sorted(outs.items())],
    }


def _validate_entry(root: Path) -> dict[str, Any] | None:
    """DVC's `validate` entry of this invocation: every param, as params.yaml types them
    (None for a stage run outside a project, e.g. from a notebook: nothing to record)."""
    import yaml

    path = root / ALL_PARAMS
    if not path.is_file():
        return None
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {"cmd": f"python {STAGES['validate'].script}", "params": {ALL_PARAMS: params}}


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config) -> Iterator[StageRun]:
    """Open the MLflow run of one executed stage, nested under this invocation's pipeline run.

    Fails (before the stage does any work) if the store is unreachable. On exit records the
    md5 of every output, so downstream runs, in this invocation or later ones, can link to it.
    """
    cfg = unrestricted(cfg)  # a stage's view: MLflow still records the whole config
    spec = STAGES[stage]
    uri = tracking_uri(cfg.tracking.uri)
    client, exp_id = connect(uri, cfg.tracking.experiment)
    root = repo_root()
    tags = environment_tags(cfg)
    key = invocation_key()
    faults.fail_orphan_runs(client, exp_id)  # left RUNNING by a killed stage or dvc
    parent_id = get_or_create_pipeline_run(
        client,
        exp_id,
        uri,
        cfg,
        {**tags, **faults.owner_tags(faults.invocation_owner(key))},
        key,
        spec.script,
    )

    code = file_hashes((spec.script,), root)
    deps = file_hashes(spec.deps, root)
    upstream: dict[str, str] = {}
    user = tags[f"{TAG_PREFIX}.user"]
    for path, md5 in deps.items():
        producer = producer_run(
            client,
            exp_id,
            path,
            md5,
            invocation=key,
            user=user,
            repo=tags.get(f"{TAG_PREFIX}.git.remote"),
        )
        if producer is not None:
            upstream[f"{UPSTREAM_PREFIX}{path}"] = producer.info.run_id
            other = producer.data.tags.get(f"{TAG_PREFIX}.user", user)
            if other != user:  # reproducible from its commit + params, not from this checkout
                upstream[f"{UPSTREAM_USER_PREFIX}{path}"] = other
        else:
            log.warning("no tracked run produced %s (md5 %s): lineage stops here", path, md5)
    run = client.create_run(
        exp_id,
        run_name=stage,
        tags={
            **tags,
            **source_tags(spec.script),
            TAG_KIND: "stage",
            TAG_STAGE: stage,
            TAG_PARENT: parent_id,
            TAG_INVOCATION: key,
            f"{TAG_PREFIX}.dvc_stage": stage,
            **faults.owner_tags(faults.owner()),
            f"{TAG_PREFIX}.command": " ".join(sys.argv),
            **{f"{IN_PREFIX}{p}": h for p, h in deps.items()},
            **{f"{TAG_PREFIX}.code.{p}": h for p, h in code.items()},
            **upstream,
        },
    )
    handle = StageRun(client, run.info.run_id, parent_id, spec, exp_id)
    handle.log_params(used_params(cfg, _stage_params(spec, cfg)))
    tail = faults.LogTail().attach()  # a failed run logs its last lines as logs/stage.log
    log.info("MLflow: stage run %s (pipeline run %s) in %s", run.info.run_id, parent_id, scrub(uri))
    import shutil

    try:
        with closing(client, run.info.run_id, parent_id=parent_id) as outcome:
            try:
                yield handle
            except BaseException as exc:
                outcome.tags[TAG_FAIL_REASON] = faults.record_failure(
                    client, handle.run_id, exc, tail, handle._tmp
                )
                if isinstance(exc, Exception):
                    _note_failure(handle, cfg, tags, exc)
                raise
            outs = file_hashes(spec.outs, root)
            handle.set_tags({f"{OUT_PREFIX}{p}": h for p, h in outs.items()})
            # What explains a cross-machine difference (`deep-repro reproduce` compares it),
            # read at the end: the thread count is the one the stage set.
            handle.set_tags({f"{PLATFORM_PREFIX}{k}": v for k, v in platform_facts().items()})
            handle.log_dict(_lock_entry(spec, cfg, deps, outs), LOCK_ENTRY_ARTIFACT)
            # The whole params.yaml as DVC's `validate` entry holds it (typed: not MLflow's
            # stringified params): what a reproduction writes back to rebuild the config.
            validate = _validate_entry(root)
            if validate is not None:
                handle.log_dict(validate, VALIDATE_ENTRY_ARTIFACT)
            outcome.status = "FINISHED"
    finally:
        tail.detach()
        shutil.rmtree(handle._tmp, ignore_errors=True)
        spool.report(client)  # the one line saying what an outage left to `deep-repro sync`


def _note_failure(run: StageRun, cfg: Config, tags: Mapping[str, str], exc: Exception) -> None:
    """Put why a stage failed where the MLflow UI shows it: the run page's description
    (`mlflow.note.content`) of the stage run and, above its usual note, of the pipeline run.
    Best effort: the stage's own error is the one the user has to see."""
    reason = f"{type(exc).__name__}: {first_line(exc)}"
    head = f"**FAILED** in stage `{run.spec.name}`: {reason}"
    notes = {run.run_id: head, run.pipeline_run_id: f"{head}\n\n{pipeline_note(cfg, tags)}"}
    for run_id, note in notes.items():
        try:
            run.client.set_tag(run_id, "mlflow.note.content", note)
        except Exception as note_exc:
            log.warning(
                "cannot record the failure on MLflow run %s: %s", run_id, first_line(note_exc)
            )


# --------------------------------------------------------------------------- datasets
def log_dataset(
    run: StageRun, name: str, images: Any, labels: Any, digest: str, source: str, context: str
) -> None:
    """Log a split as an MLflow dataset input whose digest is the file's content hash.

    (MLflow's own numpy digest samples only the first values and collides across subsets.)
    """
    import warnings

    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow warns that a local path has two source readers
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_numpy(
            images, targets=labels, name=name, digest=digest[:36], source=repo_relative(source)
        )
    run.client.log_inputs(
        run.run_id,
        datasets=[
            DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
            )
        ],
    )
