"""Stage 3 — split: stratified train/validation split of the official training set.

Validation is carved out of the 60,000 training images (`split.val_size`, `split.seed`); the
official 10,000 test images pass through untouched and are only ever used by `evaluate`.
`data.subset` keeps a stratified subset of the training images for quick runs.
"""

import numpy as np

from deep_repro import data, tracking
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import entrypoint
from deep_repro.paths import repo_root
from deep_repro.pipeline import PROCESSED_TEST, PROCESSED_TRAIN, SPLIT_TEST, SPLIT_TRAIN_VAL


@entrypoint
def main() -> None:
    cfg = load_stage_config("split")
    root = repo_root()
    with tracking.stage_run("split", cfg) as run:
        train = data.load_arrays(root / PROCESSED_TRAIN)
        test = data.load_arrays(root / PROCESSED_TEST)
        parts = data.make_split(
            train["images"],
            train["labels"],
            val_size=cfg.split.val_size,
            seed=cfg.split.seed,
            subset=cfg.data.subset,
        )
        data.save_arrays(root / SPLIT_TRAIN_VAL, **parts)
        data.save_arrays(root / SPLIT_TEST, x_test=test["images"], y_test=test["labels"])
        counts = {f"{k[2:]}_size": len(v) for k, v in parts.items() if k.startswith("y_")}
        counts["test_size"] = len(test["labels"])
        run.log_metrics(counts)
        for name in ("train", "val"):
            hist = np.bincount(parts[f"y_{name}"], minlength=data.NUM_CLASSES)
            run.log_dict(
                dict(zip(data.CLASS_NAMES, hist.tolist(), strict=True)), f"class_counts_{name}.json"
            )


if __name__ == "__main__":
    main()
