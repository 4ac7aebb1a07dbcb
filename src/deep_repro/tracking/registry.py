"""The model registry: logging the inference model, and judging it with the validation gate."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.evaluation.predictions import Predictions
from deep_repro.files import file_digest
from deep_repro.tracking import spool
from deep_repro.tracking.gate import GateDecision, validation_gate
from deep_repro.tracking.lineage import find_producer
from deep_repro.tracking.provenance import invocation_key
from deep_repro.tracking.runs import (
    StageRun,
)
from deep_repro.tracking.store import TAG_PREFIX, reproducing

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model registry
def log_inference_model(
    run: StageRun,
    program_path: Path,
    example: Any,
    model_name: str,
) -> str | None:
    """Log the exported program as a pyfunc model and register a new version.

    Returns the registered version number. The pyfunc wrapper (`serving/pyfunc.py`) and the
    archive check it loads the program with (`inference/safe_archive.py`) are logged as code,
    so `mlflow models serve -m models:/<name>@champion` needs no project code.
    """
    import importlib.util
    import warnings

    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import ModelSignature, infer_signature

    from deep_repro import inference
    from deep_repro.inference import safe_archive

    if reproducing():
        log.info("reproduction of %s: no model version registered", reproducing())
        return None
    if spool.is_offline(run.client):
        log.warning(
            "tracking store offline: %s not logged nor registered as %s; rerun "
            "`dvc repro -f postprocess` after `deep-repro sync`",
            program_path.name,
            model_name,
        )
        return None
    # Run the very wrapper that will be logged on the example to derive the output schema.
    code = Path(__file__).parents[1] / "serving" / "pyfunc.py"  # logged as the model's code
    spec = importlib.util.spec_from_file_location("deep_repro_serving", code)
    assert spec is not None and spec.loader is not None
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    wrapper = serving.FashionMNISTClassifier()
    wrapper.program = inference.load_inference_model(program_path)
    example = np.asarray(example, dtype=np.uint8)
    output = wrapper.predict(None, example)
    # MLflow's advice about integer columns does not apply: the output schema comes from a
    # real example, and the class index can never be missing. MLflow reloads the model to
    # check the example: that is no prediction to record in the (opt-in) prediction log.
    try:
        with (
            warnings.catch_warnings(),
            mlflow.start_run(run_id=run.run_id),
            _env_unset("DEEP_REPRO_PREDICTION_LOG"),
        ):
            warnings.simplefilter("ignore", UserWarning)
            # Output schema only: the wrapper checks its input itself (serving/pyfunc.py), and an
            # MLflow tensor schema would refuse every dtype and shape but one before it could.
            signature = ModelSignature(
                inputs=None, outputs=infer_signature(example, output).outputs
            )
            info = mlflow.pyfunc.log_model(
                name="inference_model",
                python_model=str(code),
                artifacts={"program": str(program_path)},
                code_paths=[str(Path(safe_archive.__file__))],
                signature=signature,
                input_example=example,
                registered_model_name=model_name,
                conda_env=_conda_env(
                    [
                        f"mlflow=={mlflow.__version__}",
                        f"torch=={torch.__version__.split('+')[0]}",
                        "numpy",
                        "pandas",
                    ]
                ),
            )
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                _credit(run.client, run.run_id, model_name, str(version))
    except Exception as exc:
        if not spool.is_transient(exc):
            raise
        spool.mark_offline(run.client)  # the close-out goes to the spool without more stalls
        log.warning(
            "tracking store went down while registering %s: not registered as %s; "
            "rerun `dvc repro -f postprocess` after `deep-repro sync`",
            program_path.name,
            model_name,
        )
        return None
    return str(version) if version is not None else None


def _credit(client: MlflowClient, run_id: str, model_name: str, version: str) -> None:
    """Say who registered the version: MLflow 3.17's `create_model_version` takes no user, so
    the registry UI's "Created by" stays empty. The run's user (`deep_repro.user`, else MLflow's
    `mlflow.user`) goes into a `created_by` tag and the description, with the run it came from."""
    tags = client.get_run(run_id).data.tags
    user = tags.get(f"{TAG_PREFIX}.user") or tags.get("mlflow.user") or "unknown"
    client.set_model_version_tag(model_name, version, "created_by", user)
    client.update_model_version(
        model_name,
        version,
        description=f"Registered by {user} from the postprocess stage run {run_id}.",
    )


def _conda_env(pip: list[str]) -> dict[str, Any]:
    """The model's environment, spelled out: given only pip requirements, MLflow looks up the
    installed pip's version for conda.yaml and warns when it finds none (uv venvs have no pip)."""
    import platform

    return {
        "name": "mlflow-env",
        "channels": ["conda-forge"],
        "dependencies": [f"python={platform.python_version()}", "pip", {"pip": pip}],
    }


@contextlib.contextmanager
def _env_unset(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def model_version_for_run(client: MlflowClient, model_name: str, run_id: str) -> Any | None:
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def judge_registered_model(
    run: StageRun,
    model_name: str,
    root: Path,
    predictions: Predictions,
    baseline: float,
    alpha: float,
) -> GateDecision:
    """Run the validation gate on the registry version built from exactly this inference model
    (found by its md5 through the postprocess run that produced it), and record the verdict on
    the evaluate and pipeline runs."""
    from deep_repro.pipeline import INFERENCE_MODEL

    if reproducing():
        decision = GateDecision(False, False, f"reproduction of {reproducing()}: no gate")
        log.info(decision.reason)
        return decision
    md5 = file_digest(root / INFERENCE_MODEL)
    producer = find_producer(
        run.client, run.experiment_id, INFERENCE_MODEL, md5, invocation=invocation_key()
    )
    if spool.is_offline(run.client):  # (then the search above found nothing)
        decision = GateDecision(
            False,
            False,
            "tracking store offline: validation gate "
            "skipped (rerun `dvc repro -f evaluate` after `deep-repro sync`)",
        )
        log.warning(decision.reason)
        return decision
    version = model_version_for_run(run.client, model_name, producer) if producer else None
    if version is None:
        decision = GateDecision(
            False,
            False,
            f"no registered version of {model_name} was built "
            f"from {INFERENCE_MODEL} (md5 {md5}): gate skipped",
        )
        log.warning(decision.reason)
        return decision
    decision = validation_gate(
        run.client, model_name, str(version.version), predictions, baseline, alpha
    )
    run.set_tags(
        {
            "validation_status": "validated" if decision.validated else "rejected",
            "validation_reason": decision.reason,
            "gate_decision": decision.outcome,
            "model_version": str(version.version),
        },
        pipeline=True,
    )
    # The decision's numbers, so the UI can chart them: p-value and the champion it faced.
    numbers = {
        "gate_p_value": decision.p_value,
        "gate_champion_val_accuracy": decision.champion_accuracy,
    }
    run.log_metrics({k: v for k, v in numbers.items() if v is not None}, pipeline=True)
    return decision
