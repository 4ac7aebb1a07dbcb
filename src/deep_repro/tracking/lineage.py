"""Reading lineage: from a run or a registered model back to the raw files, by content."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from deep_repro.errors import TrackingError
from deep_repro.tracking.store import (
    OUT_PREFIX,
    TAG_KIND,
    TAG_PARENT,
    UPSTREAM_PREFIX,
    _search_one,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def find_producer(client: MlflowClient, exp_id: str, path: str, md5: str) -> str | None:
    """The most recent stage run that wrote `path` with exactly this content."""
    run = _search_one(client, exp_id, f"tags.`{OUT_PREFIX}{path}` = '{md5}'")
    return run.info.run_id if run else None



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
