"""Reading lineage: from a run or a registered model back to the raw files, by content."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from deep_repro.errors import TrackingError
from deep_repro.tracking.store import (
    OUT_PREFIX,
    TAG_INVOCATION,
    TAG_KIND,
    TAG_PARENT,
    TAG_PREFIX,
    UPSTREAM_PREFIX,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def find_producer(
    client: MlflowClient,
    exp_id: str,
    path: str,
    md5: str,
    *,
    invocation: str | None = None,
    user: str | None = None,
    repo: str | None = None,
) -> str | None:
    """The id of `producer_run`."""
    run = producer_run(client, exp_id, path, md5, invocation=invocation, user=user, repo=repo)
    return str(run.info.run_id) if run is not None else None


def producer_run(
    client: MlflowClient,
    exp_id: str,
    path: str,
    md5: str,
    *,
    invocation: str | None = None,
    user: str | None = None,
    repo: str | None = None,
) -> Any | None:
    """The stage run that wrote `path` with exactly this content.

    On a shared server several users produce the same bytes; prefer, in order, the run of the
    same DVC invocation, then the same user in the same repository (git remote), then the same
    user, then the most recent run of anybody (a link to another user's run is marked as such
    by the caller).
    """
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{OUT_PREFIX}{path}` = '{md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    if not runs:
        return None

    def rank(run: Any) -> int:
        tags = run.data.tags
        same_user = user is not None and tags.get(f"{TAG_PREFIX}.user") == user
        if invocation is not None and tags.get(TAG_INVOCATION) == invocation:
            return 0
        if same_user and repo is not None and tags.get(f"{TAG_PREFIX}.git.remote") == repo:
            return 1
        return 2 if same_user else 3

    return min(runs, key=rank)  # min is stable: the most recent within a rank


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
        children = client.search_runs(
            [start.info.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{run_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
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
