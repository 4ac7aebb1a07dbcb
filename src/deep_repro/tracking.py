"""The one tracking module: MLflow store, pipeline runs, stage runs, and lineage by content.

Run model
---------
* Every `dvc repro` / `dvc exp run` invocation (workspace, --temp, or a queued experiment) gets
  exactly one *pipeline run*; every stage DVC actually executes is a child of it
  (`mlflow.parentRunId`). Stages are separate processes, so the children find their parent by an
  *invocation key*: the pid and start time of the DVC process that launched them (found by walking
  up the process tree), never through `MLFLOW_RUN_ID` (mlflow issue 15713).
* Runs are linked by *content*: each stage run tags the md5 (the same hash DVC writes in
  `dvc.lock`) of every input and output file. A downstream run looks up the run that produced
  each of its inputs by that hash, so lineage survives DVC skipping cached stages, and no run id
  ever has to be written into a DVC-tracked (byte-reproducible) output.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.config import Config, flatten, to_dict, unrestricted
from deep_repro.errors import TrackingError, scrub
from deep_repro.files import file_digest, file_hashes
from deep_repro.paths import repo_root, store_root
from deep_repro.pipeline import STAGES, StageSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG_PREFIX = "deep_repro"
TAG_KIND = f"{TAG_PREFIX}.kind"            # pipeline | stage | study | trial
TAG_INVOCATION = f"{TAG_PREFIX}.invocation"
TAG_STAGE = f"{TAG_PREFIX}.stage"
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL_STATE = f"{TAG_PREFIX}.trial_state"  # Optuna state of a trial run
TAG_FAIL_REASON = f"{TAG_PREFIX}.fail_reason"
IN_PREFIX = f"{TAG_PREFIX}.in."           # + file path -> md5
OUT_PREFIX = f"{TAG_PREFIX}.out."         # + file path -> md5
UPSTREAM_PREFIX = f"{TAG_PREFIX}.upstream."  # + file path -> producing run id
HEADLINE_METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")


# --------------------------------------------------------------------------- the store
def tracking_uri(cfg_uri: str | None) -> str:
    """`MLFLOW_TRACKING_URI` wins, then `tracking.uri`, then the repo's own sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg_uri:
        return cfg_uri
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Fixed, absolute artifact directory (never under a queued experiment's temp copy)."""
    return store_root() / "mlartifacts"


def _is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def _store_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """A file lock serialising first-time creation/migration of a local sqlite store."""
    if not _is_local_sqlite(uri):
        return contextlib.nullcontext()
    from filelock import FileLock

    db_path = Path(uri.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db_path) + ".lock", timeout=300)


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """Open (creating once, under a lock) the store and the experiment; fail fast if unreachable.

    Returns the client and the experiment id.
    """
    os.environ.pop("MLFLOW_RUN_ID", None)  # would hijack parent/child resolution
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    location = None
                    if _is_local_sqlite(uri):
                        location = (artifact_root() / experiment).as_uri()
                    exp_id = client.create_experiment(experiment, artifact_location=location)
                except MlflowException as exc:  # created concurrently on a remote server
                    if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                        raise
                    exp_id = client.get_experiment_by_name(experiment).experiment_id
            else:
                exp_id = exp.experiment_id
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"tracking store {scrub(uri)} unreachable or unusable "
                            f"({type(exc).__name__}: {scrub(first)[:300]}); set "
                            "tracking.uri or MLFLOW_TRACKING_URI") from None
    return client, exp_id


# --------------------------------------------------------------------------- provenance
def _git(args: list[str], cwd: Path) -> str | None:
    """git's stdout verbatim: porcelain lines start with a meaningful space (` M path`)."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


# Files DVC itself rewrites (params.yaml is recomposed from conf/ by `dvc exp run`, dvc.lock
# after each stage, and the uncached metrics/plots outputs that git tracks): changes to them are
# recorded as params and content hashes; they do not make the *code* dirty.
_GENERATED = {"params.yaml", "dvc.lock"} | {out for s in STAGES.values() for out in s.outs}


def changed_paths(porcelain_z: str) -> list[str]:
    """Paths from `git status --porcelain -z` (`XY path\0`, renames followed by `orig\0`)."""
    entries = porcelain_z.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC" or entry[1] in "RC":
            i += 1  # the rename/copy source path
    return paths


def git_state(root: Path) -> dict[str, str]:
    commit = (_git(["rev-parse", "HEAD"], root) or "").strip() or "unknown"
    status = _git(["status", "--porcelain", "-z", "--untracked-files=no"], root)
    changed = [p for p in changed_paths(status or "") if p not in _GENERATED]
    return {"commit": commit, "dirty": "true" if changed else "false",
            "changed": ",".join(changed)[:4000]}


def _without_credentials(url: str) -> str:
    """`https://user:token@host/x.git` -> `https://host/x.git`; scp-style `git@host:x` is kept
    (`git` there is the ssh login, not a secret)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def git_remote(root: Path) -> str | None:
    """The URL of the `origin` remote (else the first remote), without credentials."""
    names = (_git(["remote"], root) or "").split()
    if not names:
        return None
    name = "origin" if "origin" in names else names[0]
    url = (_git(["remote", "get-url", name], root) or "").strip()
    return _without_credentials(url) if url else None


def repo_relative(path: str | Path, root: Path | None = None) -> str:
    """A path inside the repository as a POSIX path relative to its root (tags must not leak
    or depend on where a clone happens to live); paths outside it are returned unchanged."""
    root = (root or repo_root()).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix()
    try:
        return candidate.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def invocation_key() -> str:
    """Identify the DVC invocation this process belongs to (shared by all its stages).

    DVC runs each stage as `sh -c "<cmd>"` below the `dvc` process (for queued experiments, below
    the per-experiment `dvc exp exec-run` process), so the nearest `dvc` ancestor's pid plus its
    start time is unique per invocation and identical for all of its stages.
    """
    override = os.environ.get("DEEP_REPRO_INVOCATION")
    if override:
        return override
    import psutil

    host = socket.gethostname()
    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except (psutil.Error, OSError):
            continue
        head = [os.path.basename(c) for c in cmd[:3]]
        if "dvc" in head[:2] or head[1:3] == ["-m", "dvc"]:
            return f"{host}:{proc.pid}:{proc.create_time():.3f}"
    # Not under DVC (a stage script run by hand): a pipeline run of its own.
    return f"{host}:{me.pid}:{me.create_time():.3f}"


def environment_tags(cfg: Config) -> dict[str, str]:
    root = repo_root()
    git = git_state(root)
    uv_lock = root / "uv.lock"
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("sklearn", "scikit-learn"), ("numpy", "numpy"),
                       ("mlflow", "mlflow"), ("dvc", "dvc")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(dist)
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    tags = {
        "mlflow.source.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.dirty": git["dirty"],
        f"{TAG_PREFIX}.uv_lock_sha256": (file_digest(uv_lock, "sha256")
                                         if uv_lock.exists() else "missing"),
        f"{TAG_PREFIX}.hostname": socket.gethostname(),
        f"{TAG_PREFIX}.user": user,
        "mlflow.user": user,
        f"{TAG_PREFIX}.seed": str(cfg.seed),
        f"{TAG_PREFIX}.model": cfg.model.name,
    }
    remote = git_remote(root)
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
        tags[f"{TAG_PREFIX}.git.remote"] = remote
    if git["dirty"] == "true":
        tags[f"{TAG_PREFIX}.git.changed"] = git["changed"]
    for name, version in versions.items():
        tags[f"{TAG_PREFIX}.version.{name}"] = version
    torch = sys.modules.get("torch")
    if torch is not None:  # stages that compute (train/postprocess/evaluate) have torch loaded
        cuda = torch.cuda.is_available()
        tags[f"{TAG_PREFIX}.device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[f"{TAG_PREFIX}.dvc_exp_name"] = exp_name
    return tags


# --------------------------------------------------------------------------- pipeline run
def _search_one(client: MlflowClient, exp_id: str, filter_string: str) -> Any | None:
    runs = client.search_runs([exp_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def get_or_create_pipeline_run(client: MlflowClient, exp_id: str, uri: str, cfg: Config,
                               tags: Mapping[str, str], key: str | None = None) -> str:
    key = key or invocation_key()
    with _store_lock(uri):
        found = _search_one(client, exp_id, f"tags.`{TAG_INVOCATION}` = '{key}' and "
                                             f"tags.`{TAG_KIND}` = 'pipeline'")
        if found is not None:
            client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        exp_name = os.environ.get("DVC_EXP_NAME")
        run_name = f"{exp_name or 'pipeline'}-{cfg.model.name}"
        run = client.create_run(exp_id, run_name=run_name, tags={
            **tags, TAG_KIND: "pipeline", TAG_INVOCATION: key,
            "mlflow.note.content": pipeline_note(cfg, tags),
        })
    log_params(client, run.info.run_id, flatten(to_dict(cfg)))
    if tags.get(f"{TAG_PREFIX}.git.dirty") == "true":
        log.warning("working tree has uncommitted code changes (%s): runs are tagged "
                    "deep_repro.git.dirty=true and cannot be reproduced from the commit alone",
                    tags.get(f"{TAG_PREFIX}.git.changed"))
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """The one way params reach MLflow (pipeline, stage, study and trial runs alike).

    Lists and mappings as JSON; credentials in URLs (tracking.uri, tune.storage, data.mirrors)
    scrubbed; values cut to MLflow's 6000 characters, in batches of its 100-param limit.
    """
    from mlflow.entities import Param

    items = [Param(k, scrub(json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000])
             for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def end_run(client: MlflowClient, run_id: str, status: str,
            tags: Mapping[str, str] | None = None, *, missing_ok: bool = False) -> None:
    """The one close-out of a run: its final tags, then its MLflow status.

    `missing_ok`: a run that cannot be updated (deleted, or in another store) is only warned
    about; tuning closes runs recorded by other (possibly dead) workers.
    """
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    try:
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        client.set_terminated(run_id, status)
    except MlflowException as exc:
        if not missing_ok:
            raise
        log.warning("cannot update MLflow run %s: %s", run_id, _first_line(exc))


@dataclass
class Outcome:
    """How a run ends (set inside `closing`): its MLflow status and final tags."""

    status: str = "FAILED"
    tags: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def closing(client: MlflowClient, run_id: str, *, parent_id: str | None = None,
            missing_ok: bool = False) -> Iterator[Outcome]:
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
    except KeyboardInterrupt:
        outcome.status = "KILLED"
        raise
    finally:
        ends = [(run_id, outcome.status, outcome.tags)]
        if parent_id is not None:
            ends.append((parent_id, "FINISHED" if outcome.status == "FINISHED" else "FAILED",
                         {}))
        for rid, status, tags in ends:
            try:
                end_run(client, rid, status, tags, missing_ok=missing_ok)
            except Exception as exc:
                if not failed:
                    raise
                log.warning("cannot close MLflow run %s: %s", rid, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return scrub(text.splitlines()[0])[:300] if text else type(exc).__name__


def _metric_batch(metrics: Mapping[str, float], step: int | None) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]


def pipeline_note(cfg: Config, tags: Mapping[str, str]) -> str:
    commit = tags.get(f"{TAG_PREFIX}.git.commit", "unknown")
    exp = tags.get(f"{TAG_PREFIX}.dvc_exp_name")
    apply = f"dvc exp apply {exp} && " if exp else ""
    return (f"Pipeline run of `{cfg.model.name}`. Reproduce: `git checkout {commit} && "
            f"{apply}uv run dvc repro`. Per-stage details are in the child runs; "
            "`uv run deep-repro lineage <run id>` prints the chain back to the raw files.")


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

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *,
                    pipeline: bool = False) -> None:
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
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".")
                                                 for p in wanted)}


def find_producer(client: MlflowClient, exp_id: str, path: str, md5: str) -> str | None:
    """The most recent stage run that wrote `path` with exactly this content."""
    run = _search_one(client, exp_id, f"tags.`{OUT_PREFIX}{path}` = '{md5}'")
    return run.info.run_id if run else None


def _lock_entry(spec: StageSpec, cfg: Config, deps: dict[str, str], outs: dict[str, str]
                ) -> dict[str, Any]:
    """This execution's dvc.lock entry (DVC writes the same md5s once the stage ends)."""
    return {"cmd": f"python {spec.script}",
            "deps": [{"path": p, "md5": h} for p, h in sorted(deps.items())],
            "params": {"params.yaml": _stage_params(spec, cfg)},
            "outs": [{"path": p, "md5": h} for p, h in sorted(outs.items())]}


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
    parent_id = get_or_create_pipeline_run(client, exp_id, uri, cfg, tags, key)

    code = file_hashes((spec.script,), root)
    deps = file_hashes(spec.deps, root)
    upstream: dict[str, str] = {}
    for path, md5 in deps.items():
        producer = find_producer(client, exp_id, path, md5)
        if producer:
            upstream[f"{UPSTREAM_PREFIX}{path}"] = producer
        else:
            log.warning("no tracked run produced %s (md5 %s): lineage stops here", path, md5)
    run = client.create_run(exp_id, run_name=stage, tags={
        **tags, TAG_KIND: "stage", TAG_STAGE: stage, TAG_PARENT: parent_id,
        TAG_INVOCATION: key, f"{TAG_PREFIX}.dvc_stage": stage,
        f"{TAG_PREFIX}.command": " ".join(sys.argv),
        **{f"{IN_PREFIX}{p}": h for p, h in deps.items()},
        **{f"{TAG_PREFIX}.code.{p}": h for p, h in code.items()},
        **upstream,
    })
    handle = StageRun(client, run.info.run_id, parent_id, spec, exp_id)
    handle.log_params(_stage_params(spec, cfg))
    log.info("MLflow: stage run %s (pipeline run %s) in %s", run.info.run_id, parent_id,
             scrub(uri))
    import shutil

    try:
        with closing(client, run.info.run_id, parent_id=parent_id) as outcome:
            yield handle
            outs = file_hashes(spec.outs, root)
            handle.set_tags({f"{OUT_PREFIX}{p}": h for p, h in outs.items()})
            handle.log_dict(_lock_entry(spec, cfg, deps, outs), "dvc_lock_entry.json")
            outcome.status = "FINISHED"
    finally:
        shutil.rmtree(handle._tmp, ignore_errors=True)


# --------------------------------------------------------------------------- trial runs
@dataclass
class TrialRun:
    """An open MLflow run for one Optuna trial (use via `trial_run`).

    The body sets `state` to the Optuna state the trial ends in (COMPLETE | PRUNED | FAIL,
    the default) and, for a failure, `fail_reason`; both are tagged when the run closes.
    """

    client: MlflowClient
    run_id: str
    experiment_id: str
    state: str = "FAIL"
    fail_reason: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.client.log_batch(self.run_id, metrics=_metric_batch(metrics, step))


@contextlib.contextmanager
def trial_run(client: MlflowClient, exp_id: str, name: str, cfg: Config, *, parent_id: str,
              tags: Mapping[str, str]) -> Iterator[TrialRun]:
    """Open the MLflow run of one tuning trial, a child of the study run `parent_id`.

    The same building blocks as `stage_run`: the full config as params (`log_params`), and
    one close-out (`closing`): a FAIL trial ends FAILED, a COMPLETE or PRUNED one FINISHED
    (pruning is a result), with its state in `deep_repro.trial_state`.
    """
    run = client.create_run(exp_id, run_name=name, tags={
        **tags, TAG_KIND: "trial", TAG_PARENT: parent_id, TAG_TRIAL_STATE: "RUNNING"})
    handle = TrialRun(client, run.info.run_id, exp_id)
    log_params(client, handle.run_id, flatten(to_dict(cfg)))
    # missing_ok: a stale-trial sweep of another worker may have closed this run already.
    with closing(client, handle.run_id, missing_ok=True) as outcome:
        try:
            yield handle
        finally:
            outcome.status = "FAILED" if handle.state == "FAIL" else "FINISHED"
            outcome.tags[TAG_TRIAL_STATE] = handle.state
            if handle.fail_reason:
                outcome.tags[TAG_FAIL_REASON] = handle.fail_reason[:5000]


# --------------------------------------------------------------------------- reading lineage
def resolve_run_id(client: MlflowClient, ref: str) -> str:
    """A run id, or a registered model reference `models:/name@alias` / `models:/name/3`."""
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = client.get_model_version(name, number)
        if not version.run_id:
            raise TrackingError(f"{ref} has no source run")
        return version.run_id
    return ref


def lineage_chain(client: MlflowClient, run_id: str) -> list[Any]:
    """The run and, recursively, the runs that produced its inputs (breadth-first, unique)."""
    from mlflow.exceptions import MlflowException

    try:
        start = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id} not found in the tracking store") from None
    if start.data.tags.get(TAG_KIND) == "pipeline":  # start from its last stage
        children = client.search_runs([start.info.experiment_id],
                                      filter_string=f"tags.`{TAG_PARENT}` = '{run_id}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if not children:
            raise TrackingError(f"pipeline run {run_id} has no stage runs")
        start = children[0]
    chain, seen, queue = [], set(), [start]
    while queue:
        run = queue.pop(0)
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        chain.append(run)
        for key, value in sorted(run.data.tags.items()):
            if key.startswith(UPSTREAM_PREFIX) and value not in seen:
                queue.append(client.get_run(value))
    return chain


# --------------------------------------------------------------------------- datasets
def log_dataset(run: StageRun, name: str, images: Any, labels: Any, digest: str, source: str,
                context: str) -> None:
    """Log a split as an MLflow dataset input whose digest is the file's content hash.

    (MLflow's own numpy digest samples only the first values and collides across subsets.)
    """
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow warns that a local path has two source readers
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(images, targets=labels, name=name, digest=digest[:36],
                                         source=repo_relative(source))
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


# --------------------------------------------------------------------------- model registry
def log_inference_model(run: StageRun, program_path: Path, example: Any, model_name: str,
                        ) -> str | None:
    """Log the exported program as a pyfunc model and register a new version.

    Returns the registered version number. The pyfunc wrapper (`deep_repro/serving.py`) and the
    archive check it loads the program with (`deep_repro/safe_archive.py`) are logged as code,
    so `mlflow models serve -m models:/<name>@champion` needs no project code.
    """
    import importlib.util
    import warnings

    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from deep_repro import inference, safe_archive

    # Run the very wrapper that will be logged on the example to derive the output schema.
    code = Path(__file__).with_name("serving.py")
    spec = importlib.util.spec_from_file_location("deep_repro_serving", code)
    assert spec is not None and spec.loader is not None
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    wrapper = serving.FashionMNISTClassifier()
    wrapper.program = inference.load_inference_model(program_path)
    # float64, not uint8: see serving.py (JSON input must reach the model's own range check).
    example = np.asarray(example, dtype=np.float64)
    output = wrapper.predict(None, example)
    # MLflow's advice about type hints / integer columns does not apply: the signature comes
    # from a real example, and the class index can never be missing. MLflow reloads the model to
    # check the example: that is no prediction to record in the (opt-in) prediction log.
    with warnings.catch_warnings(), mlflow.start_run(run_id=run.run_id), \
            _env_unset("DEEP_REPRO_PREDICTION_LOG"):
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="inference_model", python_model=str(code),
            artifacts={"program": str(program_path)},
            code_paths=[str(Path(safe_archive.__file__))],
            signature=infer_signature(example, output), input_example=example,
            registered_model_name=model_name,
            pip_requirements=[f"mlflow=={mlflow.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"])
    version = getattr(info, "registered_model_version", None)
    return str(version) if version is not None else None


@contextlib.contextmanager
def _env_unset(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def model_version_for_run(client: MlflowClient, model_name: str, run_id: str) -> Any | None:
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


@dataclass(frozen=True)
class GateDecision:
    validated: bool
    promoted: bool
    reason: str


def validation_gate(client: MlflowClient, model_name: str, version: str, test_accuracy: float,
                    baseline: float) -> GateDecision:
    """Model validation: a version becomes `@champion` only if it beats the baseline *and* the
    current champion's test accuracy. Every evaluated version gets a `validation_status` tag."""
    from mlflow.exceptions import MlflowException

    champion = None
    with contextlib.suppress(MlflowException):
        champion = client.get_model_version_by_alias(model_name, "champion")
    champ_acc = None
    if champion is not None:
        with contextlib.suppress(KeyError, ValueError):
            champ_acc = float(champion.tags["test_accuracy"])
    client.set_model_version_tag(model_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    if test_accuracy <= baseline:
        decision = GateDecision(False, False, f"test accuracy {test_accuracy:.4f} does not beat "
                                f"evaluate.baseline {baseline:.4f}")
    elif champion is not None and str(champion.version) == str(version):
        decision = GateDecision(True, False, f"version {version} is already the champion")
    elif champ_acc is not None and test_accuracy <= champ_acc:
        decision = GateDecision(True, False, f"validated (beats baseline {baseline:.4f}) but "
                                f"does not beat champion v{champion.version} "  # type: ignore
                                f"({test_accuracy:.4f} <= {champ_acc:.4f})")
    else:
        client.set_registered_model_alias(model_name, "champion", version)
        prev = f" (previous: v{champion.version}, {champ_acc})" if champion is not None else ""
        decision = GateDecision(True, True, f"test accuracy {test_accuracy:.4f} beats baseline "
                                f"{baseline:.4f}: version {version} is now @champion{prev}")
    client.set_model_version_tag(model_name, version, "validation_status",
                                 "validated" if decision.validated else "rejected")
    client.set_model_version_tag(model_name, version, "validation_reason", decision.reason)
    return decision


def judge_registered_model(run: StageRun, model_name: str, root: Path, test_accuracy: float,
                           baseline: float) -> GateDecision:
    """Run the validation gate on the registry version built from exactly this inference model
    (found by its md5 through the postprocess run that produced it), and record the verdict on
    the evaluate and pipeline runs."""
    from deep_repro.pipeline import INFERENCE_MODEL

    md5 = file_digest(root / INFERENCE_MODEL)
    producer = find_producer(run.client, run.experiment_id, INFERENCE_MODEL, md5)
    version = model_version_for_run(run.client, model_name, producer) if producer else None
    if version is None:
        decision = GateDecision(False, False, f"no registered version of {model_name} was built "
                                f"from {INFERENCE_MODEL} (md5 {md5}): gate skipped")
        log.warning(decision.reason)
        return decision
    decision = validation_gate(run.client, model_name, str(version.version), test_accuracy,
                               baseline)
    run.set_tags({"validation_status": "validated" if decision.validated else "rejected",
                  "validation_reason": decision.reason,
                  "model_version": str(version.version)}, pipeline=True)
    return decision
