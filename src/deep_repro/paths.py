"""Where every artifact lives. All paths are absolute and anchored at the repository root.

Queued DVC experiments run in temporary copies under `.dvc/tmp/exps/`; DVC exports `DVC_ROOT`
there, and stores that must outlive the copy (MLflow, Optuna) hang off the *real* root returned
by `store_root()`.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The working copy the current stage runs in (cwd for DVC stages)."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return here


def store_root() -> Path:
    """The user's real repository, even inside a queued experiment's temporary copy."""
    root = repo_root()
    # A temp copy lives at <real root>/.dvc/tmp/exps/...; climb out of it.
    parts = root.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    env = os.environ.get("DVC_ROOT")
    if env and Path(env).exists() and ".dvc" not in Path(env).parts:
        return Path(env).resolve()
    return root
