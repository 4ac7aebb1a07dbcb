"""Shared test fixtures: real Fashion-MNIST images (the committed subset), real git, DVC and
MLflow (sqlite in a tmp dir). Only the network is ever faked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from deep_repro import config, data

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests/fixtures/fashion-mnist"
VENV_BIN = Path(sys.executable).parent


def fixture_sha256() -> dict[str, str]:
    pairs = (line.split() for line in (FIXTURE / "SHA256SUMS").read_text().splitlines())
    return {name: digest for digest, name in pairs}


def fixture_overrides(**extra: object) -> list[str]:
    """Hydra overrides pointing the pipeline at the committed fixture, small and fast."""
    sums = fixture_sha256()
    overrides = [f"data.mirrors=[{FIXTURE.as_uri()}]",
                 *(f"data.sha256.{k}={v}" for k, v in sums.items()),
                 "train.epochs=2", "train.batch_size=64", "tune.epochs=2", "tune.n_trials=3"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return overrides


@pytest.fixture
def make_cfg() -> Callable[..., config.Config]:
    """Compose conf/ with fixture overrides (+ more), validated: `make_cfg("model=mlp")`."""

    def make(*overrides: str) -> config.Config:
        return config.validate(config.compose([*fixture_overrides(), *overrides], REPO / "conf"))

    return make


@pytest.fixture(scope="session")
def splits() -> data.Splits:
    """The fixture split exactly as the split stage would produce it (seed 42, val 10%)."""
    x_train, y_train = data.load_idx_pair(FIXTURE, "train")
    x_test, y_test = data.load_idx_pair(FIXTURE, "t10k")
    parts = data.make_split(x_train, y_train, val_size=0.1, seed=42, subset=None)
    return data.Splits(parts["x_train"], parts["y_train"], parts["x_val"], parts["y_val"],
                       x_test, y_test)


@pytest.fixture
def tracking_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of this checkout."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
        timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def project_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "DEEP_REPRO_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return env


def make_project(dest: Path, overrides: list[str] | None = None,
                 edits: dict[str, list[tuple[str, str]]] | None = None) -> Path:
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


# --------------------------------------------------------------------------- class services
# `scripts/services.sh start` runs PostgreSQL + a basic-auth `mlflow server`; its env file holds
# the URLs below. Tests marked `services` skip without them, except in CI, where that is a failure.
SERVICES_ENV = ("DEEP_REPRO_TEST_PG_URL", "DEEP_REPRO_TEST_MLFLOW_URL",
                "DEEP_REPRO_TEST_MLFLOW_ADMIN_USER", "DEEP_REPRO_TEST_MLFLOW_ADMIN_PASSWORD")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "services: needs PostgreSQL + MLflow server from "
                            "scripts/services.sh (skipped without them unless CI=true)")


@dataclass(frozen=True)
class Services:
    pg_url: str            # postgresql://user:password@127.0.0.1:port/optuna
    mlflow_url: str        # http://localhost:port (basic-auth app)
    admin_user: str
    admin_password: str

    def pg_database(self, name: str) -> str:
        return self.pg_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def services() -> Services:
    values = [os.environ.get(name) for name in SERVICES_ENV]
    if not all(values):
        missing = ", ".join(n for n, v in zip(SERVICES_ENV, values, strict=True) if not v)
        message = f"class services not running ({missing} unset): scripts/services.sh start"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Services(*values)  # type: ignore[arg-type]


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, services: Services) -> Callable[[str, str], None]:
    """Point this process's MLflow client at the class server as one account."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    def login(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    login(services.admin_user, services.admin_password)
    return login
