"""The model registry: logging the inference model, and the validation gate (`@champion`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deep_repro.files import file_digest
from deep_repro.tracking.lineage import find_producer
from deep_repro.tracking.runs import (
    StageRun,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model registry
def log_inference_model(run: StageRun, program_path: Path, example: Any, model_name: str,
                        ) -> str | None:
    """Log the exported program as a pyfunc model and register a new version.

    Returns the registered version number. The pyfunc wrapper (`deep_repro/serving.py`) and the
    archive check it loads the program with (`deep_repro/safe_archive.py`) are logged as code,
    so `mlflow models serve -m models:/<name>@champion` needs no project code.
    """
    import importlib.util
    import warnings

    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from deep_repro import inference, safe_archive

    # Run the very wrapper that will be logged on the example to derive the output schema.
    code = Path(__file__).parents[1] / "serving.py"  # deep_repro/serving.py
    spec = importlib.util.spec_from_file_location("deep_repro_serving", code)
    assert spec is not None and spec.loader is not None
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    wrapper = serving.FashionMNISTClassifier()
    wrapper.program = inference.load_inference_model(program_path)
    # float64, not uint8: see serving.py (JSON input must reach the model's own range check).
    example = np.asarray(example, dtype=np.float64)
    output = wrapper.predict(None, example)
    # MLflow's advice about type hints / integer columns does not apply: the signature comes
    # from a real example, and the class index can never be missing. MLflow reloads the model to
    # check the example: that is no prediction to record in the (opt-in) prediction log.
    with warnings.catch_warnings(), mlflow.start_run(run_id=run.run_id), \
            _env_unset("DEEP_REPRO_PREDICTION_LOG"):
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="inference_model", python_model=str(code),
            artifacts={"program": str(program_path)},
            code_paths=[str(Path(safe_archive.__file__))],
            signature=infer_signature(example, output), input_example=example,
            registered_model_name=model_name,
            pip_requirements=[f"mlflow=={mlflow.__version__}",
                              f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"])
    version = getattr(info, "registered_model_version", None)
    return str(version) if version is not None else None


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


@dataclass(frozen=True)
class GateDecision:
    validated: bool
    promoted: bool
    reason: str


def validation_gate(client: MlflowClient, model_name: str, version: str, test_accuracy: float,
                    baseline: float) -> GateDecision:
    """Model validation: a version becomes `@champion` only if it beats the baseline *and* the
    current champion's test accuracy. Every evaluated version gets a `validation_status` tag."""
    from mlflow.exceptions import MlflowException

    champion = None
    with contextlib.suppress(MlflowException):
        champion = client.get_model_version_by_alias(model_name, "champion")
    champ_acc = None
    if champion is not None:
        with contextlib.suppress(KeyError, ValueError):
            champ_acc = float(champion.tags["test_accuracy"])
    client.set_model_version_tag(model_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    if test_accuracy <= baseline:
        decision = GateDecision(False, False, f"test accuracy {test_accuracy:.4f} does not beat "
                                f"evaluate.baseline {baseline:.4f}")
    elif champion is not None and str(champion.version) == str(version):
        decision = GateDecision(True, False, f"version {version} is already the champion")
    elif champ_acc is not None and test_accuracy <= champ_acc:
        decision = GateDecision(True, False, f"validated (beats baseline {baseline:.4f}) but "
                                f"does not beat champion v{champion.version} "  # type: ignore
                                f"({test_accuracy:.4f} <= {champ_acc:.4f})")
    else:
        client.set_registered_model_alias(model_name, "champion", version)
        prev = f" (previous: v{champion.version}, {champ_acc})" if champion is not None else ""
        decision = GateDecision(True, True, f"test accuracy {test_accuracy:.4f} beats baseline "
                                f"{baseline:.4f}: version {version} is now @champion{prev}")
    client.set_model_version_tag(model_name, version, "validation_status",
                                 "validated" if decision.validated else "rejected")
    client.set_model_version_tag(model_name, version, "validation_reason", decision.reason)
    return decision


def judge_registered_model(run: StageRun, model_name: str, root: Path, test_accuracy: float,
                           baseline: float) -> GateDecision:
    """Run the validation gate on the registry version built from exactly this inference model
    (found by its md5 through the postprocess run that produced it), and record the verdict on
    the evaluate and pipeline runs."""
    from deep_repro.pipeline import INFERENCE_MODEL

    md5 = file_digest(root / INFERENCE_MODEL)
    producer = find_producer(run.client, run.experiment_id, INFERENCE_MODEL, md5)
    version = model_version_for_run(run.client, model_name, producer) if producer else None
    if version is None:
        decision = GateDecision(False, False, f"no registered version of {model_name} was built "
                                f"from {INFERENCE_MODEL} (md5 {md5}): gate skipped")
        log.warning(decision.reason)
        return decision
    decision = validation_gate(run.client, model_name, str(version.version), test_accuracy,
                               baseline)
    run.set_tags({"validation_status": "validated" if decision.validated else "rejected",
                  "validation_reason": decision.reason,
                  "model_version": str(version.version)}, pipeline=True)
    return decision
