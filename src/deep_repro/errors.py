"""Errors a user can act on, and the one place that turns them into a one-line exit."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class DeepReproError(Exception):
    """An error with a message meant for the user (one line, names what to fix)."""


class ConfigError(DeepReproError):
    """The composed configuration is invalid (unknown key, wrong type, out of range)."""


class DataError(DeepReproError):
    """Input data is missing, corrupt or does not match its checksum."""


class TrainingError(DeepReproError):
    """Training cannot start or diverged."""


class TrackingError(DeepReproError):
    """The MLflow tracking store is unreachable or inconsistent."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # MLflow and alembic are chatty at INFO on every store open; keep the stage logs readable.
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def entrypoint(func: F) -> F:
    """Run `func` as a program: user errors become `error: <message>` and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        setup_logging()
        try:
            return func(*args, **kwargs)
        except DeepReproError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
