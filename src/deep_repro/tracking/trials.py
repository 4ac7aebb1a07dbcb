"""Trial runs of an Optuna study: built from the same blocks as a stage run (params, close-out)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deep_repro.config.schema import Config
from deep_repro.tracking.provenance import (
    used_params,
)
from deep_repro.tracking.store import (
    TAG_FAIL_REASON,
    TAG_KIND,
    TAG_PARENT,
    TAG_TRIAL_STATE,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

from deep_repro.tracking.runs import _metric_batch, closing, log_params

log = logging.getLogger(__name__)


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
def trial_run(
    client: MlflowClient,
    exp_id: str,
    name: str,
    cfg: Config,
    *,
    parent_id: str,
    tags: Mapping[str, str],
) -> Iterator[TrialRun]:
    """Open the MLflow run of one tuning trial, a child of the study run `parent_id`.

    The same building blocks as `stage_run`: the full config as params (`log_params`), and
    one close-out (`closing`): a FAIL trial ends FAILED, a COMPLETE or PRUNED one FINISHED
    (pruning is a result), with its state in `deep_repro.trial_state`.
    """
    run = client.create_run(
        exp_id,
        run_name=name,
        tags={**tags, TAG_KIND: "trial", TAG_PARENT: parent_id, TAG_TRIAL_STATE: "RUNNING"},
    )
    handle = TrialRun(client, run.info.run_id, exp_id)
    log_params(client, handle.run_id, used_params(cfg))
    # missing_ok: a stale-trial sweep of another worker may have closed this run already.
    with closing(client, handle.run_id, missing_ok=True) as outcome:
        try:
            yield handle
        finally:
            outcome.status = "FAILED" if handle.state == "FAIL" else "FINISHED"
            outcome.tags[TAG_TRIAL_STATE] = handle.state
            if handle.fail_reason:
                outcome.tags[TAG_FAIL_REASON] = handle.fail_reason[:5000]
