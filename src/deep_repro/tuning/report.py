"""The study's MLflow report: `trials.csv` and Optuna's plots (optimization history,
parameter importances, intermediate values) as PNG and as interactive HTML that loads plotly.js
from its CDN, on the study run."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

if TYPE_CHECKING:
    from mlflow import MlflowClient
from deep_repro.errors import first_line

log = logging.getLogger(__name__)


def log_tables_and_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Log the table and plots; each is a convenience, so a failure is a warning only."""
    try:
        frame = study.trials_dataframe()
        client.log_text(run_id, frame.to_csv(index=False), "trials.csv")
    except Exception as exc:
        log.warning("trials.csv not logged: %s", first_line(exc))
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are files for the MLflow UI, never windows
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    names = {n for t in complete for n in t.params}
    plots = [
        ("optimization_history", bool(complete)),
        # fANOVA needs several finished trials varying more than one parameter.
        ("param_importances", len(complete) >= 2 and len(names) > 1),
        ("intermediate_values", any(t.intermediate_values for t in trials)),
    ]
    for name, possible in plots:
        if not possible:
            log.info("plot %s skipped: not enough finished trials yet", name)
            continue
        try:
            with warnings.catch_warnings():
                # Experimental APIs, and importance caveats on few trials: not for the log.
                warnings.simplefilter("ignore", ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                axes = getattr(vis_mpl, f"plot_{name}")(study)
                figure = getattr(vis, f"plot_{name}")(study)
            fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            client.log_figure(run_id, fig, f"plots/{name}.png")
            plt.close(fig)
            client.log_figure(run_id, figure, f"plots/{name}.html")
        except Exception as exc:  # a plot is a convenience: never fail the study for it
            log.warning("plot %s skipped: %s: %s", name, type(exc).__name__, first_line(exc))
