"""Stage — analyze: the data report of the split, in parallel with training (nothing needs it).

Checks every split file (shapes, dtypes, pixel range, labels 0..9; a failure stops the stage with
one line naming the file), then writes reports/data/: summary.json (checks, sizes, class counts,
train/test duplicate counts), class_balance.csv and intensity_hist.csv (DVC plots), and the
per-class mean images and near-duplicate examples as PNGs. Definitions: deep_repro.data.analysis.
"""

import logging
import time

from deep_repro import tracking
from deep_repro.config.stage_view import load_stage_config
from deep_repro.data import analysis as data_analysis
from deep_repro.errors import entrypoint
from deep_repro.paths import repo_root

log = logging.getLogger("analyze")


@entrypoint
def main() -> None:
    cfg = load_stage_config("analyze")
    root = repo_root()
    with tracking.stage_run("analyze", cfg) as run:
        start = time.perf_counter()
        parts = data_analysis.load_parts(root)
        report = data_analysis.analyze(
            parts, cfg.analyze.near_duplicate_threshold, cfg.analyze.duplicate_examples
        )
        files = data_analysis.write_report(report, root)
        seconds = time.perf_counter() - start
        run.log_metrics(report.metrics())
        # Timing varies run to run: MLflow only, never in a DVC-tracked file.
        run.log_metrics({"analyze_seconds": seconds})
        for path in files:
            run.log_artifact(root / path, "data_report")
        dup = report.summary["duplicates"]
        log.info(
            "%s; test images with a training duplicate: %d exact, %d near (RMS <= %g) in %.1f s",
            ", ".join(f"{n} {size}" for n, size in report.summary["sizes"].items()),
            dup["n_exact"],
            dup["n_near"],
            report.threshold,
            seconds,
        )


if __name__ == "__main__":
    main()
