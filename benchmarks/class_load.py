"""A class logging at once: N simulated students against the class MLflow server (loopback only).

Each student is a process that logs what one `dvc exp run` logs, without training: a pipeline
run with seven stage children, params, per-epoch metrics and a small artifact. All start together.

    scripts/services.sh start && eval "$(scripts/services.sh env)"
    uv run python benchmarks/class_load.py            # N=30
    uv run python benchmarks/class_load.py -n 10 --epochs 5

Credentials: MLFLOW_TRACKING_USERNAME/PASSWORD, else the services' admin account.
Prints: runs expected vs present, runs left RUNNING, errors, p50/p95 latency of a logging call,
total time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

STAGES = ("download", "preprocess", "split", "analyze", "train", "postprocess", "evaluate")
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _timed(latencies: list[float], fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    latencies.append(time.perf_counter() - start)
    return result


def student(index: int, url: str, experiment: str, epochs: int, barrier: Any, out_dir: str) -> None:
    """One simulated `dvc exp run`: pipeline run + seven stage runs, like deep_repro.tracking."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    latencies: list[float] = []
    errors: list[str] = []
    user = f"student{index:02d}"
    try:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        barrier.wait(timeout=600)
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None
        tags = {"deep_repro.kind": "pipeline", "deep_repro.user": user, "mlflow.user": user}
        parent = _timed(
            latencies, client.create_run, exp.experiment_id, run_name=f"{user}-cnn-load", tags=tags
        ).info.run_id
        params = [Param(f"model.p{i}", str(i)) for i in range(40)]
        _timed(latencies, client.log_batch, parent, params=params)
        with tempfile.TemporaryDirectory() as tmp:
            artifact = Path(tmp) / "dvc_lock_entry.json"
            artifact.write_text(json.dumps({"user": user, "deps": ["x" * 32] * 8}))
            for stage in STAGES:
                run = _timed(
                    latencies,
                    client.create_run,
                    exp.experiment_id,
                    run_name=stage,
                    tags={
                        **tags,
                        "deep_repro.kind": "stage",
                        "deep_repro.stage": stage,
                        "mlflow.parentRunId": parent,
                    },
                ).info.run_id
                _timed(latencies, client.log_batch, run, params=params[:10])
                for epoch in range(epochs if stage == "train" else 1):
                    now = int(time.time() * 1000)
                    metrics = [
                        Metric(k, 0.5 + epoch / 100, now, epoch)
                        for k in ("train_loss", "val_loss", "val_accuracy", "lr")
                    ]
                    _timed(latencies, client.log_batch, run, metrics=metrics)
                _timed(latencies, client.log_artifact, run, str(artifact))
                _timed(
                    latencies,
                    client.log_batch,
                    run,
                    tags=[RunTag(f"deep_repro.out.{stage}", "0" * 32)],
                )
                _timed(latencies, client.set_terminated, run, "FINISHED")
        _timed(latencies, client.log_metric, parent, "test_accuracy", 0.9)
        _timed(latencies, client.set_terminated, parent, "FINISHED")
    except Exception:
        errors.append(traceback.format_exc(limit=3)[-600:])
    result = Path(out_dir) / f"{index}.json"
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps({"latencies": latencies, "errors": errors}))
    tmp.replace(result)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--students", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=15, help="per-epoch metric steps (train)")
    parser.add_argument(
        "--url",
        default=os.environ.get("DEEP_REPRO_TEST_MLFLOW_URL")
        or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    args = parser.parse_args(argv)
    if not args.url or urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must be an http://localhost or 127.0.0.1 server (loopback only)")
    if not 1 <= args.students <= 200:
        parser.error("--students must be within 1..200")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get(
        "DEEP_REPRO_TEST_MLFLOW_ADMIN_USER"
    ):
        os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ["DEEP_REPRO_TEST_MLFLOW_ADMIN_USER"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["DEEP_REPRO_TEST_MLFLOW_ADMIN_PASSWORD"]

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # 210 "View run" lines
    from mlflow import MlflowClient  # imported once here; forked students inherit it

    client = MlflowClient(tracking_uri=args.url, registry_uri=args.url)
    experiment = f"class-load-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    exp_id = client.create_experiment(experiment)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.students)
    with tempfile.TemporaryDirectory(prefix="class-load-") as out_dir:
        procs = [
            ctx.Process(
                target=student, args=(i, args.url, experiment, args.epochs, barrier, out_dir)
            )
            for i in range(args.students)
        ]
        for proc in procs:
            proc.start()
        start = time.perf_counter()
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        stragglers = [p for p in procs if p.is_alive()]
        for proc in stragglers:
            proc.terminate()
            proc.join(timeout=10)
        total = time.perf_counter() - start
        latencies: list[float] = []
        errors: list[str] = [f"student pid {p.pid} timed out" for p in stragglers]
        for i in range(args.students):
            path = Path(out_dir) / f"{i}.json"
            if path.exists():
                data = json.loads(path.read_text())
                latencies += data["latencies"]
                errors += data["errors"]
            elif not stragglers:
                errors.append(f"student {i} wrote no result")

    runs = client.search_runs([exp_id], max_results=5000)
    expected = args.students * (1 + len(STAGES))
    running = sum(r.info.status == "RUNNING" for r in runs)
    print(f"students {args.students}, server {args.url}, experiment {experiment}")
    print(f"runs expected {expected}, present {len(runs)}, left RUNNING {running}")
    print(f"errors {len(errors)}")
    for err in errors[:3]:
        print("  " + err.strip().splitlines()[-1][:300])
    print(
        f"logging calls {len(latencies)}: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
        f"mean {statistics.fmean(latencies) * 1000 if latencies else float('nan'):.0f} ms"
    )
    print(f"total {total:.1f} s")
    return 0 if not errors and len(runs) == expected and running == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
