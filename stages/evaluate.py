"""Stage 6 — evaluate: final metrics of the *inference* model, and the validation gate.

Loads only models/inference.pt2 (never the training code path), scores validation and test,
writes DVC metrics/plots, logs figures to MLflow, and runs the validation gate: the registered
model version becomes `@champion` if its VALIDATION accuracy beats `evaluate.baseline` and, paired
image by image with the current champion (McNemar), is better beyond noise (p < `evaluate.alpha`).
The test accuracy is reported with its 95% interval and never read by a decision.
"""

import logging
import time

import torch

from deep_repro import data, evaluation, files, inference, tracking
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import ValidationError, entrypoint
from deep_repro.paths import repo_root
from deep_repro.pipeline import (
    CONFUSION,
    CONFUSION_PNG,
    EVAL_DETAILS,
    INFERENCE_MODEL,
    METRICS,
    MISCLASSIFIED_PNG,
    PER_CLASS,
    PREDICTIONS,
    RELIABILITY,
    RELIABILITY_PNG,
    SPLIT_TEST,
    SPLIT_TRAIN_VAL,
)
from deep_repro.training.device import resolve_num_threads

log = logging.getLogger("evaluate")


@entrypoint
def main() -> None:
    cfg = load_stage_config("evaluate")
    root = repo_root()
    # The model first: a missing or refused (unsafe) file fails before any data or run.
    model = inference.load_inference_model(root / INFERENCE_MODEL)
    splits = data.load_splits(root / SPLIT_TRAIN_VAL, root / SPLIT_TEST)
    with tracking.stage_run("evaluate", cfg) as run:
        torch.set_num_threads(resolve_num_threads(cfg.train.num_threads))
        metrics, details, logits, reports, parts = {}, {}, {}, {}, {}
        for part, x, y, source in (
            ("val", splits.x_val, splits.y_val, SPLIT_TRAIN_VAL),
            ("test", splits.x_test, splits.y_test, SPLIT_TEST),
        ):
            digest = data.array_digest(x, y)
            tracking.log_dataset(
                run,
                f"fashion-mnist-{part}",
                x,
                y,
                digest,
                str(root / source),
                context=part,
            )
            start = time.perf_counter()
            logits[part] = inference.predict_logits(model, x).numpy()
            seconds = time.perf_counter() - start
            reports[part] = evaluation.classification_report(y, logits[part])
            parts[part] = evaluation.split_predictions(digest, y, logits[part].argmax(axis=1))
            headline = reports[part].headline(part)
            # DVC metrics: three numbers per split, so `dvc metrics show`/`exp show` stay
            # readable; every number of the report goes to reports/eval/details.json and MLflow.
            metrics[part] = reports[part].summary()
            details[part] = {k.split("_", 1)[1]: round(v, 6) for k, v in headline.items()}
            run.log_metrics(headline, pipeline=True)
            # Timing varies run to run: MLflow only, never in the DVC-tracked metrics file.
            run.log_metrics({f"{part}_ms_per_image": 1e3 * seconds / len(y)})
        files.write_json(root / METRICS, metrics)
        files.write_json(root / EVAL_DETAILS, details)
        predictions = evaluation.Predictions(parts)
        files.write_bytes(root / PREDICTIONS, predictions.to_bytes())

        test, x_test, y_test = reports["test"], splits.x_test, splits.y_test
        files.write_csv(
            root / CONFUSION, evaluation.prediction_rows(y_test, logits["test"].argmax(axis=1))
        )
        files.write_csv(root / PER_CLASS, evaluation.per_class_rows(test))
        files.write_csv(root / RELIABILITY, evaluation.reliability_rows(test.calibration))
        figures = {
            CONFUSION_PNG: evaluation.confusion_figure(
                test.confusion, f"{cfg.model.name}: test accuracy {test.accuracy:.4f}"
            ),
            MISCLASSIFIED_PNG: evaluation.misclassified_figure(x_test, y_test, logits["test"]),
            RELIABILITY_PNG: evaluation.reliability_figure(test.calibration, test.ece),
        }
        for path, fig in figures.items():
            files.save_figure(fig, root / path)
            run.log_artifact(root / path, "figures")
        run.log_artifact(root / PER_CLASS, "tables")
        run.log_artifact(root / METRICS)
        run.log_artifact(root / EVAL_DETAILS)
        run.log_artifact(root / PREDICTIONS)  # per image: what a reproduction compares with

        # Model validation on the validation images only (see deep_repro.tracking.gate): the
        # gate stores the predictions file with the registered version as its evidence.
        val = reports["val"]
        decision = tracking.judge_registered_model(
            run,
            cfg.tracking.model_name,
            root,
            predictions,
            cfg.evaluate.baseline,
            cfg.evaluate.alpha,
        )
        log.info("validation gate: %s", decision.reason)
        if cfg.evaluate.fail_below is not None and val.accuracy < cfg.evaluate.fail_below:
            raise ValidationError(
                f"validation accuracy {val.accuracy:.4f} is below "
                f"evaluate.fail_below = {cfg.evaluate.fail_below}"
            )
        log.info(
            "val accuracy %.4f ± %.4f (decides); test accuracy %.4f ± %.4f, macro-F1 %.4f "
            "(reported only)",
            val.accuracy,
            val.accuracy_pm,
            test.accuracy,
            test.accuracy_pm,
            test.macro_f1,
        )


if __name__ == "__main__":
    main()
