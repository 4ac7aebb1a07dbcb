"""Where and how deterministically training runs: seeds, thread count, device, precision.

One seed feeds python/numpy/torch; deterministic kernels and a fixed thread count make two runs
on one machine produce byte-identical checkpoints.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
import time

import numpy as np
import psutil
import torch

from deep_repro import machine
from deep_repro.config.schema import (
    TrainConfig,
)
from deep_repro.errors import TrainingError

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows have no affinity mask
        return os.cpu_count() or 1


def free_cores(interval: float = 0.3) -> int:
    """Cores not used by OTHER processes, measured over `interval` seconds; 1..usable_cores().

    Our own CPU time in the window is subtracted, so a process that already runs threads does
    not count itself as load. Rounded to the nearest core: background noise (a shell, a
    logger) does not cost a whole thread, one busy process does.
    """
    n = usable_cores()
    me = psutil.Process()
    psutil.cpu_percent(None)  # starts the system-wide window
    own_before = sum(me.cpu_times()[:2])
    start = time.perf_counter()
    time.sleep(interval)
    busy_pct = psutil.cpu_percent(None)  # mean over all CPUs of the machine since the start
    elapsed = time.perf_counter() - start
    own = (sum(me.cpu_times()[:2]) - own_before) / elapsed
    cpus = psutil.cpu_count() or n
    others = max(0.0, busy_pct / 100.0 * cpus - own)
    # `others` is counted on the whole machine; with an affinity mask it is an upper bound of
    # the load on our own CPUs, which errs towards fewer threads (never oversubscribes).
    return max(1, min(n, round(n - others)))


def resolve_num_threads(num_threads: int | str) -> int:
    """`train.num_threads`: an int is used as is; `auto` = free_cores() at this moment.

    `auto` gives up byte-identical results across runs (float reductions are split by thread
    count) for speed on a machine shared with other CPU-bound work.
    """
    if num_threads == "auto":
        chosen = free_cores()
        log.info("train.num_threads = auto: %d of %d cores free", chosen, usable_cores())
        return chosen
    return int(num_threads)


def seed_everything(
    seed: int, *, deterministic: bool = True, num_threads: int | str | None = None
) -> int:
    """Seed every RNG and fix kernels/threads; returns the torch thread count now in force."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(resolve_num_threads(num_threads))
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (must be set before first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        # Deterministic mode also NaN-fills every new tensor (20-35% of CPU time in a CNN
        # profile); nothing here reads uninitialised memory, so skip the fill.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # not in torch stubs
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.get_num_threads()


# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed tensor memory instead of returning it to the kernel.

    A training step allocates and frees the same activations (tens of MB) every step. glibc
    serves blocks above a threshold that it adapts as it goes (up to 32 MB) with their own
    `mmap`, unmapped on free, and gives the top of the heap back above another. Depending on
    how the heap happens to lie, a run can then map and zero ~70 MB of fresh pages every step
    (measured, 2 epochs of the default CNN: 2.4 M page faults and 75 s in one run, 0.27 M and
    67 s in another; with fixed thresholds 0.18 M every time). Fixed high thresholds keep the
    memory in the heap: the process keeps its peak, which every step reaches anyway. Changes
    no number (only where memory comes from). Process-wide, like the thread count; returns
    False where the C library is not glibc (then nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return False
    keep_mapped = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)
    keep_top = libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BELOW - 1)
    return bool(keep_mapped and keep_top)


def resolve_device(train: TrainConfig) -> torch.device:
    """`auto` -> cuda if available else cpu; an explicit CUDA request without CUDA is an error."""
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"train.device = {train.device!r} but CUDA is not available on "
                "this machine; use 'auto' or 'cpu'"
            )
        index = int(train.device.split(":")[1]) if ":" in train.device else 0
        if index >= torch.cuda.device_count():
            raise TrainingError(
                f"train.device = {train.device!r} but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(train.device)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (fast, no loss scaling needed); fp32 on CPU unless
    asked (`train.precision=bf16`: 1.5-1.9x faster steps on a 2-core EPYC with AVX512_BF16)."""
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        if device.type == "cpu" and machine.native_bf16() is False:
            log.warning(
                "train.precision = bf16 on a CPU without native bf16 (%s): emulated, 2.4-12x "
                "slower than fp32; use -S train.precision=fp32",
                ", ".join(machine.NATIVE_BF16),
            )
        return torch.bfloat16
    return None
