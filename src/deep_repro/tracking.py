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
import hashlib
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

from deep_repro.config import Config, flatten, to_dict
from deep_repro.errors import TrackingError, scrub
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
IN_PREFIX = f"{TAG_PREFIX}.in."           # + file path -> md5
OUT_PREFIX = f"{TAG_PREFIX}.out."         # + file path -> md5
UPSTREAM_PREFIX = f"{TAG_PREFIX}.upstream."  # + file path -> producing run id
UPSTREAM_USER_PREFIX = f"{TAG_PREFIX}.upstream_user."  # + file path -> producer's user, if not me
HEADLINE_METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")


# --------------------------------------------------------------------------- the store
def redact_uri(uri: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://***@host/db` (never log secrets)."""
    return scrub(uri)


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
        raise TrackingError(f"tracking store {redact_uri(uri)} unreachable or unusable "
                            f"({type(exc).__name__}: {redact_uri(first)[:300]}); set "
                            "tracking.uri or MLFLOW_TRACKING_URI") from None
    return client, exp_id


# --------------------------------------------------------------------------- content hashes
def md5_file(path: Path) -> str:
    """The md5 DVC records for a file in dvc.lock."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(paths: tuple[str, ...], root: Path) -> dict[str, str]:
    return {p: md5_file(root / p) for p in paths if (root / p).is_file()}


# --------------------------------------------------------------------------- provenance
def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# Files DVC itself rewrites (params.yaml is recomposed from conf/ by `dvc exp run`, dvc.lock
# after each stage, and the uncached metrics/plots outputs that git tracks): changes to them are
# recorded as params and content hashes; they do not make the *code* dirty.
_GENERATED = {"params.yaml", "dvc.lock"} | {out for s in STAGES.values() for out in s.outs}


def git_state(root: Path) -> dict[str, str]:
    commit = _git(["rev-parse", "HEAD"], root) or "unknown"
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    changed = [line[3:] for line in (status or "").splitlines() if line[3:] not in _GENERATED]
    return {"commit": commit, "dirty": "true" if changed else "false",
            "changed": ",".join(changed)[:4000]}


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


def run_user(configured: str | None = None) -> str:
    """Who runs this: `tracking.user`, else the MLflow login (`MLFLOW_TRACKING_USERNAME`, one
    account per student on a shared server), else the OS user."""
    if configured:
        return configured
    login = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if login:
        return login
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def pipeline_run_name(user: str, model: str, exp_name: str | None) -> str:
    """Readable and unique per invocation: `alice-cnn-curly-bear` (the DVC experiment name), or
    `alice-cnn-1128-171502-3f9a` for a plain `dvc repro`."""
    import time

    if not exp_name:
        exp_name = f"{time.strftime('%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    return f"{user}-{model}-{exp_name}"


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
    user = run_user(cfg.tracking.user)
    tags = {
        "mlflow.source.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.dirty": git["dirty"],
        f"{TAG_PREFIX}.uv_lock_sha256": (hashlib.sha256(uv_lock.read_bytes()).hexdigest()
                                         if uv_lock.exists() else "missing"),
        f"{TAG_PREFIX}.hostname": socket.gethostname(),
        f"{TAG_PREFIX}.user": user,
        "mlflow.user": user,
        f"{TAG_PREFIX}.seed": str(cfg.seed),
        f"{TAG_PREFIX}.model": cfg.model.name,
        f"{TAG_PREFIX}.workdir": str(root),
    }
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
        run_name = pipeline_run_name(tags.get(f"{TAG_PREFIX}.user") or run_user(cfg.tracking.user),
                                     cfg.model.name, os.environ.get("DVC_EXP_NAME"))
        run = client.create_run(exp_id, run_name=run_name, tags={
            **tags, TAG_KIND: "pipeline", TAG_INVOCATION: key,
            "mlflow.note.content": pipeline_note(cfg, tags),
        })
    from mlflow.entities import Param

    params = [Param(k, _param_value(v)) for k, v in flatten(to_dict(cfg)).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    if tags.get(f"{TAG_PREFIX}.git.dirty") == "true":
        log.warning("working tree has uncommitted code changes (%s): runs are tagged "
                    "deep_repro.git.dirty=true and cannot be reproduced from the commit alone",
                    tags.get(f"{TAG_PREFIX}.git.changed"))
    return run.info.run_id


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]


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
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *,
                    pipeline: bool = False) -> None:
        """Log metrics on this stage run (and, for headline numbers, on the pipeline run)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
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


def find_producer(client: MlflowClient, exp_id: str, path: str, md5: str, *,
                  invocation: str | None = None, user: str | None = None,
                  workdir: str | None = None) -> str | None:
    """The id of `producer_run`."""
    run = producer_run(client, exp_id, path, md5, invocation=invocation, user=user,
                       workdir=workdir)
    return str(run.info.run_id) if run is not None else None


def producer_run(client: MlflowClient, exp_id: str, path: str, md5: str, *,
                 invocation: str | None = None, user: str | None = None,
                 workdir: str | None = None) -> Any | None:
    """The stage run that wrote `path` with exactly this content.

    On a shared server several users produce the same bytes; prefer, in order, the run of the
    same DVC invocation, then the same user in the same checkout, then the same user, then the
    most recent run of anybody (a link to another user's run is marked as such by the caller).
    """
    runs = client.search_runs([exp_id], filter_string=f"tags.`{OUT_PREFIX}{path}` = '{md5}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    if not runs:
        return None

    def rank(run: Any) -> int:
        tags = run.data.tags
        same_user = user is not None and tags.get(f"{TAG_PREFIX}.user") == user
        if invocation is not None and tags.get(TAG_INVOCATION) == invocation:
            return 0
        if same_user and workdir is not None and tags.get(f"{TAG_PREFIX}.workdir") == workdir:
            return 1
        return 2 if same_user else 3

    return min(runs, key=rank)  # min is stable: the most recent within a rank


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
    user = tags[f"{TAG_PREFIX}.user"]
    for path, md5 in deps.items():
        producer = producer_run(client, exp_id, path, md5, invocation=key, user=user,
                                workdir=tags[f"{TAG_PREFIX}.workdir"])
        if producer is not None:
            upstream[f"{UPSTREAM_PREFIX}{path}"] = producer.info.run_id
            other = producer.data.tags.get(f"{TAG_PREFIX}.user", user)
            if other != user:  # reproducible from its commit + params, not from this checkout
                upstream[f"{UPSTREAM_USER_PREFIX}{path}"] = other
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
             redact_uri(uri))
    status = "FAILED"
    try:
        yield handle
        outs = file_hashes(spec.outs, root)
        handle.set_tags({f"{OUT_PREFIX}{p}": h for p, h in outs.items()})
        handle.log_dict(_lock_entry(spec, cfg, deps, outs), "dvc_lock_entry.json")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run.info.run_id, status)
        client.set_terminated(parent_id, "FINISHED" if status == "FINISHED" else "FAILED")
        import shutil

        shutil.rmtree(handle._tmp, ignore_errors=True)


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
                                         source=source)
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])


# --------------------------------------------------------------------------- model registry
def log_inference_model(run: StageRun, program_path: Path, example: Any, model_name: str,
                        ) -> str | None:
    """Log the exported program as a pyfunc model and register a new version.

    Returns the registered version number. The pyfunc wrapper (`deep_repro/serving.py`) is logged
    as code, so `mlflow models serve -m models:/<name>@champion` needs no project code.
    """
    import importlib.util
    import warnings

    import mlflow
    import mlflow.pyfunc
    import torch
    from mlflow.models import infer_signature

    # Run the very wrapper that will be logged on the example to derive the output schema.
    code = Path(__file__).with_name("serving.py")
    spec = importlib.util.spec_from_file_location("deep_repro_serving", code)
    assert spec is not None and spec.loader is not None
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    wrapper = serving.FashionMNISTClassifier()
    wrapper.program = torch.export.load(str(program_path)).module()
    output = wrapper.predict(None, example)
    # MLflow's advice about type hints / integer columns does not apply: the signature comes
    # from a real example, and the class index can never be missing.
    with warnings.catch_warnings(), mlflow.start_run(run_id=run.run_id):
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="inference_model", python_model=str(code),
            artifacts={"program": str(program_path)},
            signature=infer_signature(example, output), input_example=example,
            registered_model_name=model_name,
            pip_requirements=[f"mlflow=={mlflow.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"])
    version = getattr(info, "registered_model_version", None)
    return str(version) if version is not None else None


def model_version_for_run(client: MlflowClient, model_name: str, run_id: str) -> Any | None:
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


@dataclass(frozen=True)
class GateDecision:
    validated: bool
    promoted: bool
    reason: str


CHAMPION = "champion"
GATE_MAX_ROUNDS = 20


def _champion_version(client: MlflowClient, model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:  # no alias yet
        return None


def best_validated_version(client: MlflowClient, model_name: str, metric: str
                           ) -> tuple[str, float] | None:
    """The validated version with the highest `metric` tag (ties: the older version)."""
    best: tuple[float, int] | None = None
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get("validation_status") != "validated":
            continue
        try:
            score = float(mv.tags[metric])
        except (KeyError, ValueError):  # validated under another metric: not comparable
            continue
        key = (score, -int(mv.version))
        if best is None or key > best:
            best = key
    return (str(-best[1]), best[0]) if best is not None else None


def validation_gate(client: MlflowClient, model_name: str, version: str, score: float,
                    baseline: float, *, metric: str = "test_accuracy") -> GateDecision:
    """Model validation: a version is *validated* if its `metric` beats the baseline, and
    `@champion` always points at the best validated version.

    Race-free without locks: gates of concurrent pipelines (a class on one server) first record
    their own score and status as version tags, then repeat "read the alias, find the best
    validated version, move the alias there" until the alias already points at the best. The
    set of validated versions only grows and every gate checks again after its last write, so
    whichever gate finishes last leaves the right champion, in any interleaving.
    """
    previous = _champion_version(client, model_name)
    # Score before status: a version counted as validated always has a comparable score.
    client.set_model_version_tag(model_name, version, metric, f"{score:.6f}")
    validated = score > baseline
    client.set_model_version_tag(model_name, version, "validation_status",
                                 "validated" if validated else "rejected")
    champion = previous
    for _ in range(GATE_MAX_ROUNDS):
        champion = _champion_version(client, model_name)  # alias first, then the best
        best = best_validated_version(client, model_name, metric)
        if best is None or champion == best[0]:
            break
        client.set_registered_model_alias(model_name, CHAMPION, best[0])
    else:
        log.warning("@champion of %s still moving after %d rounds; the last gate settles it",
                    model_name, GATE_MAX_ROUNDS)
    if not validated:
        reason = f"{metric} {score:.4f} does not beat evaluate.baseline {baseline:.4f}"
    elif champion == version and previous == version:
        reason = f"version {version} is already the champion"
    elif champion == version:
        prev = f" (previous: v{previous})" if previous is not None else ""
        reason = (f"{metric} {score:.4f} beats baseline {baseline:.4f}: version {version} is "
                  f"now @champion{prev}")
    else:
        reason = (f"validated (beats baseline {baseline:.4f}) but does not beat champion "
                  f"v{champion} ({metric} {score:.4f})")
    decision = GateDecision(validated, validated and champion == version != previous, reason)
    client.set_model_version_tag(model_name, version, "validation_reason", decision.reason)
    return decision


def judge_registered_model(run: StageRun, model_name: str, root: Path, test_accuracy: float,
                           baseline: float) -> GateDecision:
    """Run the validation gate on the registry version built from exactly this inference model
    (found by its md5 through the postprocess run that produced it), and record the verdict on
    the evaluate and pipeline runs."""
    from deep_repro.pipeline import INFERENCE_MODEL

    md5 = md5_file(root / INFERENCE_MODEL)
    producer = find_producer(run.client, run.experiment_id, INFERENCE_MODEL, md5,
                             invocation=invocation_key())
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
