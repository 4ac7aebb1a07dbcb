"""One worker's part of one Optuna study: the budget loop, the trials, the MLflow study run.

A trial is built from the same blocks as a pipeline stage: its config is composed by
`config.compose` and validated, it trains through `training.train_model` (for tune.epochs, the
pruner raising from the epoch callback) and it is tracked by `tracking.trial_run`, the sibling
of `tracking.stage_run`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

import deep_repro.models  # noqa: F401  (registers the architectures: `model`'s options)
from deep_repro import config, tracking
from deep_repro.config.schema import Config
from deep_repro.errors import ConfigError, DataError, TrainingError, first_line, scrub
from deep_repro.files import file_digest
from deep_repro.paths import repo_root
from deep_repro.pipeline import SPLIT_TRAIN_VAL
from deep_repro.tracking.provenance import source_tags
from deep_repro.tuning import sampling, storage
from deep_repro.tuning.check import check_search_space, check_study, comparable_setup
from deep_repro.tuning.outcome import StudyOutcome, StudyResult
from deep_repro.tuning.parse import load_search_space
from deep_repro.tuning.space import compose, config_groups, get_key
from deep_repro.tuning.storage import (
    ATTR_OVERRIDES,
    ATTR_OWNER,
    ATTR_RETRY_OF,
    ATTR_RUN,
    TAG_STUDY,
    TAG_TRIAL_NUMBER,
)

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

    from deep_repro.training.loop import EpochMetrics

log = logging.getLogger(__name__)

SPLIT_FILE = SPLIT_TRAIN_VAL  # the only data a trial may read
STUDY_ATTR_RUN = "deep_repro.mlflow_study_run_id"
TAG_TRIAL_STATE = tracking.TAG_TRIAL_STATE
TAG_STORAGE = f"{tracking.TAG_PREFIX}.optuna_storage"


class _Tuner(StudyOutcome):
    """One worker's part of one study (state shared by the objective and the loop)."""

    def __init__(self, overrides: Sequence[str]) -> None:
        self.overrides = list(overrides)
        self.root = repo_root()
        self.conf_dir = self.root / "conf"
        self.raw, base_choices = compose(self.overrides, self.conf_dir)
        self.cfg = config.validate(self.raw)
        tune = self.cfg.tune
        self.study_name = tune.study_name or f"tune-{self.cfg.model.name}"
        self.data_path = self.root / SPLIT_FILE
        if not self.data_path.is_file():
            raise DataError(
                f"{self.data_path} not found: tuning uses only the train/val split "
                "of the DVC pipeline; run `uv run dvc repro split` first"
            )
        from deep_repro.data.dataset import load_arrays

        arrays = load_arrays(self.data_path)
        missing = {"x_train", "y_train", "x_val", "y_val"} - set(arrays)
        if missing:
            raise DataError(
                f"{self.data_path} lacks {sorted(missing)}: rerun `uv run dvc repro split`"
            )
        self.data: dict[str, np.ndarray] = arrays
        self.data_md5 = file_digest(self.data_path)
        space = load_search_space(
            self.conf_dir / "search" / f"{self.cfg.model.name}.yaml", config_groups(self.conf_dir)
        )
        self.space, self.when_base = check_search_space(
            space,
            self.overrides,
            self.conf_dir,
            len(arrays["y_train"]),
            base=(self.raw, base_choices),
        )
        sampling.check_sampler(tune.sampler, self.space)
        self.pruner = sampling.make_pruner(tune.pruner, tune.epochs, self.space)
        self.grace_s = 2.0 * tune.heartbeat_interval
        self.client: MlflowClient | None = None
        self.exp_id = ""
        self.study_run_id = ""
        self.owner = storage.owner()
        self.store = storage.open_storage(
            tune.storage, self.study_name, tune.heartbeat_interval, self._on_stale
        )
        self.gate = self.store.gate
        self.env_tags: dict[str, str] = {}
        self.data_tags: dict[str, str] = {}

    @property
    def shown_overrides(self) -> str:
        """The command line for logs, tags and the (git-tracked) experiment file: no secrets."""
        return scrub(" ".join(self.overrides))

    # ------------------------------------------------------------------ MLflow
    def _connect(self) -> None:
        uri = tracking.tracking_uri(self.cfg.tracking.uri)
        # The split's producer is in this user's own experiment; the study may live elsewhere.
        self.client, own_exp = tracking.connect(uri, self.cfg.tracking.experiment)
        self.exp_id = own_exp
        if self.cfg.tune.experiment:
            _, self.exp_id = tracking.connect(uri, self.cfg.tune.experiment)
        # Study and trial runs: MLflow's Source column shows what started them.
        self.env_tags = {**tracking.environment_tags(self.cfg), **source_tags("deep-repro tune")}
        self.data_tags = {f"{tracking.IN_PREFIX}{SPLIT_FILE}": self.data_md5}
        producer = tracking.find_producer(self.client, own_exp, SPLIT_FILE, self.data_md5)
        if producer:
            self.data_tags[f"{tracking.UPSTREAM_PREFIX}{SPLIT_FILE}"] = producer
        else:
            log.warning(
                "no tracked run produced %s (md5 %s): lineage stops here", SPLIT_FILE, self.data_md5
            )

    def _study_run(self, study: optuna.Study) -> str:
        """The study's MLflow run, shared by every worker and rerun (created by the first)."""
        from mlflow.exceptions import MlflowException

        assert self.client is not None
        run_id = study.user_attrs.get(STUDY_ATTR_RUN)
        if run_id:
            with contextlib.suppress(MlflowException):
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.exp_id:
                    self.client.update_run(run_id, status="RUNNING")
                    return str(run_id)
        tune = self.cfg.tune
        run = self.client.create_run(
            self.exp_id,
            run_name=self.study_name,
            tags={
                **self.env_tags,
                **self.data_tags,
                tracking.TAG_KIND: "study",
                TAG_STUDY: self.study_name,
                TAG_STORAGE: self.store.description,
                f"{tracking.TAG_PREFIX}.search_space": self.space.where,
                f"{tracking.TAG_PREFIX}.search_space_md5": file_digest(self.space.path),
                "mlflow.note.content": (
                    f"Optuna study `{self.study_name}` ({self.store.description}) over "
                    f"`{self.space.where}` on the train/val split. Each child run is one trial. "
                    f"Rerun `uv run deep-repro tune {self.shown_overrides}` to add trials; "
                    f"apply the best with `uv run dvc exp run -S "
                    f"+experiment=tuned_{self.cfg.model.name}`."
                ),
            },
        )
        params = {
            **{f"tune.{k}": v for k, v in config.to_dict(tune).items()},
            "base_overrides": self.shown_overrides[:6000] or "(none)",
            "searched": ",".join(p.key for p in self.space.params),
        }
        tracking.log_params(self.client, run.info.run_id, params)
        self.client.log_artifact(run.info.run_id, str(self.space.path), "search_space")
        study.set_user_attr(STUDY_ATTR_RUN, run.info.run_id)
        log.info("MLflow: study run %s", run.info.run_id)
        return str(run.info.run_id)

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A dead worker's trial was failed: close its MLflow run and re-queue its parameters."""
        log.warning(
            "trial %d was left RUNNING by a worker that died (%s): failed, re-queued",
            trial.number,
            trial.user_attrs.get(ATTR_OWNER, "owner unknown"),
        )
        run_id = trial.user_attrs.get(ATTR_RUN)
        if run_id and self.client is not None:
            tracking.end_run(
                self.client,
                run_id,
                "FAILED",
                {
                    TAG_TRIAL_STATE: "FAIL",
                    tracking.TAG_FAIL_REASON: (
                        "stale: its worker process died or lost its heartbeat"
                    ),
                },
                missing_ok=True,
            )
        storage.requeue(study, trial)

    # ------------------------------------------------------------------ one trial
    def objective(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial exists now: other workers may count and create theirs
        trial.set_user_attr(ATTR_OWNER, self.owner)
        with storage.heartbeat(trial, self.cfg.tune.heartbeat_interval, enabled=self.store.journal):
            context = dict(self.when_base)
            values: dict[str, Any] = {}
            trial_overrides: list[str] = []
            for p in self.space.params:
                if p.active(context):
                    values[p.key] = context[p.key] = p.suggest(trial)
                    trial_overrides.append(p.override(values[p.key]))
            raw, _ = compose([*self.overrides, *trial_overrides], self.conf_dir)
            for key, value in values.items():
                param = self.space.param(key)
                if param is not None and not param.group and get_key(raw, key) != value:
                    raise ConfigError(f"{key} = {value!r} composed as {get_key(raw, key)!r}")
            cfg = config.validate(raw)
            trial.set_user_attr(ATTR_OVERRIDES, trial_overrides)
            assert self.client is not None
            retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
            tags = {
                **self.env_tags,
                **self.data_tags,
                TAG_STUDY: self.study_name,
                TAG_STORAGE: self.store.description,
                TAG_TRIAL_NUMBER: str(trial.number),
                f"{tracking.TAG_PREFIX}.searched": ",".join(values),
                f"{tracking.TAG_PREFIX}.trial_overrides": " ".join(trial_overrides)[:5000],
                f"{tracking.TAG_PREFIX}.hostname": str(self.owner["host"]),
                f"{tracking.TAG_PREFIX}.pid": str(self.owner["pid"]),
                **(
                    {f"{tracking.TAG_PREFIX}.retry_of": str(retry_of)}
                    if retry_of is not None
                    else {}
                ),
            }
            with tracking.trial_run(
                self.client,
                self.exp_id,
                f"{self.study_name}-{trial.number}",
                cfg,
                parent_id=self.study_run_id,
                tags=tags,
            ) as run:
                trial.set_user_attr(ATTR_RUN, run.run_id)
                try:
                    return self._train(trial, cfg, run)
                finally:
                    log.info(
                        "trial %d %s: %s",
                        trial.number,
                        run.state,
                        ", ".join(f"{k}={v}" for k, v in values.items()),
                    )

    def _train(self, trial: optuna.Trial, cfg: Config, run: tracking.TrialRun) -> float:
        """Train the trial's config like the train stage does; sets the run's final state."""
        from deep_repro import training

        def on_epoch(metrics: EpochMetrics) -> None:
            run.log_metrics(metrics.as_dict(), step=metrics.step)
            # The pruner compares this trial's learning curve with the others' at the same
            # epoch: stop a hopeless configuration early and spend the budget elsewhere.
            trial.report(metrics.val_accuracy, metrics.step)
            # logreg has one "epoch" (the whole fit): nothing left to save by pruning it.
            if cfg.is_torch_model and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at epoch {metrics.step} (val_accuracy {metrics.val_accuracy:.4f})"
                )

        x = self.data
        try:
            result = training.train_model(
                cfg,
                x["x_train"],
                x["y_train"],
                x["x_val"],
                x["y_val"],
                on_epoch=on_epoch,
                epochs=cfg.tune.epochs,
                progress=False,
            )
            run.log_metrics(
                {
                    "best_val_accuracy": result.best_val_accuracy,
                    "best_epoch": float(result.best_epoch),
                }
            )
        except optuna.TrialPruned:
            run.state = "PRUNED"
            raise
        except TrainingError as exc:
            # A diverging configuration is a result (this region is bad), not a crash: the
            # trial fails (Optuna turns a NaN value into FAIL) and the study goes on.
            run.fail_reason = f"{type(exc).__name__}: {first_line(exc)}"
            log.warning("trial %d failed: %s", trial.number, run.fail_reason)
            return float("nan")
        except BaseException as exc:
            run.fail_reason = f"{type(exc).__name__}: {first_line(exc)}"
            raise
        run.state = "COMPLETE"
        # Objective: the best validation accuracy, i.e. the weights the pipeline would keep.
        return float(result.best_val_accuracy)

    # ------------------------------------------------------------------ the loop
    def run(self) -> StudyResult:
        tune = self.cfg.tune
        self._connect()
        assert self.client is not None
        with self.gate, warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study = optuna.create_study(
                storage=self.store.storage,
                study_name=self.study_name,
                direction="maximize",
                sampler=sampling.make_sampler(tune.sampler, tune.seed, self.space),
                pruner=self.pruner,
                load_if_exists=True,
            )
            check_study(
                study,
                self.store.description,
                comparable_setup(
                    self.raw, self.cfg.tune.epochs, self.space, {SPLIT_FILE: self.data_md5}
                ),
                self.shown_overrides,
                self.space,
            )
            self.study_run_id = self._study_run(study)
        n_before = len(study.get_trials(deepcopy=False))
        log.info(
            "study %r in %s: %d trial(s) so far, budget tune.n_trials = %d (all workers), "
            "sampler %s, pruner %s, %d epoch(s) per trial",
            self.study_name,
            self.store.description,
            n_before,
            tune.n_trials,
            tune.sampler,
            tune.pruner,
            tune.epochs,
        )
        with tracking.closing(self.client, self.study_run_id) as outcome:
            self._loop(study)
            result = self._finish(study)
            outcome.status = "FINISHED"
        return result

    def _loop(self, study: optuna.Study) -> None:
        import time

        tune = self.cfg.tune
        deadline = time.monotonic() + tune.timeout if tune.timeout else None
        ran = 0
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                log.info("tune.timeout = %ss reached: no new trial started", tune.timeout)
                break
            with self.gate:
                storage.fail_stale_trials(study, self.grace_s, self.store.journal, self._on_stale)
                trials = study.get_trials(deepcopy=False)
                waiting = [t.number for t in trials if t.state == TrialState.WAITING]
                if not waiting and storage.counted(trials) >= tune.n_trials:
                    break
                sampler = sampling.trial_sampler(
                    tune.sampler, tune.seed, waiting[0] if waiting else len(trials), self.space
                )
                if (
                    isinstance(sampler, optuna.samplers.GridSampler)
                    and not waiting
                    and sampler.is_exhausted(study)
                ):
                    log.info("grid exhausted after %d trials", len(trials))
                    break
                study.sampler = sampler
                # One trial per call: the gate is re-taken to check the budget before the next.
                study.optimize(
                    self.objective, n_trials=1, gc_after_trial=False, show_progress_bar=False
                )
                ran += 1
        log.info("this worker ran %d trial(s)", ran)


def run_study(overrides: list[str]) -> StudyResult:
    """`deep-repro tune [OVERRIDES...]`: run (or join, or resume) the study; see the package doc.

    Everything that can be wrong with the input (config, search space, split file, storage)
    raises a one-line `DeepReproError` before any trial starts.
    """
    import os

    # Route Optuna's messages through the project's logging (one format, one stream).
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    os.environ.pop("MLFLOW_RUN_ID", None)  # trials are tied to runs by explicit ids only
    return _Tuner(overrides).run()
