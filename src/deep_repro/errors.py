"""Errors a user can act on, and the one place that turns them into a one-line exit."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class DeepReproError(Exception):
    """An error with a message meant for the user (one line, names what to fix)."""


class ConfigError(DeepReproError):
    """The composed configuration is invalid (unknown key, wrong type, out of range)."""


class UndeclaredParamError(ConfigError):
    """A stage read a config value that its `params` in dvc.yaml do not declare."""


class DataError(DeepReproError):
    """Input data is missing, corrupt or does not match its checksum."""


class TrainingError(DeepReproError):
    """Training cannot start or diverged."""


class ValidationError(DeepReproError):
    """The model does not meet the bar set by `evaluate.fail_below`."""


class TrackingError(DeepReproError):
    """The MLflow tracking store is unreachable or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, systemd and SLURM send). A KeyboardInterrupt, so that it unwinds
    exactly like Ctrl-C: every `except KeyboardInterrupt` that ends MLflow runs KILLED (stage
    and pipeline runs) handles it, instead of the process dying with its runs left RUNNING."""


_DUPLICATE_S = 2.0  # a second SIGTERM this soon is the same stop, delivered twice


def _on_sigterm(signum: int, frame: object) -> None:
    import time

    first = time.monotonic()

    def again(signum: int, frame: object) -> None:
        # A scheduler signals every process of a job and a wrapper may pass the same stop on
        # (`scancel` + the SLURM task forwarding it): that copy is ignored, so the clean-up
        # closes the runs. A later SIGTERM kills at once, as the default action would.
        if time.monotonic() - first > _DUPLICATE_S:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, again)
    raise Terminated()


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def scrub(text: str) -> str:
    """Remove credentials from every URL in `text` (`https://u:p@h` -> `https://***@h`)."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The one line of an exception a user is shown (credentials scrubbed, at most `limit`
    characters; the exception's type when it has no message): never a traceback."""
    text = str(exc).strip()
    return scrub(text.splitlines()[0])[:limit] if text else type(exc).__name__


class _RedactCredentials(logging.Filter):
    """Never let a password in a tracking/storage/mirror URI reach a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactCredentials())
    # MLflow and alembic are chatty at INFO on every store open; keep the stage logs readable.
    for noisy in ("alembic", "mlflow", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retry chatter, with full URLs


def entrypoint(func: F) -> F:
    """Run `func` as a program: user errors become `error: <message>` and exit status 2;
    Ctrl-C (SIGINT) becomes `interrupted` and exit status 130 (128 + SIGINT), SIGTERM
    `terminated` and 143 (128 + SIGTERM), both after the same clean-up, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        setup_logging()
        main = threading.current_thread() is threading.main_thread()  # signals go to main
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return func(*args, **kwargs)
        except DeepReproError as exc:
            print(f"error: {scrub(str(exc))}", file=sys.stderr)
            sys.exit(2)
        except Terminated:
            print("terminated", file=sys.stderr)
            sys.exit(143)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            if previous is not None:  # in-process callers (tests) get their handler back
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]  # same signature, minus the error paths
