"""An isolated copy of a recorded commit with the environment its `uv.lock` describes.

Shared by everything that runs the project somewhere other than the user's checkout: a
reproduction (`deep-repro reproduce`) and a cluster task each work in a clone of one commit,
never in the user's working tree (no shared DVC lock, no stray edits). Environments are keyed by
the sha256 of `uv.lock` and reused: commits with the same lock file share one venv (torch alone
is gigabytes), built once under a file lock so parallel builders wait instead of racing.

Layout of the cache (`$DEEP_REPRO_CACHE`, else `$XDG_CACHE_HOME/deep-repro`, else
`~/.cache/deep-repro`):

    git/<sha256(remote url)[:16]>.git   a bare mirror of the recorded remote (heads, tags and
                                        DVC experiment refs), fetched before each use
    venvs/<sha256(uv.lock)[:16]>/       `uv sync --locked` of that lock file (third-party
                                        packages only: the project's code comes from the clone)
    workspaces/<name>/                  one clone per reproduction or task
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from deep_repro.errors import DeepReproError, first_line

log = logging.getLogger(__name__)

CACHE_ENV = "DEEP_REPRO_CACHE"
# Refs a reproduction may need: branches, tags, and DVC experiments (`dvc exp push` writes
# refs/exps/...; a plain clone does not fetch them).
REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+refs/exps/*:refs/exps/*")
_COMPLETE = ".deep-repro-complete"  # written last: a venv without it is a broken build


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deep-repro"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _git(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"  # a remote that wants a password fails, never waits
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeepReproError(f"git {args[0]}: {first_line(exc)}") from None


def mirror(remote: str, cache: Path | None = None) -> Path:
    """A bare mirror of `remote` in the cache, fetched now (created on first use)."""
    from filelock import FileLock

    root = (cache or cache_dir()) / "git"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{_key(remote)}.git"
    with FileLock(str(path) + ".lock"):
        if not (path / "HEAD").exists():
            done = _git(["init", "--bare", "-q", str(path)], root)
            if done.returncode != 0:
                raise DeepReproError(f"cannot create a git mirror at {path}: {done.stderr}")
        fetched = _git(["fetch", "-q", "--prune", remote, *REFSPECS], path)
        if fetched.returncode != 0:
            why = (fetched.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise DeepReproError(f"cannot fetch the recorded git remote {remote}: {why}")
    return path


def has_commit(repo: Path, commit: str) -> bool:
    return _git(["cat-file", "-e", f"{commit}^{{commit}}"], repo).returncode == 0


def checkout(source: Path, commit: str, dest: Path, remote: str | None = None) -> Path:
    """A fresh clone of `source` at `commit` in `dest` (replaced if it exists), whose `origin`
    is `remote` (what provenance records), not the cache's mirror."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for args in (
        ["clone", "-q", "--no-checkout", str(source), str(dest)],
        ["-C", str(dest), "checkout", "-q", "--detach", commit],
    ):
        done = _git(args, dest.parent)
        if done.returncode != 0:
            raise DeepReproError(f"git {args[0]} of {commit[:12]} failed: {done.stderr.strip()}")
    if remote:
        _git(["remote", "set-url", "origin", remote], dest)
    return dest


def ensure_venv(project: Path, cache: Path | None = None) -> Path:
    """The venv for `project`'s uv.lock: reused when one was built from the same bytes, else
    built now with `uv sync --locked` (third-party packages and all extras; no dev tools)."""
    from filelock import FileLock

    lock_file = project / "uv.lock"
    if not lock_file.is_file():
        raise DeepReproError(f"{lock_file.name} missing at the recorded commit: no locked env")
    digest = hashlib.sha256(lock_file.read_bytes()).hexdigest()
    root = (cache or cache_dir()) / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    venv = root / digest[:16]
    with FileLock(str(venv) + ".lock"):
        if (venv / _COMPLETE).is_file():
            log.info("environment: reusing %s (uv.lock sha256 %s)", venv, digest[:12])
            return venv
        uv = shutil.which("uv")
        if uv is None:
            raise DeepReproError("uv not found on PATH: install it (`pip install uv`)")
        shutil.rmtree(venv, ignore_errors=True)  # a build that died half-way
        log.info("environment: building %s from uv.lock (sha256 %s)", venv, digest[:12])
        env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(venv))
        env.pop("VIRTUAL_ENV", None)
        done = subprocess.run(
            [uv, "sync", "--locked", "--no-install-project", "--no-default-groups", "--all-extras"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeepReproError(f"uv sync --locked failed for {project.name}: {tail}")
        (venv / _COMPLETE).write_text(digest + "\n")
    return venv


def project_env(project: Path, venv: Path, **extra: str) -> dict[str, str]:
    """Environment variables for running the project in `project` with `venv`: its code from
    the clone (PYTHONPATH), nothing inherited that would point a stage at the user's checkout,
    store or DVC experiment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "DEEP_REPRO_", "VIRTUAL_ENV", "UV_"))
    }
    # The venv is the cache's own: let Python write bytecode there on first import (one
    # compile, then every stage starts fast), whatever this shell says for the user's venv.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    src = str(project / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env
