"""Recording a monitoring check in MLflow: one run per check (tag `deep_repro.kind=monitor`),
linked to the model version it judged, with the p-values as metrics and a drift figure that
also plots the earlier checks of the same model, so decay over time is visible in the UI."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deep_repro import tracking
from deep_repro.files import file_digest
from deep_repro.monitoring.drift import STAT_NAMES, Features, Reference, Report

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG_MODEL = f"{tracking.TAG_PREFIX}.monitor.model"  # the --model reference as given
TAG_VERSION = f"{tracking.TAG_PREFIX}.monitor.model_version"
TAG_MODEL_RUN = f"{tracking.TAG_PREFIX}.monitor.model_run_id"  # run that produced the model
TAG_MD5 = f"{tracking.TAG_PREFIX}.monitor.model_md5"
TAG_BATCH = f"{tracking.TAG_PREFIX}.monitor.batch"
TAG_VERDICT = f"{tracking.TAG_PREFIX}.monitor.verdict"


def model_tags(
    client: MlflowClient, exp_id: str, model_ref: str, model_name: str
) -> dict[str, str]:
    """Which registered version / run the model is: from a models:/ URI, or from a .pt2 file
    through the postprocess run that wrote exactly those bytes."""
    from mlflow.exceptions import MlflowException

    tags = {TAG_MODEL: model_ref}
    with contextlib.suppress(MlflowException, ValueError):
        if model_ref.startswith("models:/"):
            name, _, rest = model_ref.removeprefix("models:/").partition("@")
            if rest:
                version = client.get_model_version_by_alias(name, rest)
            else:
                name, number = model_ref.removeprefix("models:/").rsplit("/", 1)
                version = client.get_model_version(name, number)
            tags.update(
                {TAG_VERSION: f"{name}/{version.version}", TAG_MODEL_RUN: version.run_id or ""}
            )
        elif Path(model_ref).is_file():
            from deep_repro.pipeline import INFERENCE_MODEL

            md5 = file_digest(Path(model_ref))
            tags[TAG_MD5] = md5
            run_id = tracking.find_producer(client, exp_id, INFERENCE_MODEL, md5)
            if run_id:
                tags[TAG_MODEL_RUN] = run_id
                found = tracking.model_version_for_run(client, model_name, run_id)
                if found is not None:
                    tags[TAG_VERSION] = f"{model_name}/{found.version}"
    return {k: v for k, v in tags.items() if v}


def drift_figure(
    report: Report, batch: Features, ref: Reference, history: list[tuple[float, float, float]]
) -> Any:
    """Histograms batch vs reference, class distribution, -log10 p per check, and history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, j, name in zip(axes[0], range(3), STAT_NAMES, strict=True):
        bins = np.linspace(0, 1, 41)
        ax.hist(ref.stats[:, j], bins=bins, density=True, alpha=0.5, label="reference (val)")
        ax.hist(batch.stats[:, j], bins=bins, density=True, alpha=0.5, label="batch")
        ax.set_title(f"per-image {name}")
        ax.legend(fontsize=8)
    ax = axes[1][0]
    for probs, label, shift in (
        (ref.features.probs, "reference", -0.2),
        (batch.probs, "batch", 0.2),
    ):
        share = np.bincount(probs.argmax(1), minlength=10) / len(probs)
        ax.bar(np.arange(10) + shift, share, width=0.4, label=label)
    ax.set_xticks(range(10))
    ax.set_title("predicted class share")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    names = [c.name for c in report.checks]
    values = [-np.log10(max(c.p_value, 1e-300)) for c in report.checks]
    colours = ["tab:red" if c in report.fired else "tab:green" for c in report.checks]
    ax.barh(names, np.minimum(values, 20), color=colours)
    ax.axvline(-np.log10(report.threshold), color="k", ls="--", label="Bonferroni threshold")
    ax.set_title("-log10 p (capped at 20)")
    ax.legend(fontsize=8)
    ax = axes[1][2]
    if history:
        times = [np.datetime64(int(t), "ms") for t, _, _ in history]
        ax.plot(
            times,
            [-np.log10(max(p, 1e-300)) for _, p, _ in history],
            "o-",
            label="-log10 smallest p",
        )
        ax.plot(times, [c for _, _, c in history], "s-", label="mean confidence")
        ax.axhline(-np.log10(report.threshold), color="k", ls="--")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=8)
    ax.set_title("this model's checks over time")
    fig.suptitle(report.verdict()[:140], fontsize=10)
    fig.tight_layout()
    return fig


def log_monitoring_run(
    client: MlflowClient,
    exp_id: str,
    report: Report,
    batch: Features,
    ref: Reference,
    tags: dict[str, str],
    batch_source: str,
) -> str:
    """Create the monitoring run; also tag the model version with the latest verdict."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    model = tags.get(TAG_VERSION) or tags.get(TAG_MD5) or tags[TAG_MODEL]
    previous = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'monitor' and "
        f"tags.`{TAG_MODEL}` = '{tags[TAG_MODEL]}'",
        order_by=["attributes.start_time ASC"],
        max_results=200,
    )
    now = get_current_time_millis()
    conf = float(batch.probs.max(1).mean())
    history = [
        (
            r.info.start_time,
            min((v for k, v in r.data.metrics.items() if k.startswith("p_")), default=1.0),
            r.data.metrics.get("batch_mean_confidence", float("nan")),
        )
        for r in previous
    ]
    history.append((now, min(c.p_value for c in report.checks), conf))
    all_tags = {
        tracking.TAG_KIND: "monitor",
        TAG_BATCH: batch_source,
        TAG_VERDICT: report.verdict()[:5000],
        "mlflow.runName": f"monitor {model}",
        **tags,
    }
    run = client.create_run(exp_id, start_time=now, tags=all_tags)
    run_id = run.info.run_id
    metrics = {
        **report.metrics(),
        "batch_mean_confidence": conf,
        "reference_mean_confidence": float(ref.features.probs.max(1).mean()),
        "reference_accuracy": ref.accuracy,
    }
    if batch.labels is not None:
        metrics["batch_accuracy"] = float((batch.probs.argmax(1) == batch.labels).mean())
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param("alpha", str(report.alpha)), Param("n_reference", str(report.n_reference))],
        tags=[RunTag(k, v) for k, v in all_tags.items() if k == TAG_VERDICT],
    )
    fig = drift_figure(report, batch, ref, history)
    try:
        client.log_figure(run_id, fig, "monitor/drift.png")
    finally:
        plt.close(fig)
    client.log_dict(
        run_id,
        {
            "verdict": report.verdict(),
            "threshold": report.threshold,
            "checks": [vars(c) for c in report.checks],
        },
        "monitor/report.json",
    )
    client.set_terminated(run_id)
    if TAG_VERSION in tags:
        name, version = tags[TAG_VERSION].rsplit("/", 1)
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            client.set_model_version_tag(name, version, "monitor_last_run", run_id)
            client.set_model_version_tag(
                name, version, "monitor_last_verdict", "drift" if report.drift else "no drift"
            )
    return run_id
