"""Take the MLflow UI screenshots of the tutorial (docs/img/*.png) in headless Chromium.

    uv run python scripts/screenshots.py                    # tiny real pipeline runs, then shots
    uv run python scripts/screenshots.py --store mlflow.db  # shots of an existing store (copied)

Not part of CI: it needs Debian's `chromium` (`sudo apt-get install chromium`; no browser is
downloaded) and a few minutes. Why a script and not screen captures by hand: the pictures then show
what the current code logs, and anyone can retake them after a change to the tracking code.

What it does, all under one temporary folder that is deleted at the end:

1. Unless `--store` is given: clones this repository (its HEAD) and runs three small experiments
   with the project's own virtual environment — `data.subset` of 2,000 images, a logistic
   regression, a 2-epoch MLP and a 1-epoch CNN — so the store holds real pipeline runs, stage
   runs, registered versions and gate decisions. Nothing is written to this checkout but the PNGs.
2. Starts `mlflow server` from the project venv on 127.0.0.1 against that store (a copy of it with
   `--store`, so the UI never migrates or writes your own store).
3. Opens, in a fresh browser profile with a 1920-pixel-wide window (columns are not clipped)
   and under a host name other than localhost (see HOST):
   the experiment's runs table through the route the UI itself uses,
   `#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=deep-repro` (the bare
   URL opens MLflow 3.17's GenAI overview instead), the comparison of the pipeline runs, one
   pipeline run and the newest model version.
4. Stops every process it started, by PID (the server and each browser run in their own session,
   and that session is what is signalled).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the project's venv when run with `uv run`
DEBIAN_MIRROR = Path("/usr/share/datasets/fashion-mnist")
WIDTH = 1920
# The browser reaches the server under this name (mapped to 127.0.0.1 inside Chromium only): on
# localhost MLflow 3.17 opens its "MLflow Assistant" side panel on first load, which would take
# a quarter of every picture. The server is told to accept the name (Host and CORS checks).
HOST = "mlflow-docs.test"

# (name, overrides): small enough for a busy 2-core machine, real enough to fill every view.
EXPERIMENTS = [
    ("shots-logreg", ["model=logreg"]),
    ("shots-mlp", ["model=mlp", "train.epochs=2"]),
    ("shots-cnn", ["model=cnn", "train.epochs=1"]),
]
COMMON = ["data.subset=2000"]


def log(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus anything that would send runs to another store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DEEP_REPRO_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, env=env or clean_env(), check=True, timeout=timeout)


def populate(work: Path) -> Path:
    """A clone of this repository with a few real pipeline runs in its own mlflow.db."""
    repo = work / "repo"
    run(["git", "clone", "--quiet", str(ROOT), str(repo)], cwd=work, timeout=300)
    # The runs record the remote URL (tag deep_repro.git.remote): not this machine's path.
    run(["git", "remote", "remove", "origin"], cwd=repo, timeout=30)
    for key, value in (("user.email", "screenshots@deep-repro.invalid"), ("user.name", "docs")):
        probe = subprocess.run(["git", "config", key], cwd=repo, capture_output=True, text=True)
        if not probe.stdout.strip():
            run(["git", "config", key, value], cwd=repo, timeout=30)
    overrides = list(COMMON)
    if DEBIAN_MIRROR.is_dir():  # `apt-get install dataset-fashion-mnist`: no download needed
        overrides.append(f"data.mirrors=[file://{DEBIAN_MIRROR}]")
    for name, extra in EXPERIMENTS:
        cmd = [str(VENV_BIN / "dvc"), "exp", "run", "-n", name]
        for override in overrides + extra:
            cmd += ["-S", override]
        run(cmd, cwd=repo, timeout=1800)
    return repo / "mlflow.db"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(store: Path, work: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--artifacts-destination",
        str(work / "artifacts"),
        "--allowed-hosts",
        f"{HOST}:{port},127.0.0.1:{port},localhost:{port}",
        "--cors-allowed-origins",
        f"http://{HOST}:{port}",
    ]
    log("$ " + " ".join(cmd))
    out = (work / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=work, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}: see {out.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    stop(proc, "mlflow server")
    raise SystemExit("mlflow server did not answer /health within 120 s")


def stop(proc: subprocess.Popen[bytes], what: str) -> None:
    """SIGTERM the session this script started `proc` in (its workers included), then SIGKILL."""
    if proc.poll() is None:
        log(f"stopping {what} (pid {proc.pid})")
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # start_new_session: the group id is the pid
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def api(port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return dict(json.loads(reply.read()))


ML = "workflowType=machine_learning"  # the "Model training" side of the UI, not GenAI


def pages(port: int, experiment: str, model: str) -> list[tuple[str, str, int]]:
    """(png name, URL fragment, window height) of each view the tutorial shows."""
    exp = api(port, f"experiments/get-by-name?experiment_name={quote(experiment)}")["experiment"]
    exp_id = exp["experiment_id"]
    found = api(
        port,
        "runs/search",
        {
            "experiment_ids": [exp_id],
            "filter": "tags.`deep_repro.kind` = 'pipeline'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 3,
        },
    ).get("runs", [])
    run_ids = [r["info"]["run_id"] for r in found]
    shots = [
        ("mlflow-runs.png", f"#/experiments/{exp_id}/runs?{ML}&viewStateShareKey=deep-repro", 720)
    ]
    if len(run_ids) >= 2:
        runs, exps = quote(json.dumps(run_ids)), quote(json.dumps([exp_id]))
        fragment = f"#/compare-runs?runs={runs}&experiments={exps}&{ML}"
        shots.append(("mlflow-compare.png", fragment, 2400))
    if run_ids:
        fragment = f"#/experiments/{exp_id}/runs/{run_ids[0]}?{ML}"
        shots.append(("mlflow-pipeline-run.png", fragment, 1400))
    try:
        versions = api(port, f"registered-models/get?name={quote(model)}")["registered_model"]
        latest = max(int(v["version"]) for v in versions.get("latest_versions", []))
        fragment = f"#/models/{quote(model)}/versions/{latest}?{ML}"
        shots.append(("mlflow-model-version.png", fragment, 1080))
    except (OSError, KeyError, ValueError):
        log(f"no registered model {model!r}: no model-version screenshot")
    return shots


def shoot(chromium: str, url: str, png: Path, profile: Path, height: int, budget_ms: int) -> None:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",  # fresh profile: no remembered GenAI/ML switch
        f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
        f"--window-size={WIDTH},{height}",
        f"--virtual-time-budget={budget_ms}",  # let the single-page app fetch and render
        f"--screenshot={png}",
        url,
    ]
    log(f"shooting {png.name}: {url}")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(proc, "chromium")
    if not png.exists() or png.stat().st_size == 0:
        raise SystemExit(f"chromium wrote no {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing mlflow.db (copied, not modified)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--experiment", default="fashion-mnist", help="tracking.experiment")
    parser.add_argument("--model", default="fashion-mnist-classifier", help="tracking.model_name")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time per page")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium):
        raise SystemExit("no chromium: `sudo apt-get install chromium` (Debian's package)")

    work = Path(tempfile.mkdtemp(prefix="deep-repro-shots-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        if args.store:
            store = work / "mlflow.db"
            shutil.copy2(args.store, store)
        else:
            store = populate(work)
        port = free_port()
        server = start_server(store, work, port)
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (name, fragment, height) in enumerate(pages(port, args.experiment, args.model)):
            url = f"http://{HOST}:{port}/{fragment}"
            profile = work / f"profile-{i}"
            shoot(args.chromium, url, args.out / name, profile, height, args.budget_ms)
            log(f"wrote {args.out / name}")
    finally:
        if server is not None:
            stop(server, "mlflow server")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
