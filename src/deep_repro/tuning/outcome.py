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
from deep_repro.tuning.storage import ATTR_OVERRIDES, ATTR_RUN

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


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
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = study.best_trial
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
            tags = {
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
            raise DeepReproError(
                f"study {self.study_name!r}: no trial completed ({summary}); "
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
