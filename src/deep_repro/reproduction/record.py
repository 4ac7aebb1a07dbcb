"""The record of a result: everything a third party needs to re-derive it, in one JSON file.

Built from the tracking store (the run, and the runs that produced its inputs, found by content
hash: `tracking.lineage_chain`) or read from a file that `deep-repro lineage RUN --export` wrote:
a paper's reviewer has no access to the author's MLflow, only to git and the DVC remote.

What is in it and why:
- `commit`, `remote`, `uv_lock_sha256`: the code and the environment (the remote must have the
  commit: a reproduction clones it, never the user's checkout);
- `params`: the whole params.yaml with its types (DVC's `validate` entry, logged by every stage
  run), not MLflow's stringified params: a reproduction writes it back;
- `stages`: per stage, in pipeline order, its `dvc.lock` entry (md5 of every input and output),
  metrics and platform (`deep_repro.machine`): what a reproduction compares with;
- `predictions`: the per-image predictions file of the evaluate stage (its md5 is checked against
  the recorded output): what a statistical comparison needs when the bytes differ.

A record is data from someone else: it is parsed with a strict schema and nothing in it is run,
except the commit's own pipeline, in an isolated clone.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deep_repro.errors import DeepReproError, TrackingError, first_line
from deep_repro.files import write_bytes
from deep_repro.pipeline import PREDICTIONS, STAGES

if TYPE_CHECKING:
    from mlflow import MlflowClient

FORMAT = "deep-repro/record/1"
MAX_BYTES = 16 * 1024 * 1024
# Stages whose outputs must be bit-identical on any machine: integer work on files (no float
# reduction whose order a CPU or a thread count could change).
DATA_STAGES = ("download", "preprocess", "split", "analyze")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileHash(_Strict):
    path: str
    md5: str = Field(pattern=r"^[0-9a-f]{32}$")


class LockEntry(_Strict):
    """One stage's `dvc.lock` entry, as the run recorded it."""

    cmd: str
    deps: list[FileHash]
    params: dict[str, dict[str, Any]]
    outs: list[FileHash]


class StageRecord(_Strict):
    stage: str
    run_id: str
    lock: LockEntry
    metrics: dict[str, float]
    platform: dict[str, str]
    user: str | None = None


class Record(_Strict):
    format: Literal["deep-repro/record/1"] = "deep-repro/record/1"
    ref: str  # what was asked for: a run id or models:/NAME@ALIAS
    run_id: str  # the stage run whose result this is
    experiment: str
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    remote: str | None
    dirty: bool
    changed: str = ""
    dvc_exp_name: str | None = None
    uv_lock_sha256: str
    params: dict[str, Any]
    stages: list[StageRecord]
    predictions: str | None = None  # reports/eval/predictions.json, verbatim

    @property
    def target(self) -> StageRecord:
        return self.stages[-1]

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.stage == name), None)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(), indent=1, sort_keys=True) + "\n").encode()

    def save(self, path: Path) -> None:
        write_bytes(path, self.to_bytes())


def load(path: Path) -> Record:
    """A record file, checked field by field; any fault is one line naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DeepReproError(f"{path}: cannot read the record ({exc.strerror})") from None
    if len(data) > MAX_BYTES:
        raise DeepReproError(f"{path}: {len(data)} bytes, not a record (at most {MAX_BYTES})")
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DeepReproError(f"{path}: not a record file (expected format {FORMAT!r})")
        return Record.model_validate(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepReproError(f"{path}: not a record file (invalid JSON: {exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise DeepReproError(f"{path}: record field {where}: {err['msg']}") from None


# --------------------------------------------------------------------------- from the store
def _artifact_json(client: MlflowClient, run_id: str, name: str, tmp: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        local = Path(client.download_artifacts(run_id, name, tmp))
        return json.loads(local.read_text(encoding="utf-8"))
    except (MlflowException, OSError, json.JSONDecodeError):
        return None


def _evaluated_by(client: MlflowClient, run_id: str) -> str | None:
    """The finished evaluate run that scored the inference model `run_id` (a model version's
    postprocess run) produced: reproducing a model means reproducing its metrics too, and only
    evaluate records the per-image predictions a statistical verdict needs."""
    from deep_repro import tracking
    from deep_repro.pipeline import INFERENCE_MODEL

    run = client.get_run(run_id)
    if run.data.tags.get(tracking.TAG_STAGE) != "postprocess":
        return None
    md5 = run.data.tags.get(f"{tracking.OUT_PREFIX}{INFERENCE_MODEL}")
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=(
            f"tags.`{tracking.TAG_STAGE}` = 'evaluate' and "
            f"tags.`{tracking.UPSTREAM_PREFIX}{INFERENCE_MODEL}` = '{run_id}' and "
            f"tags.`{tracking.IN_PREFIX}{INFERENCE_MODEL}` = '{md5}' and "
            "attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return str(found[0].info.run_id) if found else None


def from_tracking(client: MlflowClient, ref: str) -> Record:
    """The record of `ref` (a pipeline or stage run id, models:/NAME@ALIAS, models:/NAME/N)."""
    import os

    from mlflow.exceptions import MlflowException

    from deep_repro import tracking
    from deep_repro.files import file_digest

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files

    try:
        run_id = tracking.resolve_run_id(client, ref)
    except MlflowException as exc:
        raise TrackingError(f"{ref}: {first_line(exc)}") from None
    if ref.startswith("models:/"):
        run_id = _evaluated_by(client, run_id) or run_id
    order = list(STAGES)
    runs = tracking.lineage_chain(client, run_id)
    for run in runs:
        if run.data.tags.get(tracking.TAG_STAGE) not in STAGES:
            raise DeepReproError(
                f"run {run.info.run_id} is not a pipeline stage run (no {tracking.TAG_STAGE} "
                "tag): nothing records how it was made"
            )
    chain = sorted(
        runs,
        key=lambda r: order.index(r.data.tags.get(tracking.TAG_STAGE, order[0])),
    )
    target = chain[-1]
    tags = target.data.tags
    prefix = tracking.TAG_PREFIX
    stages: list[StageRecord] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in chain:
            name = run.data.tags.get(tracking.TAG_STAGE, "?")
            if run.info.status != "FINISHED":
                raise DeepReproError(
                    f"{name} run {run.info.run_id} is {run.info.status}: only a finished "
                    "run has a result to reproduce"
                )
            lock = _artifact_json(client, run.info.run_id, tracking.LOCK_ENTRY_ARTIFACT, tmp)
            if lock is None:
                raise DeepReproError(
                    f"{name} run {run.info.run_id} has no {tracking.LOCK_ENTRY_ARTIFACT}: "
                    "it predates recorded lock entries and cannot be reproduced"
                )
            lock = {k: lock[k] for k in ("cmd", "deps", "params", "outs") if k in lock}
            tagged = {
                k.removeprefix(tracking.OUT_PREFIX): v
                for k, v in run.data.tags.items()
                if k.startswith(tracking.OUT_PREFIX)
            }
            listed = {o.get("path"): o.get("md5") for o in lock.get("outs", [])}
            if tagged != listed:  # two records of one fact disagree: believe neither
                raise DeepReproError(
                    f"{name} run {run.info.run_id}: its output tags and its "
                    f"{tracking.LOCK_ENTRY_ARTIFACT} disagree: the record was altered"
                )
            platform = {
                k.removeprefix(tracking.PLATFORM_PREFIX): v
                for k, v in run.data.tags.items()
                if k.startswith(tracking.PLATFORM_PREFIX)
            }
            stages.append(
                StageRecord(
                    stage=name,
                    run_id=run.info.run_id,
                    lock=LockEntry.model_validate(lock),
                    metrics={k: float(v) for k, v in run.data.metrics.items()},
                    platform=platform,
                    user=run.data.tags.get(f"{prefix}.user"),
                )
            )
        validate = _artifact_json(client, target.info.run_id, tracking.VALIDATE_ENTRY_ARTIFACT, tmp)
        if not isinstance(validate, dict) or not isinstance(validate.get("params"), dict):
            raise DeepReproError(
                f"run {target.info.run_id} has no {tracking.VALIDATE_ENTRY_ARTIFACT} (every "
                "param, typed): it predates reproducible records and cannot be reproduced"
            )
        params = validate["params"].get("params.yaml", {})
        predictions = None
        evaluate = next((s for s in stages if s.stage == "evaluate"), None)
        if evaluate is not None:
            want = next((o.md5 for o in evaluate.lock.outs if o.path == PREDICTIONS), None)
            try:
                local = Path(
                    client.download_artifacts(evaluate.run_id, Path(PREDICTIONS).name, tmp)
                )
            except (MlflowException, OSError):
                local = None
            if local is not None and want and file_digest(local) == want:
                predictions = local.read_text(encoding="utf-8")
    commit = tags.get(f"{prefix}.git.commit", "")
    if len(commit) != 40:
        raise DeepReproError(f"run {target.info.run_id} records no git commit: not reproducible")
    dirty = [r for r in chain if r.data.tags.get(f"{prefix}.git.dirty") == "true"]
    return Record(
        ref=ref,
        run_id=target.info.run_id,
        experiment=client.get_experiment(target.info.experiment_id).name,
        commit=commit,
        remote=tags.get(f"{prefix}.git.remote"),
        dirty=bool(dirty),
        changed=",".join(
            sorted(
                {
                    c
                    for r in dirty
                    for c in r.data.tags.get(f"{prefix}.git.changed", "").split(",")
                    if c
                }
            )
        ),
        dvc_exp_name=tags.get(f"{prefix}.dvc_exp_name"),
        uv_lock_sha256=tags.get(f"{prefix}.uv_lock_sha256", "missing"),
        params=params,
        stages=stages,
        predictions=predictions,
    )
