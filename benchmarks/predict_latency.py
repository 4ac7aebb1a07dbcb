"""Wall time of `deep-repro predict` on one 28x28 image vs `python -c "import torch"`.

A newcomer's first command after `dvc repro` is `deep-repro predict one.png`; it should cost
about what starting Python with torch costs, whichever model source it reads. The script
builds a throw-away project in a temp dir (a small logistic regression trained on the committed
fixture, exported to `models/inference.pt2` and registered as `@champion` in a sqlite MLflow
store), then times, interleaved so machine load affects all three alike:

    torch      python -c "import torch"
    pt2        deep-repro predict --model models/inference.pt2 one.png
    champion   deep-repro predict one.png   (models:/<name>@champion)

after one first call of each (which fills the champion's local copy and the verified fast-start
copy of the program; its time is printed too), and prints the median of each and the ratios
predict / torch (target: <= 1.5).

    .venv/bin/python benchmarks/predict_latency.py               # 7 repeats
    .venv/bin/python benchmarks/predict_latency.py --repeats 3
    git worktree add /tmp/before HEAD~1 && \\
        .venv/bin/python benchmarks/predict_latency.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET = 1.5


def build_project(
    root: Path, overrides: tuple[str, ...] = ("model=logreg", "model.max_iter=60")
) -> Path:
    """Project dir with models/inference.pt2, a champion in root/mlflow.db and one image
    (the model: `overrides` on top of the committed fixture's config)."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch
    import yaml
    from PIL import Image

    from deep_repro import config, data, evaluation, inference, tracking, training
    from deep_repro.files import atomic_path
    from tests.helpers import FIXTURE, fixture_overrides

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    composed = config.compose([*fixture_overrides(), *overrides], REPO / "conf")
    (root / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    cfg = config.validate(composed)
    x, y = data.load_idx_pair(FIXTURE, "train")
    net = training.train_model(cfg, x[:900], y[:900], x[900:], y[900:]).model
    target = root / "models/inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(inference.build_inference_module(net), torch.from_numpy(x[:2]), tmp)
    with tracking.stage_run("postprocess", cfg) as run:
        version = tracking.log_inference_model(run, target, x[:4], cfg.tracking.model_name)
    assert version is not None
    labels = np.arange(1000) % 10
    predicted = np.where(np.arange(1000) < 900, labels, (labels + 1) % 10)
    evidence = evaluation.Predictions(
        {"val": evaluation.split_predictions("benchmark", labels, predicted)}
    )
    tracking.validation_gate(run.client, cfg.tracking.model_name, version, evidence, 0.5, 0.05)
    Image.fromarray(np.asarray(x[0], dtype=np.uint8)).save(root / "one.png")
    return root


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys) of one run: on a shared machine the CPU time
    is the steadier of the two."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--before-src",
        type=Path,
        help="also time the predict of another "
        "checkout's src/ (e.g. a `git worktree` of the previous commit)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="predict-latency-") as tmp:
        root = build_project(Path(tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        python = str(BIN / "python")
        predict = [python, "-m", "deep_repro.cli", "predict"]
        commands = {
            "torch": ([python, "-c", "import torch"], None),
            "pt2": ([*predict, "--model", "models/inference.pt2", "one.png"], None),
            "champion": ([*predict, "one.png"], None),
        }
        if args.before_src:
            src = str(args.before_src.resolve())
            commands["pt2 before"] = (commands["pt2"][0], src)
            commands["champion before"] = (commands["champion"][0], src)

        def run(name: str) -> tuple[float, float]:
            cmd, src = commands[name]
            return timed(cmd, root, env if src is None else {**env, "PYTHONPATH": src})

        # The first call of each fills the caches: the champion's local copy, and for both the
        # verified fast-start copy of the program (inference/fast_program.py). Reported apart.
        first = {name: run(name) for name in ("pt2", "champion")}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name in commands:
                times[name].append(run(name))
    wall = {n: statistics.median(t[0] for t in v) for n, v in times.items()}
    cpu = {n: statistics.median(t[1] for t in v) for n, v in times.items()}
    print(f"{'command':<16} {'wall s':>7} {'/ torch':>8} {'cpu s':>7} {'/ torch':>8}  (medians)")
    for name in times:
        print(
            f"{name:<16} {wall[name]:7.2f} {wall[name] / wall['torch']:8.2f} "
            f"{cpu[name]:7.2f} {cpu[name] / cpu['torch']:8.2f}"
        )
    for name, (seconds, cpu_s) in first.items():
        print(
            f"{name + ' (1st)':<16} {seconds:7.2f} {seconds / wall['torch']:8.2f} "
            f"{cpu_s:7.2f} {cpu_s / cpu['torch']:8.2f}  (first use: builds the caches)"
        )
    ok = all(wall[n] / wall["torch"] <= TARGET for n in ("pt2", "champion"))
    print(
        f"target predict <= {TARGET}x import torch (wall): {'met' if ok else 'NOT met'} "
        f"({args.repeats} repeats, interleaved)"
    )


if __name__ == "__main__":
    main()
