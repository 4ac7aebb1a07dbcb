"""Provenance tags: git state, environment, and which DVC invocation a stage belongs to."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deep_repro.config.schema import Config, flatten, to_dict
from deep_repro.config.typecheck import Unchecked
from deep_repro.files import file_digest
from deep_repro.paths import repo_root, store_root
from deep_repro.pipeline import STAGES
from deep_repro.tracking.store import TAG_PREFIX, reproducing

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- provenance
def _git(args: list[str], cwd: Path) -> str | None:
    """git's stdout verbatim: porcelain lines start with a meaningful space (` M path`)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


# Files DVC itself rewrites (params.yaml is recomposed from conf/ by `dvc exp run`, dvc.lock
# after each stage, and the uncached metrics/plots outputs that git tracks): changes to them are
# recorded as params and content hashes; they do not make the *code* dirty.
_GENERATED = {"params.yaml", "dvc.lock"} | {out for s in STAGES.values() for out in s.outs}


def changed_paths(porcelain_z: str) -> list[str]:
    """Paths from `git status --porcelain -z` (`XY path\0`, renames followed by `orig\0`)."""
    entries = porcelain_z.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC" or entry[1] in "RC":
            i += 1  # the rename/copy source path
    return paths


def git_state(root: Path) -> dict[str, str]:
    commit = (_git(["rev-parse", "HEAD"], root) or "").strip() or "unknown"
    status = _git(["status", "--porcelain", "-z", "--untracked-files=no"], root)
    changed = [p for p in changed_paths(status or "") if p not in _GENERATED]
    return {
        "commit": commit,
        "dirty": "true" if changed else "false",
        "changed": ",".join(changed)[:4000],
    }


def _without_credentials(url: str) -> str:
    """`https://user:token@host/x.git` -> `https://host/x.git`; scp-style `git@host:x` is kept
    (`git` there is the ssh login, not a secret)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def git_remote(root: Path) -> str | None:
    """The URL of the `origin` remote (else the first remote), without credentials."""
    names = (_git(["remote"], root) or "").split()
    if not names:
        return None
    name = "origin" if "origin" in names else names[0]
    url = (_git(["remote", "get-url", name], root) or "").strip()
    return _without_credentials(url) if url else None


def repo_relative(path: str | Path, root: Path | None = None) -> str:
    """A path inside the repository as a POSIX path relative to its root (tags must not leak
    or depend on where a clone happens to live); paths outside it are returned unchanged."""
    root = (root or repo_root()).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix()
    try:
        return candidate.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def invocation_key() -> str:
    """Identify the DVC invocation this process belongs to (shared by all its stages).

    DVC runs each stage as `sh -c "<cmd>"` below the `dvc` process (for queued experiments, below
    the per-experiment `dvc exp exec-run` process), so the nearest `dvc` ancestor's pid plus its
    start time is unique per invocation and identical for all of its stages.
    """
    override = os.environ.get("DEEP_REPRO_INVOCATION")
    if override:
        return override
    import psutil

    host = socket.gethostname()
    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except (psutil.Error, OSError):
            continue
        head = [os.path.basename(c) for c in cmd[:3]]
        if "dvc" in head[:2] or head[1:3] == ["-m", "dvc"]:
            return f"{host}:{proc.pid}:{proc.create_time():.3f}"
    # Not under DVC (a stage script run by hand): a pipeline run of its own.
    return f"{host}:{me.pid}:{me.create_time():.3f}"


def run_user(configured: str | None = None) -> str:
    """Who runs this: `tracking.user`, else the MLflow login (`MLFLOW_TRACKING_USERNAME`, one
    account per student on a shared server), else the OS user."""
    if configured:
        return configured
    login = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if login:
        return login
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def pipeline_run_name(user: str, model: str, exp_name: str | None) -> str:
    """Readable and unique per invocation: `alice-cnn-curly-bear` (the DVC experiment name), or
    `alice-cnn-1128-171502-3f9a` for a plain `dvc repro`."""
    import time

    if not exp_name:
        exp_name = f"{time.strftime('%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    return f"{user}-{model}-{exp_name}"


# --------------------------------------------------------------------------- what a run used
# Config keys a trainer kind never reads (models.ModelSpec.trainer): a run logs what it used, so
# the runs table does not show a logreg with an optimizer, a schedule or epochs. The sklearn
# trainer (logreg.fit_logreg) reads model.*, seed and train.num_threads only.
_UNUSED_BY_TRAINER: dict[str, tuple[str, ...]] = {
    "sklearn": (
        "optimizer",
        "scheduler",
        "augment",
        "train.epochs",
        "train.batch_size",
        "train.patience",
        "train.label_smoothing",
        "train.ema_decay",
        "train.device",
        "train.precision",
        "train.deterministic",
        "train.channels_last",
    ),
}


def used_params(cfg: Config, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` (default: the whole flattened config) without the keys the model's trainer
    kind does not read."""
    flat = flatten(to_dict(cfg)) if params is None else params
    if isinstance(cfg.model, Unchecked):
        # A data stage checked no model and has no model code to ask which trainer it needs:
        # only the keys every trainer reads. The first stage that reads the model adds the rest
        # to the pipeline run (runs.get_or_create_pipeline_run).
        unused: tuple[str, ...] = tuple(k for keys in _UNUSED_BY_TRAINER.values() for k in keys)
    else:
        unused = _UNUSED_BY_TRAINER.get("torch" if cfg.is_torch_model else "sklearn", ())
    return {
        k: v for k, v in flat.items() if not any(k == u or k.startswith(u + ".") for u in unused)
    }


def pipeline_params(cfg: Config) -> dict[str, Any]:
    """The pipeline run's params: the config its stages used. `tune.*` only configures
    `deep-repro tune` (the study and trial runs record it), never a pipeline stage."""
    return {k: v for k, v in used_params(cfg).items() if not k.startswith("tune.")}


def source_tags(name: str) -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column): what started the run.

    Type LOCAL, as MLflow records any local script (JOB is for Databricks jobs: the UI then
    looks for job ids).
    """
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    return {MLFLOW_SOURCE_NAME: name, MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}


def pipeline_source(script: str) -> str:
    """The command a pipeline run stands for: DVC sets DVC_STAGE for every stage it runs (and
    DVC_EXP_NAME for experiments); a stage script run by hand is a pipeline of its own."""
    if os.environ.get("DVC_EXP_NAME"):
        return "dvc exp run"
    return "dvc repro" if os.environ.get("DVC_STAGE") else script


def environment_tags(cfg: Config) -> dict[str, str]:
    root = repo_root()
    git = git_state(root)
    uv_lock = root / "uv.lock"
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name, dist in (
        ("torch", "torch"),
        ("sklearn", "scikit-learn"),
        ("numpy", "numpy"),
        ("mlflow", "mlflow"),
        ("dvc", "dvc"),
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(dist)
    user = run_user(cfg.tracking.user)
    tags = {
        "mlflow.source.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.commit": git["commit"],
        f"{TAG_PREFIX}.git.dirty": git["dirty"],
        f"{TAG_PREFIX}.uv_lock_sha256": (
            file_digest(uv_lock, "sha256") if uv_lock.exists() else "missing"
        ),
        f"{TAG_PREFIX}.hostname": socket.gethostname(),
        f"{TAG_PREFIX}.user": user,
        "mlflow.user": user,
        f"{TAG_PREFIX}.seed": str(cfg.seed),
        f"{TAG_PREFIX}.model": cfg.model.name,
    }
    # The user's real repository: a queued experiment runs in a temporary copy under
    # .dvc/tmp/exps/ whose own git remotes are DVC's, not the one others can clone.
    remote = git_remote(store_root())
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
        tags[f"{TAG_PREFIX}.git.remote"] = remote
    if git["dirty"] == "true":
        tags[f"{TAG_PREFIX}.git.changed"] = git["changed"]
    for name, version in versions.items():
        tags[f"{TAG_PREFIX}.version.{name}"] = version
    torch = sys.modules.get("torch")
    if torch is not None:  # stages that compute (train/postprocess/evaluate) have torch loaded
        cuda = torch.cuda.is_available()
        tags[f"{TAG_PREFIX}.device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[f"{TAG_PREFIX}.dvc_exp_name"] = exp_name
    original = reproducing()
    if original:
        tags[f"{TAG_PREFIX}.reproduces"] = original
    tags.update(slurm_tags())
    return tags


# What SLURM sets in a job's environment, and the tag each becomes: a run of a cluster task
# names its job, array task and node (`deep-repro submit`; `scontrol show job ID`).
_SLURM = {
    "SLURM_JOB_ID": "job_id",
    "SLURM_ARRAY_JOB_ID": "array_job_id",
    "SLURM_ARRAY_TASK_ID": "array_task_id",
    "SLURM_CLUSTER_NAME": "cluster",
    "SLURMD_NODENAME": "node",
}


def slurm_tags() -> dict[str, str]:
    return {
        f"{TAG_PREFIX}.slurm.{tag}": os.environ[var]
        for var, tag in _SLURM.items()
        if var in os.environ
    }
