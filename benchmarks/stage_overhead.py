"""Fixed start-up cost of one pipeline stage, before it does any work.

Every DVC stage is a fresh `python stages/<name>.py` process: it pays the interpreter, its
imports (torch for train/postprocess/evaluate, mlflow for every stage through `stage_run`), and
opening the MLflow store plus creating/closing its stage run. This script times each part in
fresh processes, repeated, and prints the medians side by side:

* `python -c pass`, `import deep_repro.config`, `import numpy`, `import torch`, `import mlflow`
* `import stages/<name>.py`: the module-level imports of a stage script (its `main()` not run)
* `tracking.connect` (first open in a process, of an *existing* sqlite store) and
  `stage_run` enter+exit (after that connect), measured inside a fresh process that runs in a
  throw-away git + DVC-like project with a fresh sqlite store; the store is created once first
  (reported separately) and the timed runs are subsequent opens.

    .venv/bin/python benchmarks/stage_overhead.py                 # ~30-50 s on 2 cores
    .venv/bin/python benchmarks/stage_overhead.py --repeats 5 --stages all --importtime
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = (
    "download",
    "preprocess",
    "split",
    "analyze",
    "train",
    "postprocess",
    "evaluate",
)
# The stage whose run is opened in the tracking measurement (two input files to look up).
TRACKED_STAGE = "split"


@dataclass
class Row:
    label: str
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    def cells(self) -> list[str]:
        s = self.seconds
        return [
            self.label,
            f"{statistics.median(s):.3f}",
            f"{min(s):.3f}",
            f"{max(s):.3f}",
            str(len(s)),
            self.note,
        ]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DEEP_REPRO_"))
    }
    env.update(extra)
    return env


def wall(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one process (start to exit) and its stdout; raises on failure."""
    proc, seconds, _ = run_timed(cmd, cwd, env)
    return seconds, proc.stdout


def run_timed(
    cmd: Sequence[str], cwd: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """The finished process, its wall seconds, and the `time.time()` at which it had exited."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, seconds, exited


# --------------------------------------------------------------------------- tracking (child)
def make_project(root: Path) -> None:
    """A throw-away project that looks like ours to `repo_root()`, git and `stage_run`."""
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    (root / "stages").mkdir()
    shutil.copy2(REPO / f"stages/{TRACKED_STAGE}.py", root / f"stages/{TRACKED_STAGE}.py")
    processed = root / "data/processed"
    processed.mkdir(parents=True)
    for name in ("train.npz", "test.npz"):  # the split stage's inputs (hashed, looked up)
        (processed / name).write_bytes(os.urandom(1 << 16))
    env = clean_env(
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
    )
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)


def child_tracking() -> None:
    """Runs in a fresh process (cwd = the throw-away project): prints timings as JSON.

    `clock_*` are `time.time()` stamps, comparable with the parent's, to split the process wall
    time into start-up (interpreter + this script), the timed parts, and exit (teardown)."""
    clock_start = time.time()
    t0 = time.perf_counter()
    import mlflow  # noqa: F401 - timed: connect() would import it

    from deep_repro import config, tracking

    t1 = time.perf_counter()
    cfg = config.load_config(Path.cwd() / "params.yaml")
    t2 = time.perf_counter()
    tracking.connect(tracking.tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    t3 = time.perf_counter()
    with tracking.stage_run(TRACKED_STAGE, cfg):
        t4 = time.perf_counter()
    t5 = time.perf_counter()
    print(
        json.dumps(
            {
                "import": t1 - t0,
                "load_config": t2 - t1,
                "connect": t3 - t2,
                "enter": t4 - t3,
                "exit": t5 - t4,
                "clock_start": clock_start,
                "clock_end": time.time(),
            }
        ),
        flush=True,
    )


def measure_tracking(repeats: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="stage-overhead-") as tmp:
        root = Path(tmp)
        make_project(root)
        env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-tracking"]
        first, out = wall(cmd, root, env)  # creates the store (schema migrations) + experiment
        created = json.loads(out)
        rows = {
            k: Row(label)
            for k, label in (
                ("process", "fresh process: connect + stage_run, total"),
                ("startup", "  of which interpreter start-up"),
                ("import", "  of which import mlflow + deep_repro.tracking"),
                ("connect", "  of which tracking.connect (existing store)"),
                ("stage_run", "  of which stage_run enter + exit"),
                ("teardown", "  of which interpreter exit (teardown)"),
            )
        }
        for _ in range(repeats):
            spawned = time.time()
            proc, seconds, exited = run_timed(cmd, root, env)
            t = json.loads(proc.stdout)
            rows["process"].seconds.append(seconds)
            rows["startup"].seconds.append(t["clock_start"] - spawned)
            rows["import"].seconds.append(t["import"])
            rows["connect"].seconds.append(t["connect"])
            rows["stage_run"].seconds.append(t["enter"] + t["exit"])
            rows["teardown"].seconds.append(exited - t["clock_end"])
        rows["connect"].note = "mostly importing mlflow's sqlalchemy store"
        rows["stage_run"].note = f"stage {TRACKED_STAGE!r}: git, hashes, 2 lookups, 2 runs"
        rows["teardown"].note = "module/GC finalisation after main() returned"
        create = Row(
            "tracking.connect creating the store (once)",
            [created["connect"]],
            f"whole process {first:.2f} s",
        )
        return [create, *rows.values()]


# --------------------------------------------------------------------------- imports
def measure_imports(repeats: int, stages: Sequence[str]) -> list[Row]:
    py = sys.executable
    cases: list[tuple[str, list[str], str]] = [
        ("python -c pass", [py, "-c", "pass"], "interpreter start-up"),
        ("import deep_repro.config", [py, "-c", "import deep_repro.config"], ""),
        ("import numpy", [py, "-c", "import numpy"], ""),
        ("import torch", [py, "-c", "import torch"], "train, postprocess, evaluate"),
        ("import mlflow", [py, "-c", "import mlflow"], "every stage (stage_run)"),
    ]
    loader = (
        "import importlib.util, sys; p = sys.argv[1]; "
        "s = importlib.util.spec_from_file_location('stage', p); "
        "s.loader.exec_module(importlib.util.module_from_spec(s))"
    )
    for stage in stages:
        cases.append(
            (
                f"import stages/{stage}.py",
                [py, "-c", loader, f"stages/{stage}.py"],
                "module-level imports, main() not run",
            )
        )
    rows = [Row(label, note=note) for label, _, note in cases]
    env = clean_env()
    for _ in range(repeats):  # interleaved: slow drifts of machine load hit every case alike
        for row, (_, cmd, _) in zip(rows, cases, strict=True):
            row.seconds.append(wall(cmd, REPO, env)[0])
    return rows


def importtime(module: str, top: int) -> str:
    """The `top` slowest direct imports below `module` (python -X importtime, cumulative)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=clean_env(),
    )
    entries = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        if depth == 1:  # direct imports of the module's own package tree / dependencies
            entries.append((int(parts[1]) / 1e6, name.strip()))
    entries.sort(reverse=True)
    return "\n".join(f"  {s:6.3f} s  {name}" for s, name in entries[:top])


# --------------------------------------------------------------------------- main
def table(rows: Sequence[Row]) -> str:
    header = ["", "median s", "min s", "max s", "n", "note"]
    cells = [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 5) else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*c) for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median shown)")
    p.add_argument(
        "--stages",
        nargs="+",
        default=["split", "train"],
        choices=[*ALL_STAGES, "all"],
        help="stage scripts whose imports are timed (default: split train)",
    )
    p.add_argument(
        "--importtime",
        action="store_true",
        help="also list the slowest direct imports of torch and mlflow",
    )
    p.add_argument("--child-tracking", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_tracking:
        child_tracking()
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    stages = ALL_STAGES if "all" in args.stages else tuple(args.stages)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"# python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs, load "
        f"average {load}; wall time of fresh processes, {args.repeats} runs each"
    )
    start = time.perf_counter()
    rows = measure_imports(args.repeats, stages) + measure_tracking(args.repeats)
    print(table(rows))
    if args.importtime:
        for module in ("mlflow", "torch"):
            print(f"\n# slowest direct imports of `import {module}` (cumulative, one run)")
            print(importtime(module, 8))
    print(f"\n# measured in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
