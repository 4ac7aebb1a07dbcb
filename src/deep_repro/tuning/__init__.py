"""Hyperparameter search (model selection) with Optuna, on the DVC train/val split only.

    uv run deep-repro tune model=cnn tune.n_trials=30 tune.sampler=tpe tune.pruner=median

Life cycle
----------
Tuning is *model selection*: every trial trains on `x_train` of `data/split/train_val.npz` (the
output of the `split` stage) and is scored by its best validation accuracy over `tune.epochs`
epochs. The test set is never opened, so the final test accuracy of the pipeline stays an unbiased
estimate. The winner goes back into the DVC loop as a Hydra experiment config,
`conf/experiment/tuned_<model>.yaml`, that holds only the keys differing from the conf/ defaults:

    uv run dvc exp run -S +experiment=tuned_<model>

The full pipeline then trains for `train.epochs` (the `tune` section never leaks into the file): the
study ranks configurations on a cheaper budget, the pipeline trains the winner properly.

Modules: `space` (the search-space file and its Hydra overrides), `check` (the space against
the composed config, before any trial), `sampling` (samplers and pruners), `storage` (Optuna
storage, the budget lock, heartbeats and stale trials), `export` (the experiment file), `report`
(plots and tables on the study run) and `study` (the worker loop and the trials).

Storage, parallel workers, budget
---------------------------------
`tune.storage` is null (a journal file at `<store root>/optuna/journal.log`), a path ending in
`.log` (a journal file; relative paths are under the store root) or any Optuna RDB URL
(`sqlite:///...`, `postgresql://...`). Rerunning with the same `tune.study_name` (default
`tune-<model>`) resumes the study; a rerun whose base configuration or split file differs from the
study's is refused (its trials would not be comparable).

Several workers may run the same command at once: processes on one machine with a journal file,
several machines with PostgreSQL. `tune.n_trials` is the *total* of the study, across workers and
reruns (like `optuna.study.MaxTrialsCallback(n_trials, states=None)`): trials in every state count,
except a stale trial that was re-queued (its retry counts instead). Counting and creating a trial,
and creating the study's MLflow run, happen under a lock (`storage.Gate`), so the total is exact
and there is one study run: on PostgreSQL a session advisory lock in the database, shared by every
machine; otherwise a file lock (journal files and sqlite are single-machine stores).
`tune.timeout` bounds each worker's wall
time (a running trial is finished, no new one is started). Each worker seeds the sampler with
`(tune.seed, trial number)`, so sequential runs with the same seed repeat the same trials exactly
and parallel workers never draw the same random start point.

Stale trials (a worker killed mid-trial)
----------------------------------------
Optuna's heartbeat (`tune.heartbeat_interval`, grace period twice that,
`RetryHeartbeatStaleTrialCallback`) exists only for RDB storages; `JournalStorage` does not
implement it (Optuna 5: it is not a `BaseHeartbeat`). So every trial also records its owner
(host, pid, process start time) in its user attrs and, on journal storage, a heartbeat timestamp
every `tune.heartbeat_interval` seconds. Before creating each trial, a worker fails RUNNING trials
whose owner process on this host is gone (immediately), or, for other hosts, whose heartbeat
(Optuna's on RDB storages, ours on journal files) is older than the grace period; the failed
trial's MLflow run is marked FAILED and the trial is re-queued with the same parameters
(at most twice).

MLflow
------
One *study run* (`deep_repro.kind=study`, shared by all workers and reruns of the study) with the
plots (optimization history, parameter importances, intermediate values: PNG, and interactive
HTML that loads plotly.js from its CDN), `trials.csv`, the search space and the experiment file;
one child run per trial (`deep_repro.kind=trial`, `mlflow.parentRunId`) with the full config as
params, per-epoch metrics (step = epoch), the Optuna state in `deep_repro.trial_state`
(COMPLETE / PRUNED / FAIL) and, like the pipeline's stage runs, the md5 of the split file it
trained on (`deep_repro.in.data/split/train_val.npz`) and the run that produced that file
(`deep_repro.upstream.data/split/train_val.npz`). A trial whose training diverges is FAIL (a
bad region of the space, not a crash) and the study goes on. Credentials in URLs never reach
params, tags or the experiment file.
"""

from __future__ import annotations

from deep_repro.tuning.check import check_search_space
from deep_repro.tuning.export import write_experiment
from deep_repro.tuning.parse import load_search_space
from deep_repro.tuning.sampling import make_pruner, make_sampler
from deep_repro.tuning.space import Param, SearchSpace, config_groups
from deep_repro.tuning.storage import (
    ATTR_HEARTBEAT,
    ATTR_OVERRIDES,
    ATTR_OWNER,
    ATTR_RETRY_OF,
    ATTR_RUN,
    owner,
)
from deep_repro.tuning.study import (
    SPLIT_FILE,
    TAG_STUDY,
    TAG_TRIAL_NUMBER,
    TAG_TRIAL_STATE,
    StudyResult,
    run_study,
)

__all__ = [
    "ATTR_HEARTBEAT",
    "ATTR_OVERRIDES",
    "ATTR_OWNER",
    "ATTR_RETRY_OF",
    "ATTR_RUN",
    "SPLIT_FILE",
    "TAG_STUDY",
    "TAG_TRIAL_NUMBER",
    "TAG_TRIAL_STATE",
    "Param",
    "SearchSpace",
    "StudyResult",
    "check_search_space",
    "config_groups",
    "load_search_space",
    "make_pruner",
    "make_sampler",
    "owner",
    "run_study",
    "write_experiment",
]
