"""The outcome of a study: recorded on its MLflow study run, the winner exported as a config."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from deep_repro import tracking
from deep_repro.config.schema import Config
from deep_repro.errors import DeepReproError
from deep_repro.tuning import storage
from deep_repro.tuning.export import write_experiment
from deep_repro.tuning.report import log_tables_and_plots
from deep_repro.tuning.space import SearchSpace
from deep_repro.tuning.storage import ATTR_OVERRIDES, ATTR_RUN, TAG_STUDY, TAG_TRIAL_NUMBER

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def _backing(client: MlflowClient, study_name: str, trial: FrozenTrial) -> str | None:
    """Why `trial` is not backed by its own trial run (None: it is). A trial counts only if
    the MLflow run it names exists, FINISHED, tagged as this study's trial of this number, and
    logged the trial's value and overrides: a row added to the study database by hand
    (`study.add_trial(value=0.999)`, never trained) has no such run."""
    from mlflow.exceptions import MlflowException

    run_id = trial.user_attrs.get(ATTR_RUN)
    if not run_id:
        return "no trial run"
    try:
        run = client.get_run(str(run_id))
    except MlflowException:
        return f"its run {run_id} does not exist"
    tags, metrics = run.data.tags, run.data.metrics
    if run.info.status != "FINISHED":
        return f"its run {run_id} is {run.info.status}"
    if tags.get(TAG_STUDY) != study_name or tags.get(TAG_TRIAL_NUMBER) != str(trial.number):
        return f"its run {run_id} is not this study's trial {trial.number}"
    if metrics.get("best_val_accuracy") != trial.value:
        return f"its run logged {metrics.get('best_val_accuracy')}, not {trial.value}"
    overrides = " ".join(trial.user_attrs.get(ATTR_OVERRIDES, []))[:5000]
    if tags.get(f"{tracking.TAG_PREFIX}.trial_overrides") != overrides:
        return f"its run trained other values than the trial's ({overrides})"
    return None


def backed_best(
    client: MlflowClient, study_name: str, trials: Sequence[FrozenTrial]
) -> tuple[FrozenTrial | None, dict[int, str]]:
    """The best COMPLETE trial backed by its own trial run, and why better ones are not."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    rejected: dict[int, str] = {}
    for trial in sorted(complete, key=lambda t: (-float(t.value or 0.0), t.number)):
        why = _backing(client, study_name, trial)
        if why is None:
            return trial, rejected
        rejected[trial.number] = why
    return None, rejected


@dataclass
class StudyResult:
    study_name: str
    storage: str
    study_run_id: str
    n_trials: int
    states: dict[str, int]
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_overrides: list[str] = field(default_factory=list)
    experiment_file: Path | None = None


class StudyOutcome:
    """What `_Tuner` does once the trials are done (kept apart to keep the driver readable)."""

    client: MlflowClient | None
    study_name: str
    study_run_id: str
    store: storage.StudyStorage
    gate: storage.Gate
    overrides: Sequence[str]
    cfg: Config
    conf_dir: Path
    root: Path
    space: SearchSpace

    if TYPE_CHECKING:

        @property
        def shown_overrides(self) -> str: ...

    def _finish(self, study: optuna.Study) -> StudyResult:
        """Record the study's outcome on its run and export the best trial (the run itself is
        closed by `run`)."""
        assert self.client is not None
        trials = study.get_trials(deepcopy=False)
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        states = {k: v for k, v in states.items() if v}
        result = StudyResult(
            self.study_name, self.store.description, self.study_run_id, len(trials), states
        )
        metrics = {f"n_{k.lower()}": float(v) for k, v in states.items()}
        tags: dict[str, str] = {}
        best, rejected = backed_best(self.client, self.study_name, trials)
        for number, why in rejected.items():
            log.warning("trial %d is not adopted as the best: %s", number, why)
        if rejected:
            tags[f"{tracking.TAG_PREFIX}.unbacked_trials"] = ",".join(map(str, sorted(rejected)))
        if best is not None:
            result.best_trial, result.best_value = best.number, best.value
            result.best_params = {k: self._decoded(k, v) for k, v in best.params.items()}
            result.best_overrides = list(best.user_attrs.get(ATTR_OVERRIDES, []))
            # Under the gate: another worker of this study may be writing (and verifying) the
            # same file right now, possibly with a newer best trial.
            with self.gate:
                result.experiment_file = write_experiment(
                    [*self.overrides, *result.best_overrides],
                    self.cfg.model.name,
                    self.conf_dir,
                    self._header(best),
                )
            assert best.value is not None  # a COMPLETE trial always has its value
            metrics["best_val_accuracy"] = float(best.value)
            tags |= {
                f"{tracking.TAG_PREFIX}.best_trial": str(best.number),
                f"{tracking.TAG_PREFIX}.best_trial_run_id": str(best.user_attrs.get(ATTR_RUN, "")),
                f"{tracking.TAG_PREFIX}.experiment_file": result.experiment_file.relative_to(
                    self.root
                ).as_posix(),
            }
            self.client.log_artifact(self.study_run_id, str(result.experiment_file), "experiment")
        self._log_outcome(metrics, tags)
        log_tables_and_plots(self.client, self.study_run_id, study)
        summary = ", ".join(f"{v} {k.lower()}" for k, v in states.items())
        if result.best_trial is None:
            unbacked = f", {len(rejected)} without a trial run to back it" if rejected else ""
            raise DeepReproError(
                f"study {self.study_name!r}: no trial completed ({summary}{unbacked}); "
                "check the failed trials' runs in MLflow"
            )
        log.info(
            "study %r: %d trials (%s); best trial %d: val_accuracy %.4f with %s",
            self.study_name,
            len(trials),
            summary,
            result.best_trial,
            result.best_value,
            ", ".join(f"{k}={v}" for k, v in result.best_params.items()),
        )
        log.info(
            "wrote %s: train it with `uv run dvc exp run -S +experiment=tuned_%s`",
            result.experiment_file,
            self.cfg.model.name,
        )
        return result

    def _decoded(self, key: str, value: Any) -> Any:
        """A sampled value as the config holds it (the search space may encode choices)."""
        param = self.space.param(key)
        return param.decode(value) if param is not None else value

    def _log_outcome(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        assert self.client is not None
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.study_run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )

    def _header(self, best: FrozenTrial) -> list[str]:
        """The comment at the top of the experiment file: where it came from, how to use it."""
        return [
            f"Best trial of Optuna study '{self.study_name}' (trial {best.number}): "
            f"val_accuracy {best.value:.4f} after",
            f"tune.epochs = {self.cfg.tune.epochs} epochs; MLflow study run "
            f"{self.study_run_id}. Written by:",
            f"  uv run deep-repro tune {self.shown_overrides}".rstrip(),
            "Train it through the full pipeline (for train.epochs epochs):",
            f"  uv run dvc exp run -S +experiment=tuned_{self.cfg.model.name}",
        ]
