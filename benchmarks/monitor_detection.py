"""Drift detection of `deep-repro monitor` on the full Fashion-MNIST data.

Reference: the validation split the pipeline uses (seed 42, 10 % of the official training set);
batches: 500 images drawn with replacement from the official test set, clean or transformed.
Prints, per scenario, how many of `--batches` batches raised the alarm (false alarms for clean,
detections otherwise) and the seconds one 500-image batch takes (features + every test, after
the reference has been prepared once).

    .venv/bin/python benchmarks/monitor_detection.py                      # models/inference.pt2
    .venv/bin/python benchmarks/monitor_detection.py --model other.pt2 --batches 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/ holds the scenario definitions the tests use

from deep_repro import config, data, inference, monitoring, training  # noqa: E402
from tests.test_monitoring import FOOTWEAR, SCENARIOS  # noqa: E402

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
log = logging.getLogger("monitor_detection")


def quick_model(splits: data.Splits) -> torch.nn.Module:
    """No exported model at hand: an MLP, 3 epochs on the full training split (~1 min)."""
    cfg = config.validate(
        config.compose(["model=mlp", "train.epochs=3", "augment=none"], REPO / "conf")
    )
    net = training.train_model(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val
    ).model
    return inference.build_inference_module(net)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models/inference.pt2")
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    x_train, y_train = data.load_idx_pair(args.data, "train")
    x_test, y_test = data.load_idx_pair(args.data, "t10k")
    parts = data.make_split(x_train, y_train, val_size=0.1, seed=42, subset=None)
    splits = data.Splits(
        parts["x_train"], parts["y_train"], parts["x_val"], parts["y_val"], x_test, y_test
    )
    if args.model.is_file():
        program, source = inference.load_inference_model(args.model), str(args.model)
    else:
        program, source = quick_model(splits), "quick MLP (no --model file)"

    def predictor(x: np.ndarray) -> np.ndarray:
        return torch.softmax(inference.predict_logits(program, x), dim=1).numpy()

    start = time.perf_counter()
    reference = monitoring.Reference(splits.x_val, splits.y_val, predictor)
    prepare = time.perf_counter() - start
    log.info(
        "model: %s; reference: %d val images (accuracy %.4f on the model subsample), "
        "prepared in %.2f s",
        source,
        len(splits.y_val),
        reference.accuracy,
        prepare,
    )
    print(f"{'scenario':<10} {'alarms':>8}  {'kind':<13} {'s / batch':>9}  checks fired")
    for scenario in ("clean", *SCENARIOS):
        pool = (
            np.flatnonzero(np.isin(y_test, FOOTWEAR))
            if scenario == "footwear"
            else np.arange(len(y_test))
        )
        alarms, seconds, fired = 0, [], {}
        for seed in range(args.batches):
            rng = np.random.default_rng(seed)
            images = x_test[rng.choice(pool, 500)]
            if scenario != "clean":
                images = SCENARIOS[scenario](images, rng)
            start = time.perf_counter()
            report = reference.compare(
                monitoring.features_from_images(images, predictor), alpha=args.alpha
            )
            seconds.append(time.perf_counter() - start)
            alarms += report.drift
            for check in report.fired:
                fired[check.name] = fired.get(check.name, 0) + 1
        kind = "false alarms" if scenario == "clean" else "detections"
        print(
            f"{scenario:<10} {alarms:>3} / {args.batches:<2}  {kind:<13} "
            f"{statistics.median(seconds):>9.3f}  "
            + (", ".join(f"{k} {v}" for k, v in fired.items()) or "-")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
