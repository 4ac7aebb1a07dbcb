"""Plain helpers shared by the tests (fixtures are in conftest.py): the committed Fashion-MNIST
fixture, throw-away git+DVC copies of this project, and the static import graph of the stages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deep_repro import config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/fashion-mnist"
VENV_BIN = Path(sys.executable).parent


def fixture_sha256() -> dict[str, str]:
    pairs = (line.split() for line in (FIXTURE / "SHA256SUMS").read_text().splitlines())
    return {name: digest for digest, name in pairs}


def fixture_overrides(**extra: object) -> list[str]:
    """Hydra overrides pointing the pipeline at the committed fixture, small and fast."""
    sums = fixture_sha256()
    overrides = [
        f"data.mirrors=[{FIXTURE.as_uri()}]",
        *(f"data.sha256.{k}={v}" for k, v in sums.items()),
        "train.epochs=2",
        "train.batch_size=64",
        "tune.epochs=2",
        "tune.n_trials=3",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return overrides


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of this checkout."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: int = 900,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def project_env(root: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DEEP_REPRO_"))
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return env


def make_project(
    dest: Path,
    overrides: list[str] | None = None,
    edits: dict[str, list[tuple[str, str]]] | None = None,
) -> Path:
    """A fresh git+DVC copy of this project whose conf/ points at the fixture data.

    conf/config.yaml itself is edited (not just params.yaml) because `dvc exp run` recomposes
    params.yaml from conf/.
    """
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for rel, replacements in (edits or {}).items():
        text = (dest / rel).read_text()
        for old, new in replacements:
            assert old in text, (rel, old)
            text = text.replace(old, new)
        (dest / rel).write_text(text)
    cfg_path = dest / "conf/config.yaml"
    text = cfg_path.read_text()
    for name, digest in fixture_sha256().items():
        text = re.sub(rf"({name}: )[0-9a-f]{{64}}", rf"\g<1>{digest}", text)
    text = re.sub(r"  mirrors:\n(    - .*\n)+", f"  mirrors:\n    - {FIXTURE.as_uri()}\n", text)
    cfg_path.write_text(text)
    composed = config.compose(overrides or [], dest / "conf")
    import yaml

    (dest / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    env = project_env(dest)
    if not (dest / ".git").exists():
        run(["git", "init", "-q"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "fixture project"], dest, env)
    return dest


# --------------------------------------------------------------------------- stage import graph
from deep_repro.dvc_yaml import (  # noqa: E402  (the one implementation, shared with the generator)
    is_exempt,
    module_file,
    stage_modules,
)


def code_dep_problems(root: Path, exempt: dict[str, str]) -> list[str]:
    """Compare each stage's imports with the `src/` deps dvc.yaml lists for it.

    A `src/` dep may be a file or a directory (covering every file under it, e.g. a package).
    Returns one line per problem: an imported, non-exempt module that is not a dep, or a dep that
    the stage never imports.
    """
    import yaml

    problems = []
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = stage["cmd"].split()[-1]
        deps = [next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps", [])]
        code_deps = {d.rstrip("/") for d in deps if d.startswith("src/")}
        needed = {}
        for module in stage_modules(root, script, exempt):
            if not is_exempt(module, exempt):
                path = module_file(root, module)
                assert path is not None
                needed[module] = path.relative_to(root).as_posix()
        used: set[str] = set()
        for module, path in sorted(needed.items()):
            cover = next((d for d in code_deps if path == d or path.startswith(d + "/")), None)
            if cover is None:
                problems.append(
                    f"stage {name!r} imports {module} but dvc.yaml does not list "
                    f"{path} in its deps (add it, or exempt the module in "
                    "deep_repro.pipeline.CODE_DEPS_EXEMPT with the reason)"
                )
            else:
                used.add(cover)
        for dep in sorted(code_deps - used):
            problems.append(f"stage {name!r} lists {dep} in its deps but never imports it")
    return problems


def copy_project(src: Path, dest: Path) -> Path:
    """An independent copy of a test project (git, DVC cache, MLflow store), so each test can
    start from a prepared state and change it freely.

    MLflow stores absolute artifact locations; they are moved to the copy so that its runs
    and artifacts never touch the original.
    """
    import sqlite3

    shutil.copytree(src, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            for table in tables:
                for column in conn.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                        conn.execute(
                            f'UPDATE "{table}" SET "{column[1]}" = REPLACE('
                            f'"{column[1]}", ?, ?) WHERE instr("{column[1]}", ?) > 0',
                            (str(src), str(dest), str(src)),
                        )
    return dest


@dataclass(frozen=True)
class Services:
    pg_url: str  # postgresql://class_studies:password@127.0.0.1:port/optuna: the students' login
    mlflow_url: str  # http://localhost:port (basic-auth app)
    admin_user: str
    admin_password: str
    pg_server_url: str  # postgresql://mlflow_server:password@.../mlflow: the server's own login

    def pg_database(self, name: str) -> str:
        """The MLflow server's login on database `name` (mlflow, mlflow_auth)."""
        return self.pg_server_url.rsplit("/", 1)[0] + f"/{name}"


def evidence(accuracy: float, n: int = 1000, offset: int = 0, images: str = "val") -> Any:
    """The validation predictions of a model with this accuracy on `n` images (the gate's
    evidence). With the same `offset`, the better model is right on every image the worse one is
    (any gap of >= 6 of 1,000 images is significant); different offsets make them disagree both
    ways (noise)."""
    import numpy as np

    from deep_repro import evaluation

    labels = np.arange(n) % 10
    correct = (np.arange(n) + offset) % n < round(accuracy * n)
    predicted = np.where(correct, labels, (labels + 1) % 10)
    return evaluation.Predictions({"val": evaluation.split_predictions(images, labels, predicted)})


def pipeline_run(client: Any, exp_id: str, user: str, acc: float, *, evaluated: bool = True) -> str:
    """A pipeline run with the val/test numbers its own evaluate stage run logged (or, with
    `evaluated=False`, a run made by hand that merely claims them)."""
    from deep_repro import tracking

    run = client.create_run(
        exp_id, tags={tracking.TAG_KIND: "pipeline", f"{tracking.TAG_PREFIX}.user": user}
    )
    run_id = run.info.run_id
    metrics = {"val_accuracy": acc, "test_accuracy": 1.5 - acc}  # test never ranks
    if evaluated:
        stage = client.create_run(
            exp_id,
            tags={
                tracking.TAG_KIND: "stage",
                tracking.TAG_STAGE: "evaluate",
                "mlflow.parentRunId": run_id,
            },
        ).info.run_id
        for key, value in metrics.items():
            client.log_metric(stage, key, value)
        client.set_terminated(stage)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return str(run_id)
