"""Cluster defaults: `cluster.yaml` at the repository root (optional), flags win.

Partition, time limit and the rest differ per cluster and per user, not per experiment, so they
live outside `conf/` and never reach params.yaml or dvc.lock: changing a partition reruns no stage.

    partition: gpu            # sbatch --partition
    time: "02:00:00"          # sbatch --time, per task
    cpus: 8                   # --cpus-per-task, and train.num_threads of each task
    mem: 16G                  # --mem
    gpus: 1                   # --gpus-per-task (0: a CPU-only job)
    account: my-lab           # --account
    qos: normal               # --qos
    constraint: avx512        # --constraint
    sbatch_args: ["--exclusive"]      # anything else, passed as written
    setup: ["module load cuda/12.4"]  # shell lines run on the node before the task
    scratch: /scratch/$USER   # where each task clones the commit (node-local is best)
    jobs_dir: .cluster        # job manifests, task states and logs (must be on the shared FS)
    cache: /shared/$USER/deep-repro   # venvs per uv.lock and git mirrors (the shared FS)
    git_remote: origin        # where tasks clone from and push their experiments to
    throttle: 4               # at most this many tasks at once (array %N)
    requeue: true             # near its time limit a task stops, saves what it finished, requeues
    warn_s: 120               # how long before the limit (SIGUSR1); its stages need time to stop
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deep_repro.errors import DeepReproError

SETTINGS_FILE = "cluster.yaml"


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    partition: str | None = None
    time: str = "01:00:00"
    cpus: int = Field(default=2, ge=1)
    mem: str | None = None
    gpus: int = Field(default=0, ge=0)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_args: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    scratch: str = "${TMPDIR:-/tmp}"
    jobs_dir: str = ".cluster"
    cache: str | None = None
    git_remote: str = "origin"
    throttle: int | None = Field(default=None, ge=1)
    requeue: bool = True
    warn_s: int = Field(default=120, ge=30)


def load(root: Path, path: Path | None = None) -> ClusterSettings:
    """The settings file (`--settings`, else `cluster.yaml` if present), validated whole."""
    path = path or root / SETTINGS_FILE
    if not path.exists():
        if path != root / SETTINGS_FILE:
            raise DeepReproError(f"{path}: not found")
        return ClusterSettings()
    try:
        body = yaml.safe_load(path.read_text()) or {}
        return ClusterSettings.model_validate(body)
    except yaml.YAMLError as exc:
        raise DeepReproError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise DeepReproError(f"{path}: {key}: {err['msg']}") from None
