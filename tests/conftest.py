"""Shared test fixtures: real Fashion-MNIST images (the committed subset), real git, DVC and
MLflow (sqlite in a tmp dir). Only the network is ever faked. Plain helper functions live in
tests/helpers.py; this file holds fixtures only."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from deep_repro import config, data, models  # noqa: F401  (models: registers `model` options)

from .helpers import FIXTURE, REPO, Services, fixture_overrides


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
    return data.Splits(
        parts["x_train"], parts["y_train"], parts["x_val"], parts["y_val"], x_test, y_test
    )


@pytest.fixture
def tracking_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


@pytest.fixture(autouse=True)
def _no_leaked_prediction_log_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sets/clears the prediction-log variables of its own process; in-process CLI calls
    in tests must not leak them into the next test (set-then-delete restores "unset" too)."""
    for name in (
        "DEEP_REPRO_PREDICTION_LOG",
        "DEEP_REPRO_PREDICTION_LOG_SAMPLE",
        "DEEP_REPRO_PREDICTION_LOG_MODEL",
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


# --------------------------------------------------------------------------- class services
# `scripts/services.sh start` runs PostgreSQL + a basic-auth `mlflow server`; its env file holds
# the URLs below. Tests marked `services` skip without them, except in CI, where that is a failure.
SERVICES_ENV = (
    "DEEP_REPRO_TEST_PG_URL",
    "DEEP_REPRO_TEST_MLFLOW_URL",
    "DEEP_REPRO_TEST_MLFLOW_ADMIN_USER",
    "DEEP_REPRO_TEST_MLFLOW_ADMIN_PASSWORD",
    "DEEP_REPRO_TEST_PG_SERVER_URL",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "services: needs PostgreSQL + MLflow server from "
        "scripts/services.sh (skipped without them unless CI=true)",
    )
    config.addinivalue_line(
        "markers",
        "slurm: needs the single-node SLURM cluster of scripts/slurm.sh (skipped without it "
        "unless CI=true)",
    )


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


@pytest.fixture(scope="session")
def slurm() -> str:
    """The SLURM_CONF of the cluster `scripts/slurm.sh start` runs (slurmctld + slurmd)."""
    conf = os.environ.get("SLURM_CONF", "")
    if not conf or not Path(conf).is_file():
        message = "SLURM not running (SLURM_CONF unset): scripts/slurm.sh start, as root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return conf


@pytest.fixture(scope="session")
def env_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DEEP_REPRO_CACHE (git mirrors, one venv per uv.lock) for every test that runs the
    project in a clean clone (reproduce, cluster tasks): the venv is built once per session."""
    return tmp_path_factory.getbasetemp() / "deep-repro-cache"
