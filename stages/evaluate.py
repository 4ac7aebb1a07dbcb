"""Stage 6 — evaluate: final metrics of the *inference* model, and the validation gate.

Loads only models/inference.pt2 (never the training code path), scores validation and test,
writes DVC metrics/plots, logs figures to MLflow, and promotes the registered model version to
`@champion` if it beats `evaluate.baseline` and the current champion.
"""

import logging
import time

import torch

from deep_repro import config, data, evaluation, inference, tracking
from deep_repro.errors import DataError, entrypoint
from deep_repro.files import write_json
from deep_repro.paths import repo_root

log = logging.getLogger("evaluate")


@entrypoint
def main() -> None:
    cfg = config.load_config()
    root = repo_root()
    splits = data.load_splits(root / "data/split")
    model_path = root / "models/inference.pt2"
    with tracking.stage_run("evaluate", cfg) as run:
        torch.set_num_threads(cfg.train.num_threads)
        model = inference.load_inference_model(model_path)
        metrics, logits = {}, {}
        for part, x, y in (("val", splits.x_val, splits.y_val),
                           ("test", splits.x_test, splits.y_test)):
            tracking.log_dataset(run, f"fashion-mnist-{part}", x, y, data.array_digest(x, y),
                                 str(root / "data/split"), context=part)
            start = time.perf_counter()
            logits[part] = inference.predict_logits(model, x).numpy()
            seconds = time.perf_counter() - start
            report = evaluation.classification_report(y, logits[part])
            metrics[part] = {k.split("_", 1)[1]: round(v, 6)
                             for k, v in report.headline(part).items()}
            run.log_metrics(report.headline(part), pipeline=True)
            run.log_metrics({f"{part}_ms_per_image": 1e3 * seconds / len(y)})
        write_json(root / "reports/metrics.json", metrics)

        y_test, x_test = splits.y_test, splits.x_test
        test = evaluation.classification_report(y_test, logits["test"])
        pred = logits["test"].argmax(axis=1)
        reports = root / "reports/eval"
        evaluation.write_csv(reports / "confusion.csv", evaluation.prediction_rows(y_test, pred))
        evaluation.write_csv(reports / "per_class.csv", evaluation.per_class_rows(test))
        conf = evaluation.softmax(logits["test"]).max(axis=1)
        ece, bins = evaluation.expected_calibration_error(conf, pred == y_test)
        evaluation.write_csv(reports / "reliability.csv", bins)
        figures = {
            "confusion_matrix.png": evaluation.confusion_figure(
                test.confusion, f"{cfg.model.name}: test accuracy {test.accuracy:.4f}"),
            "misclassified.png": evaluation.misclassified_figure(x_test, y_test, logits["test"]),
            "reliability.png": evaluation.reliability_figure(bins, ece),
        }
        for name, fig in figures.items():
            evaluation.save_figure(fig, reports / name)
            run.log_artifact(reports / name, "figures")
        run.log_artifact(reports / "per_class.csv", "tables")
        run.log_artifact(root / "reports/metrics.json")

        # Model validation gate: find the registry version built from exactly this file.
        md5 = tracking.md5_file(model_path)
        producer = tracking.find_producer(run.client, run.experiment_id,
                                          "models/inference.pt2", md5)
        version = (tracking.model_version_for_run(run.client, cfg.tracking.model_name, producer)
                   if producer else None)
        if version is None:
            log.warning("no registered model version was built from models/inference.pt2 "
                        "(md5 %s): validation gate skipped", md5)
        else:
            decision = tracking.validation_gate(run.client, cfg.tracking.model_name,
                                                version.version, test.accuracy,
                                                cfg.evaluate.baseline)
            log.info("validation gate: %s", decision.reason)
            run.set_tags({"validation_status": "validated" if decision.validated else "rejected",
                          "validation_reason": decision.reason,
                          "model_version": version.version}, pipeline=True)
        if cfg.evaluate.fail_below is not None and test.accuracy < cfg.evaluate.fail_below:
            raise DataError(f"test accuracy {test.accuracy:.4f} is below evaluate.fail_below = "
                            f"{cfg.evaluate.fail_below}")
        log.info("test accuracy %.4f, macro-F1 %.4f (val %.4f)", test.accuracy, test.macro_f1,
                 metrics["val"]["accuracy"])


if __name__ == "__main__":
    main()
