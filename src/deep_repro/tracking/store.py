"""The MLflow store: where runs go, how to connect, and the tag vocabulary of all runs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.errors import TrackingError, first_line, scrub
from deep_repro.paths import store_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from deep_repro.config.schema import Config

log = logging.getLogger(__name__)


TAG_PREFIX = "deep_repro"
TAG_KIND = f"{TAG_PREFIX}.kind"  # pipeline | stage | study | trial
TAG_INVOCATION = f"{TAG_PREFIX}.invocation"
TAG_STAGE = f"{TAG_PREFIX}.stage"
TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL_STATE = f"{TAG_PREFIX}.trial_state"  # Optuna state of a trial run
TAG_FAIL_REASON = f"{TAG_PREFIX}.fail_reason"
IN_PREFIX = f"{TAG_PREFIX}.in."  # + file path -> md5
OUT_PREFIX = f"{TAG_PREFIX}.out."  # + file path -> md5
UPSTREAM_PREFIX = f"{TAG_PREFIX}.upstream."  # + file path -> producing run id
UPSTREAM_USER_PREFIX = f"{TAG_PREFIX}.upstream_user."  # + file path -> producer's user, if not me
PLATFORM_PREFIX = f"{TAG_PREFIX}.platform."  # + deep_repro.machine.KEYS -> value
# Artifacts of every finished stage run: its dvc.lock entry, and the `validate` entry of its
# invocation (every param, typed): what a reproduction rebuilds params.yaml from.
LOCK_ENTRY_ARTIFACT = "dvc_lock_entry.json"
VALIDATE_ENTRY_ARTIFACT = "dvc_lock_validate.json"
HEADLINE_METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")
# The MLflow UI's experiment kind (set by its "Machine learning" / "GenAI" switch): this is a
# model-training experiment, not a GenAI one (whose page opens on traces and evaluations).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved runs-table view (MLflow's "shared view", an experiment tag) that shows the headline
# metrics: the UI's default view hides every metric and param column. Opened by
# `#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=deep-repro`.
VIEW_KEY = "deep-repro"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def _view_state() -> str:
    import json

    columns = [f"attributes.`{a}`" for a in ("Source", "Version")]
    # Validation first: it is what the gate and the leaderboard decide on.
    columns += [f"metrics.`{m}`" for m in ("val_accuracy", "test_accuracy", "test_macro_f1")]
    columns += ["params.`model.name`"]
    return json.dumps(
        {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    )


# A reproduction (`deep-repro reproduce`) runs the pipeline with this set to the run it
# reproduces: it registers no model version, moves no alias and runs no gate.
REPRODUCES_ENV = "DEEP_REPRO_REPRODUCES"


def reproducing() -> str | None:
    """The run id this process reproduces, if it is part of a reproduction."""
    return os.environ.get(REPRODUCES_ENV) or None


# --------------------------------------------------------------------------- the store
def tracking_uri(cfg_uri: str | None, explicit: str | None = None) -> str:
    """`explicit` (a --tracking-uri flag) wins, then `MLFLOW_TRACKING_URI`, then `tracking.uri`,
    then the repo's own sqlite store; always without a password (`credentials_to_env`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit or env or cfg_uri or f"sqlite:///{store_root() / 'mlflow.db'}"
    bare = credentials_to_env(uri)
    if env and not explicit:
        os.environ["MLFLOW_TRACKING_URI"] = bare  # nothing later (or spawned) sees the password
    return bare


def project_tracking_uri(explicit: str | None = None) -> tuple[str, Config | None]:
    """The store a command uses (`tracking_uri`, with params.yaml's `tracking.uri` inside a
    project) and the project's config (None outside one). Reads params.yaml without checking
    `model`, so neither MLflow nor the model code is imported: `predict` starts fast."""
    from deep_repro import config
    from deep_repro.errors import DeepReproError

    cfg = None
    with contextlib.suppress(DeepReproError):  # outside a project: MLFLOW_TRACKING_URI/default
        cfg = config.load_config(model=False)
    return tracking_uri(cfg.tracking.uri if cfg else None, explicit), cfg


def credentials_to_env(uri: str) -> str:
    """`http://u:pw@host` -> `http://host`, the user and password moved into
    MLFLOW_TRACKING_USERNAME/PASSWORD (where MLflow's REST client reads them; values already set
    there win); a PostgreSQL password into PGPASSWORD (libpq reads it). Otherwise MLflow would
    print the password in its own console lines ("View run ... at http://u:pw@host/...")."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password, user = parts.password, parts.username
    except ValueError:
        return uri  # not a URL at all: `connect` reports it
    scheme = parts.scheme.split("+", 1)[0].lower()
    if password is None or scheme not in ("http", "https", "postgresql"):
        return uri
    from urllib.parse import unquote

    host = parts.netloc.rsplit("@", 1)[1]
    if scheme == "postgresql":  # the user name is no secret and libpq needs it in the URL
        os.environ.setdefault("PGPASSWORD", unquote(password))
        host = f"{user}@{host}" if user else host
    else:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user or ""))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    return urlunsplit(parts._replace(netloc=host))


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


def unusable(uri: str, exc: BaseException) -> TrackingError:
    """The one-line error for a store that cannot be used: a refused login is named as such
    (with the user name tried), not as "set tracking.uri"."""
    first = scrub(first_line(exc))
    if "401" in first or "Unauthorized" in first or "UNAUTHENTICATED" in first:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"the login {user!r}" if user else "a request without a login"
        return TrackingError(
            f"tracking server {scrub(uri)} refused {who} (401): check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    return TrackingError(
        f"tracking store {scrub(uri)} unreachable or unusable "
        f"({type(exc).__name__}: {first[:300]}); set tracking.uri or MLFLOW_TRACKING_URI"
    )


def read_client(uri: str) -> MlflowClient:
    """A client for reading the store at `uri`: creates no experiment and writes nothing (the
    leaderboard); fails fast, in one line, when the store cannot be read."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    uri = credentials_to_env(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    try:
        with _store_lock(uri):  # a first use of a local sqlite store creates its tables
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:
        raise unusable(uri, exc) from None
    return client


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """Open (creating once, under a lock) the store and the experiment; fail fast if unreachable.

    Returns the client and the experiment id.
    """
    os.environ.pop("MLFLOW_RUN_ID", None)  # would hijack parent/child resolution
    uri = credentials_to_env(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from deep_repro.tracking import spool

    if spool.offline_from_start():  # a node that cannot reach the store: spool everything
        offline = spool.ResilientClient(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)
        spool.mark_offline(offline)
        return offline, f"{spool.OFFLINE_EXPERIMENT}{experiment}"  # type: ignore[return-value]
    try:
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    location = None
                    if _is_local_sqlite(uri):
                        location = (artifact_root() / experiment).as_uri()
                    exp_id = client.create_experiment(
                        experiment,
                        artifact_location=location,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: _view_state()},
                    )
                except MlflowException as exc:  # created concurrently on a remote server
                    if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                        raise
                    existing = client.get_experiment_by_name(experiment)
                    if existing is None:  # deleted again in between: report the first error
                        raise
                    exp_id = existing.experiment_id
            else:
                exp_id = exp.experiment_id
                # Made before these tags, or by hand; a kind chosen in the UI is kept.
                if EXPERIMENT_KIND_TAG not in exp.tags:
                    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                if exp.tags.get(VIEW_TAG) != _view_state():
                    client.set_experiment_tag(exp_id, VIEW_TAG, _view_state())
    except Exception as exc:
        raise unusable(uri, exc) from None
    from deep_repro.tracking.spool import ResilientClient  # an outage from here on is spooled

    return ResilientClient(client, uri), exp_id  # type: ignore[return-value]  # a duck-typed MlflowClient proxy


def _search_one(client: MlflowClient, exp_id: str, filter_string: str) -> Any | None:
    runs = client.search_runs(
        [exp_id],
        filter_string=filter_string,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def end_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    tags: Mapping[str, str] | None = None,
    *,
    missing_ok: bool = False,
) -> None:
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
        log.warning("cannot update MLflow run %s: %s", run_id, first_line(exc))
