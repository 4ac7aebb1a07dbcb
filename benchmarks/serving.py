"""The served champion under load vs the same pyfunc model called in one process.

`deep-repro serve` (the documented way to serve: MLflow's scoring app behind request limits)
runs the champion pinned to its own core(s); concurrent HTTP clients on 127.0.0.1, pinned to
other cores with `taskset` so they never steal the server's, send bodies of uint8 pixel values
for `--seconds` each, in each `--bodies` form: `json` (`{"inputs": [...]}`) and `npy`
(`application/x-npy`, `np.save` of the uint8 images: `deep-repro serve`'s compact form). Next to
it, "direct": the same MLflow pyfunc model (`mlflow.pyfunc.load_model` of the same
`models:/...@champion`) called in-process on the same images as a NumPy array, on the server's
core(s) with the same thread count. For each server, body form and batch size
it prints throughput (images/s), p50/p99 latency and

    throughput ratio served/direct = X      (targets: >= 0.5 at batch 1, >= 0.85 at batch 64)

and the CPU time per image of the server process vs the direct loop (steadier than wall time on a
shared machine: another tenant's load lengthens both, but costs neither CPU time).

The model is the default CNN (the pipeline's `model=cnn`), trained for one epoch on the committed
fixture and registered as `@champion` in a throw-away sqlite store: serving cost does not depend
on the weights. `--plain` also times plain `mlflow models serve` (no request limits) for
comparison; `--breakdown` times each piece of a request in-process (MLflow's request path vs
the fast path of `deep-repro serve`). Rounds interleave direct and served runs.

    .venv/bin/python benchmarks/serving.py                    # batch 1 and 64, 10 s each
    .venv/bin/python benchmarks/serving.py --bodies npy       # the compact form only
    .venv/bin/python benchmarks/serving.py --plain --breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = {1: 0.5, 64: 0.85}
TYPES = {"json": "application/json", "npy": "application/x-npy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(port: int, body_file: str, seconds: float, warmup: float, kind: str) -> None:
    """One client (its own process): POST the body back to back on one keep-alive connection;
    print the latencies (s) of the requests that started after the warm-up, as JSON."""
    import http.client

    body = Path(body_file).read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": TYPES[kind]}
    start = time.perf_counter()
    latencies: list[float] = []
    total = 0
    while (now := time.perf_counter()) < start + warmup + seconds:
        conn.request("POST", "/invocations", body, headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {answer[:300]!r}")
        total += 1
        if now >= start + warmup:
            latencies.append(time.perf_counter() - now)
    print(json.dumps({"latencies": latencies, "requests": total}))


def served(
    port: int, body: Path, clients: int, cores: str, seconds: float, warmup: float
) -> tuple[list[float], int]:
    """Latencies after the warm-up, and all requests answered (the CPU time covers them)."""
    kind = body.suffix.lstrip(".")
    cmd = [sys.executable, __file__, "--client", str(port), str(body), str(seconds), str(warmup),
           kind]  # fmt: skip
    procs = [
        subprocess.Popen(["taskset", "-c", cores, *cmd], stdout=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    latencies: list[float] = []
    requests = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + warmup + 120)
        if proc.returncode != 0:
            raise SystemExit(f"a client failed ({proc.returncode})")
        result = json.loads(out)
        latencies += result["latencies"]
        requests += result["requests"]
    return latencies, requests


def direct(model: object, images: object, seconds: float, warmup: float) -> tuple[list[float], int]:
    predict = model.predict  # type: ignore[attr-defined]
    start = time.perf_counter()
    latencies: list[float] = []
    total = 0
    while (now := time.perf_counter()) < start + warmup + seconds:
        predict(images)
        total += 1
        if now >= start + warmup:
            latencies.append(time.perf_counter() - now)
    return latencies, total


def start_server(cmd: list[str], cores: str, env: dict[str, str], port: int, log: Path) -> object:
    proc = subprocess.Popen(
        ["taskset", "-c", cores, *cmd],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not answer /ping within 120 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def row(
    name: str, batch: int, latencies: list[float], seconds: float, clients: int, cpu_ms: float
) -> float:
    """Print one line; return images/s (requests completed in the window x batch / window)."""
    rate = len(latencies) * batch / seconds
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"{name:<27} {batch:>5} {clients:>7} {rate:>10.0f} {statistics.median(ms):>8.2f} "
        f"{p99:>8.2f} {len(ms):>8} {cpu_ms:>10.3f}"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--server-cores", default="0", help="taskset list for server and direct")
    parser.add_argument("--client-cores", default="1", help="taskset list for the clients")
    parser.add_argument("--plain", action="store_true", help="also time `mlflow models serve`")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per row")
    parser.add_argument("--breakdown", action="store_true", help="time each piece in-process")
    parser.add_argument("--bodies", nargs="+", choices=list(TYPES), default=list(TYPES))
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, body, seconds, warmup, kind = args.client
        client(int(port), body, float(seconds), float(warmup), kind)
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from predict_latency import build_project

    threads = str(len(os.sched_getaffinity(0) & _cores(args.server_cores)) or 1)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        root = build_project(Path(tmp), ("train.epochs=1",))  # the default model: cnn
        import mlflow.pyfunc
        import numpy as np

        from deep_repro import data
        from tests.helpers import FIXTURE

        x, _ = data.load_idx_pair(FIXTURE, "t10k")
        uri = os.environ["MLFLOW_TRACKING_URI"]
        ref = "models:/fashion-mnist-classifier@champion"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DVC_",))},
            "MLFLOW_TRACKING_URI": uri,
            "OMP_NUM_THREADS": threads,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow runs `uvicorn`
        }
        bodies: dict[tuple[str, int], Path] = {}
        for batch in args.batches:
            for kind in args.bodies:
                bodies[kind, batch] = root / f"body-{batch}.{kind}"
                bodies[kind, batch].write_bytes(_body(kind, x[:batch]))
        print(
            f"server/direct on cores {args.server_cores} ({threads} thread(s)), "
            f"{args.clients} clients on cores {args.client_cores}, {args.seconds:g} s per row"
        )
        print(f"{'':<27} {'batch':>5} {'clients':>7} {'images/s':>10} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'requests':>8} {'CPU ms/img':>10}")  # fmt: skip

        servers = {
            "deep-repro serve": [str(BIN / "deep-repro"), "serve", "-m", ref, "-p", "{port}"],
        }
        if args.plain:
            servers["mlflow models serve"] = [
                str(BIN / "mlflow"), "models", "serve", "-m", ref, "-p", "{port}",
                "--env-manager", "local", "--workers", "1",
            ]  # fmt: skip
        procs, ports = [], {}
        try:
            for name, template in servers.items():
                ports[name] = port = free_port()
                cmd = [part.replace("{port}", str(port)) for part in template]
                log = root / f"server-{port}.log"
                procs.append(start_server(cmd, args.server_cores, env, port, log))
            # direct: the same pyfunc model, in this process, on the server's cores (the
            # servers sit idle meanwhile); rounds interleave direct and served runs, so the
            # load of a shared machine weighs on both alike
            import psutil
            import torch

            own = os.sched_getaffinity(0)
            model = mlflow.pyfunc.load_model(ref)
            lat: dict[tuple[str, int], list[float]] = {}
            cpu: dict[tuple[str, int], list[float]] = {}  # [CPU seconds, images]
            span = args.seconds / args.rounds

            def add(key: tuple[str, int], measured: tuple[list[float], int], s: float) -> None:
                lat.setdefault(key, []).extend(measured[0])
                total = cpu.setdefault(key, [0.0, 0.0])
                total[0] += s
                total[1] += measured[1] * key[1]

            for batch in args.batches:
                images = np.ascontiguousarray(x[:batch])
                for _ in range(args.rounds):
                    os.sched_setaffinity(0, _cores(args.server_cores))
                    torch.set_num_threads(int(threads))
                    before = time.process_time()
                    measured = direct(model, images, span, args.warmup)
                    add(("direct (in-process)", batch), measured, time.process_time() - before)
                    os.sched_setaffinity(0, own)
                    for proc, (name, port) in zip(procs, ports.items(), strict=True):
                        for kind in _kinds(name, args.bodies):
                            times = _cpu(psutil.Process(proc.pid))
                            measured = served(
                                port, bodies[kind, batch], args.clients, args.client_cores,
                                span, args.warmup,
                            )  # fmt: skip
                            spent = _cpu(psutil.Process(proc.pid)) - times
                            add((f"{name} ({kind})", batch), measured, spent)
            if args.breakdown:
                breakdown(model, x, args.batches, _cores(args.server_cores), int(threads))
        finally:
            for proc in procs:
                stop(proc)
        rates, cost = {}, {}
        for (name, batch), values in lat.items():
            clients = 1 if name.startswith("direct") else args.clients
            seconds, images_done = cpu[name, batch]
            cost[name, batch] = seconds * 1000 / images_done
            rates[name, batch] = row(name, batch, values, args.seconds, clients, cost[name, batch])
        for name in [f"{s} ({kind})" for s in servers for kind in _kinds(s, args.bodies)]:
            for batch in args.batches:
                ratio = rates[name, batch] / rates["direct (in-process)", batch]
                target = TARGETS.get(batch)
                verdict = "" if target is None else (
                    f"  (target >= {target}: {'met' if ratio >= target else 'NOT met'})"
                )  # fmt: skip
                print(f"{name}, batch {batch}: throughput ratio served/direct = {ratio:.2f}"
                      f"{verdict}; CPU per image direct/served = "
                      f"{cost['direct (in-process)', batch] / cost[name, batch]:.2f}")  # fmt: skip


def _kinds(server: str, kinds: list[str]) -> list[str]:
    """The body forms a server takes (`mlflow models serve` has no .npy)."""
    return kinds if server == "deep-repro serve" else [k for k in kinds if k == "json"]


def breakdown(model: object, x: object, batches: list[int], cores: set[int], threads: int) -> None:
    """Where a served request's time goes, piece by piece, in this process on the server's
    cores: MLflow's own request path (`scoring_server.invocations`) vs the fast path of
    `deep-repro serve` (`serving.server`), with the model's predict in both."""
    import torch

    from deep_repro.serving import server

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    schema = model.metadata.get_input_schema()  # type: ignore[attr-defined]
    guard = server.Guard(None, 1 << 30, 1 << 20, model)  # type: ignore[arg-type]

    print("in-process breakdown (ms per request):")
    for batch in batches:
        images = x[:batch]  # type: ignore[index]
        pieces = _pieces(model, schema, guard, images, max(5, 400 // batch))
        for name, seconds in pieces.items():
            print(f"  batch {batch:>3}  {name:<34} {seconds:8.2f}")


def _body(kind: str, images: Any) -> bytes:
    """A request body of uint8 images in one of the `TYPES` forms."""
    if kind == "json":
        return json.dumps({"inputs": images.tolist()}).encode()
    import io

    import numpy as np

    buffer = io.BytesIO()  # the compact form: uint8 images as np.save writes them
    np.save(buffer, images, allow_pickle=False)
    return buffer.getvalue()


def _pieces(model: Any, schema: Any, guard: Any, images: Any, n: int) -> dict[str, float]:
    import io

    import numpy as np
    from mlflow.pyfunc import scoring_server as mlflow_path

    from deep_repro.serving import wire

    body, npy = _body("json", images), _body("npy", images)
    values = wire.parse(body, "application/json")[1]["inputs"]
    array = np.array(values)
    raw = model.predict(array)
    pieces = {
        "json.loads (stdlib)": lambda: json.loads(body),
        "parse (serve: orjson)": lambda: wire.parse(body, "application/json"),
        "MLflow _parse_json_data": lambda: mlflow_path._parse_json_data(
            body, model.metadata, schema
        ),
        "np.array(list)": lambda: np.array(values),
        "model.predict": lambda: model.predict(array),
        "MLflow predictions_to_json": lambda: mlflow_path.predictions_to_json(raw, io.StringIO()),
        "serve: encode (wire.records_json)": lambda: wire.records_json(raw),
        "serve: predict + encode": lambda: guard._predict(values),
        "MLflow invocations (all)": lambda: mlflow_path.invocations(
            body, "application/json", model, schema
        ),
        "npy: serve reads (wire)": lambda: wire.npy_images(npy),
        "npy: serve predict + encode": lambda: guard._predict(wire.npy_images(npy)),
    }
    out = {}
    for name, f in pieces.items():
        f()
        start = time.perf_counter()
        for _ in range(n):
            f()
        out[name] = (time.perf_counter() - start) / n * 1000
    return out


def _cpu(proc: Any) -> float:
    """CPU seconds of a server and its children (`mlflow models serve` runs uvicorn in one)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def _cores(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":
    main()
