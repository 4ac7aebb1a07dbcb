"""The one tracking package: MLflow store, pipeline runs, stage runs, and lineage by content.

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

from deep_repro.tracking.faults import (  # noqa: F401
    TAG_OWNER_HOST,
    TAG_OWNER_PID,
    TAG_OWNER_STARTED,
    fail_orphan_runs,
    owner,
    owner_alive,
)
from deep_repro.tracking.gate import (  # noqa: F401
    CHAMPION,
    GATE_MAX_ROUNDS,
    Evidence,
    GateDecision,
    validation_gate,
)
from deep_repro.tracking.lineage import (  # noqa: F401
    find_producer,
    lineage_chain,
    producer_run,
    resolve_run_id,
)
from deep_repro.tracking.provenance import (  # noqa: F401
    _GENERATED,
    _git,
    _without_credentials,
    changed_paths,
    environment_tags,
    git_remote,
    git_state,
    invocation_key,
    pipeline_run_name,
    repo_relative,
    run_user,
)
from deep_repro.tracking.registry import (  # noqa: F401
    _env_unset,
    judge_registered_model,
    log_inference_model,
    model_version_for_run,
)
from deep_repro.tracking.runs import (  # noqa: F401
    Outcome,
    StageRun,
    _lock_entry,
    _metric_batch,
    _stage_params,
    closing,
    end_run,
    get_or_create_pipeline_run,
    log_dataset,
    log_params,
    pipeline_note,
    stage_run,
)
from deep_repro.tracking.store import (  # noqa: F401
    HEADLINE_METRICS,
    IN_PREFIX,
    LOCK_ENTRY_ARTIFACT,
    OUT_PREFIX,
    PLATFORM_PREFIX,
    REPRODUCES_ENV,
    TAG_FAIL_REASON,
    TAG_INVOCATION,
    TAG_KIND,
    TAG_PARENT,
    TAG_PREFIX,
    TAG_STAGE,
    TAG_TRIAL_STATE,
    UPSTREAM_PREFIX,
    UPSTREAM_USER_PREFIX,
    VALIDATE_ENTRY_ARTIFACT,
    _is_local_sqlite,
    _search_one,
    _store_lock,
    artifact_root,
    connect,
    credentials_to_env,
    project_tracking_uri,
    read_client,
    reproducing,
    tracking_uri,
    unusable,
)
from deep_repro.tracking.trials import TrialRun, trial_run  # noqa: F401
