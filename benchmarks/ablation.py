"""Training levers side by side: validation accuracy and training seconds of config variants.

Every variant trains with `training.train_model` (what the train stage runs) on the pipeline's
own split of the real Fashion-MNIST training set (`split.val_size`, `split.seed`), and is scored
on validation only, under each test-time augmentation `postprocess.tta` chooses between (none,
hflip, hflip_shift). The test set is never read: a lever is chosen on validation, and the pipeline
reports test accuracy for the chosen config. A variant is a name and Hydra overrides:

    .venv/bin/python benchmarks/ablation.py \\
        --variant default \\
        --variant erasing=augment.random_erasing=0.2 \\
        --variant ls0.1=train.label_smoothing=0.1 \\
        --variant wide=model.channels=[48,96,192]
    .venv/bin/python benchmarks/ablation.py --subset 3000 --variant default --variant \\
        short=train.epochs=1            # smoke test: a stratified 3,000-image subset

Variants run one after another on the same threads (`--rounds 2` repeats the list, interleaved,
and prints the mean seconds); each line is printed as it finishes. On a shared machine compare
seconds only between variants of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
FIXTURE = REPO / "tests/fixtures/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME or NAME=OVERRIDE[,OVERRIDE...] (Hydra overrides on the pipeline's config)",
    )
    parser.add_argument("--subset", type=int, help="stratified subset of the training images")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import torch

    from deep_repro import config, data, models, training  # noqa: F401 - registers models
    from deep_repro.training.augment import TTA_VIEWS
    from deep_repro.training.protocol import evaluate_logits, logit_metrics

    variants: dict[str, list[str]] = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        variants[name] = _split_overrides(rest)
    cfgs = {n: config.validate(config.compose(o, REPO / "conf")) for n, o in variants.items()}
    base = next(iter(cfgs.values()))
    source = REAL_DATA if (REAL_DATA / "train-images-idx3-ubyte.gz").exists() else FIXTURE
    images, labels = data.load_idx_pair(source, "train")
    parts = data.make_split(
        images, labels, val_size=base.split.val_size, seed=base.split.seed, subset=args.subset
    )
    print(
        f"data: {source} ({len(parts['y_train'])} train / {len(parts['y_val'])} val), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # Warm-up (oneDNN primitives, thread pool): the first variant would otherwise pay for it.
    few = min(len(parts["y_train"]), 10 * base.train.batch_size)
    training.train_model(
        base, parts["x_train"][:few], parts["y_train"][:few], parts["x_val"][:256],
        parts["y_val"][:256], epochs=1, progress=False,
    )  # fmt: skip
    ttas = list(TTA_VIEWS)
    heads = "".join(f"{'val ' + t:>17}" for t in ttas)
    print(f"{'variant':<18}{heads} {'best ep':>7} {'train s':>8}  overrides")
    results: dict[str, list[tuple[float, ...]]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, cfg in cfgs.items():
            start = time.perf_counter()
            result = training.train_model(
                cfg, parts["x_train"], parts["y_train"], parts["x_val"], parts["y_val"],
                progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            xv = torch.from_numpy(parts["x_val"])
            yv = torch.from_numpy(parts["y_val"].astype(np.int64))
            acc = [
                logit_metrics(evaluate_logits(result.model.cpu(), xv, tta=tta), yv)[1]
                for tta in ttas
            ]
            results[name].append((*acc, seconds))
            print(
                f"{name:<18}{''.join(f'{a:>17.4f}' for a in acc)} {result.best_epoch:>7} "
                f"{seconds:>8.1f}  {' '.join(variants[name]) or '(the default)'}",
                flush=True,
            )
    if args.rounds > 1:
        print("mean over rounds:")
        for name, rows in results.items():
            means = [statistics.mean(col) for col in zip(*rows, strict=True)]
            print(
                f"{name:<18}{''.join(f'{a:>17.4f}' for a in means[:-1])} {'':>7} {means[-1]:>8.1f}"
            )


def _split_overrides(text: str) -> list[str]:
    """`a=1,b=[2,3]` -> ["a=1", "b=[2,3]"]: commas inside brackets stay."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [o for o in [*out, current] if o]


if __name__ == "__main__":
    main()
