"""Checks of a valid config against this machine and this data, run by the `validate` stage.

DVC deletes a stage's outputs right before running it, so a value that a later stage would fail
on must be refused here, while the last good checkpoint and split still exist: a split that
would leave a class out of train or val, a model that cannot fit in memory, a CUDA device that is
not there, a tracking host that does not exist. They depend on the machine as much as on the
params, which is why `validate` is `always_changed` in dvc.yaml (its output stays constant, so
nothing downstream reruns because of it).

Cheap on purpose (every `dvc repro` runs it): no torch unless `train.device` names CUDA or
`train.precision` is bf16, one small label file read, one name lookup.
"""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import numpy as np

from deep_repro import machine
from deep_repro.config.schema import Config
from deep_repro.config.task import NUM_CLASSES
from deep_repro.errors import ConfigError
from deep_repro.files import file_digest
from deep_repro.pipeline import RAW_DIR

# The published training labels: 6,000 images of each class. Other data (the test fixture, a
# changed data.sha256) is counted from data/raw once downloaded.
OFFICIAL_TRAIN_LABELS = "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
OFFICIAL_CLASS_COUNTS = (6000,) * NUM_CLASSES
# The validation set chooses the epoch kept (early stopping) and judges the model against the
# champion: with fewer than 10 images of a class (100 in all) its accuracy moves 10 points per
# image, so a smaller one is refused like an empty one (which the split stage fails on).
MIN_VAL_PER_CLASS = 10
# Bytes per parameter while training: fp32 weights, gradients and AdamW's two moments; bytes
# per activation value: the fp32 output kept for backward and its gradient.
BYTES_PER_PARAM = 16
BYTES_PER_ACTIVATION = 8


def check(cfg: Config, root: Path) -> None:
    """Every machine- and data-dependent check; raise a one-line ConfigError naming the key."""
    check_split(cfg, root)
    check_memory(cfg)
    check_device(cfg.train.device)
    check_precision(cfg.train.device, cfg.train.precision)
    check_tracking_host(cfg.tracking.uri)


# --------------------------------------------------------------------------- conf/ -> params.yaml
# Where the validate stage remembers what it last saw (DVC's own scratch folder: never tracked).
COMPOSE_STATE = ".dvc/tmp/deep-repro/compose.json"


def check_composed(root: Path) -> None:
    """Refuse params.yaml left behind by an edit of conf/ (`dvc repro` does not recompose it).

    Stale means: the composition of conf/ changed since the last validate while params.yaml did
    not. A params.yaml edited by hand is fine (it changed); so is `dvc exp run`, which composes
    params.yaml itself from conf/ and its `-S` overrides (DVC_EXP_NAME is set in its stages).
    The first validate of a checkout only records what it sees."""
    import hashlib
    import json

    import yaml

    from deep_repro.config.schema import compose

    if os.environ.get("DVC_EXP_NAME") or not (root / "conf").is_dir():
        return
    params = root / "params.yaml"
    conf_files = {
        path.relative_to(root).as_posix(): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted((root / "conf").rglob("*.yaml"))
    }
    composed = yaml.safe_dump(compose(None, root / "conf"), sort_keys=False)
    now = {
        "composed": hashlib.md5(composed.encode()).hexdigest(),
        "params": hashlib.md5(params.read_bytes()).hexdigest() if params.is_file() else "",
        "conf": conf_files,
    }
    state = root / COMPOSE_STATE
    try:
        before = json.loads(state.read_text())
    except (OSError, ValueError):
        before = None
    changed: list[str] | None = None
    if isinstance(before, dict):
        if before.get("composed") != now["composed"] and before.get("params") == now["params"]:
            seen = before.get("conf")
            old: dict[str, str] = seen if isinstance(seen, dict) else {}
            changed = sorted(
                f for f in conf_files.keys() | old.keys() if conf_files.get(f) != old.get(f)
            )
    elif params.is_file() and params.read_text() != composed:
        changed = _edited_since_commit(root, "conf", "params.yaml")  # a fresh clone: ask git
    if changed is not None:
        raise ConfigError(
            f"config error: {', '.join(changed) or 'conf/'} changed but params.yaml was not "
            "recomposed (`dvc repro` reads params.yaml only): run `make params` (uv run python "
            "scripts/compose_params.py), or `uv run dvc exp run`, which composes it"
        )
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.{os.getpid()}")
    tmp.write_text(json.dumps(now, indent=1, sort_keys=True))
    tmp.replace(state)


def _edited_since_commit(root: Path, folder: str, product: str) -> list[str] | None:
    """Files of `folder` changed since the last commit while `product` was not (None if that is
    not so, or this is no git checkout)."""
    import subprocess

    def changed(path: str) -> list[str]:
        out = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", path],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise OSError(out.stderr)
        return out.stdout.split()

    try:
        edited, remade = changed(folder), changed(product)
    except (OSError, subprocess.SubprocessError):
        return None
    return edited if edited and not remade else None


# --------------------------------------------------------------------------- split sizes
def class_counts(cfg: Config, root: Path) -> tuple[int, ...] | None:
    """Training images per class of the data `data.sha256` names, or None while unknown."""
    expected = cfg.data.sha256["train-labels-idx1-ubyte"]
    path = root / RAW_DIR / "train-labels-idx1-ubyte.gz"
    try:
        # The file download would keep (it re-fetches one whose checksum differs).
        if path.is_file() and file_digest(path, "sha256", decompress=True) == expected:
            with gzip.open(path, "rb") as fh:
                labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)
            return tuple(np.bincount(labels, minlength=NUM_CLASSES).tolist())
    except (OSError, EOFError, ValueError):
        pass  # a damaged file: the download stage replaces it and reports what is wrong
    return OFFICIAL_CLASS_COUNTS if expected == OFFICIAL_TRAIN_LABELS else None


def split_sizes(
    counts: tuple[int, ...], val_size: float, subset: int | None
) -> tuple[list[int], list[int]]:
    """(train, val) images per class, exactly as `data.make_split` draws them."""
    total = sum(counts)
    if subset is not None and subset < total:
        fraction = subset / total  # data.stratified_subset -> stratified_indices
        counts = tuple(round(c * fraction) for c in counts)
    val = [round(c * val_size) for c in counts]
    return [c - v for c, v in zip(counts, val, strict=True)], val


def check_split(cfg: Config, root: Path) -> None:
    counts = class_counts(cfg, root)
    if counts is None:
        return  # unknown data: the split stage checks it once downloaded
    total = sum(counts)
    subset, val_size = cfg.data.subset, cfg.split.val_size
    if subset is not None and subset > total:
        raise ConfigError(
            f"config error: data.subset = {subset}: expected at most {total} "
            "(the number of training images), or null for all of them"
        )
    train, val = split_sizes(counts, val_size, subset)
    images = min(subset or total, total)
    what = f"split.val_size = {val_size}" + (f" (data.subset = {subset})" if subset else "")
    if min(val) < MIN_VAL_PER_CLASS:
        raise ConfigError(
            f"config error: {what}: expected a fraction that leaves every "
            f"class at least {MIN_VAL_PER_CLASS} validation images (of {images} images it "
            f"holds out {min(val)} of some class)"
        )
    if min(train) < 1:
        raise ConfigError(
            f"config error: {what}: expected a fraction that leaves every "
            f"class at least one training image (of {images} images it keeps {min(train)} of "
            "some class)"
        )


# --------------------------------------------------------------------------- memory
def _cgroup_v2_dirs(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> list[Path]:
    """This process's cgroup (v2) folder and its ancestors: a SLURM job or systemd scope sets
    its limit on a nested group, not on the root one."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return [root]
    rel = next((line.split("::", 1)[1] for line in lines if line.startswith("0::")), "/")
    here = root / rel.strip("/")
    return [here, *[p for p in here.parents if p.is_relative_to(root)]]


def _reclaimable(folder: Path) -> int:
    """Page cache the kernel drops before it refuses an allocation (counted in usage)."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> int:
    """Bytes this process can still allocate: free RAM, or less under a cgroup memory limit
    (the tightest of this process's cgroup and its ancestors)."""
    import psutil

    available = psutil.virtual_memory().available
    candidates = [(d / "memory.max", d / "memory.current", d) for d in _cgroup_v2_dirs()]
    v1 = Path("/sys/fs/cgroup/memory")
    candidates.append((v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1))
    for limit_file, usage_file, folder in candidates:
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max": no limit
            usage = max(0, usage - _reclaimable(folder))
            available = min(available, max(0, int(limit) - usage))
    return available


def training_bytes(cfg: Config) -> tuple[int, int]:
    """(parameters, estimated bytes to train one batch) of `cfg.model`, from the config alone."""
    params, activations = cfg.model.footprint()
    batch = min(cfg.train.batch_size, sum(OFFICIAL_CLASS_COUNTS))  # a batch holds at most N
    return params, params * BYTES_PER_PARAM + batch * activations * BYTES_PER_ACTIVATION


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def check_memory(cfg: Config, available: int | None = None) -> None:
    params, needed = training_bytes(cfg)
    available = available_memory() if available is None else available
    if needed > available:
        raise ConfigError(
            f"config error: model = {cfg.model.name} with {params:,} parameters needs about "
            f"{_size(needed)} to train (weights, gradients, optimizer state and the "
            f"activations of a batch of {cfg.train.batch_size}): expected at most the "
            f"{_size(available)} this machine has available; make the model or "
            "train.batch_size smaller"
        )


# --------------------------------------------------------------------------- device
def check_device(device: str) -> None:
    """A CUDA device must exist here; torch is imported only when one is asked for."""
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= found:
        raise ConfigError(
            f"config error: train.device = {device!r}: expected a device this machine has "
            f"({found} CUDA device(s) available); use 'auto' or 'cpu'"
        )


# --------------------------------------------------------------------------- precision
def check_precision(device: str, precision: str) -> None:
    """bf16 on a CPU that only emulates it is no error, but hours lost: measured 2.4x (AVX-512
    without BF16) to 12x (AVX2) slower per step than fp32 (benchmarks/README.md), with no
    byte-identity to gain (another CPU sums in another order anyway). Refuse it, naming the fix."""
    if precision != "bf16" or device.startswith("cuda"):
        return
    import torch

    if device == "auto" and torch.cuda.is_available():
        return
    if machine.native_bf16() is False:
        raise ConfigError(
            "config error: train.precision = 'bf16' on a CPU without native bf16 "
            f"({', '.join(machine.NATIVE_BF16)}): expected a CPU that has it (emulated, bf16 "
            "trains 2.4-12x slower than fp32); use -S train.precision=fp32"
        )


# --------------------------------------------------------------------------- tracking host
RESOLVE_TIMEOUT_S = 3.0


def check_tracking_host(uri: str | None) -> None:
    """A tracking host the resolver says does not exist is a typo: refuse it now, not after the
    checkpoint is gone. A host that exists but is down, or a resolver that cannot be reached
    (offline: EAI_AGAIN), keeps the spooling of deep_repro.tracking."""
    if uri is None or os.environ.get("MLFLOW_TRACKING_URI"):
        return  # the environment's URI wins over tracking.uri (deep_repro.tracking.store)
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return
    # A resolver that cannot be reached may take 10-20 s to say so: wait a few seconds at most
    # (in a daemon thread, which never delays the exit) and treat silence like an offline machine.
    import threading

    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    try:
        if outcome and outcome[0] is not None:
            raise outcome[0]
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
            return
        raise ConfigError(
            f"config error: tracking.uri = {uri!r}: expected a host that exists "
            f"({parts.hostname!r} does not resolve: {exc.strerror})"
        ) from None
    except (UnicodeError, OSError, ValueError):
        return
