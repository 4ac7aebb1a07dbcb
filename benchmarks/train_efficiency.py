"""Training efficiency: the training step's achieved GFLOP/s as a fraction of the matmul peak,
and throughput when another CPU-bound process shares the machine.

In one run, on the same threads:

* peak     - the best fp32 GEMM of torch's two libraries: `torch.mm` (MKL) and a 1x1
             convolution (oneDNN, the library of the step's convolutions), n = 1024, 2048
             and 4096, best of a few repeats before and after the step: 2mnk / t.
* FLOPs    - one real training step of the configured model (forward + backward at the
             configured batch), counted by `torch.utils.flop_counter.FlopCounterMode` (matmul and
             convolution FLOPs; elementwise ops such as BN, ReLU and AdamW count zero).
* achieved - the step body of `training.fit` (`device_batch` + `train_step`), median wall time
             of the timed steps after warm-up; FLOPs / time, split into forward and backward.

`--levers` times variants of the step side by side (same run, interleaved) to find what raises
the fraction; `--profile` prints torch.profiler's operator table of the step. `--contended`
starts ONE CPU-bound busy process and compares img/s idle with 2 threads, contended with 2
threads and contended with `train.num_threads: auto`.

    .venv/bin/python benchmarks/train_efficiency.py                      # peak, FLOPs, fraction
    .venv/bin/python benchmarks/train_efficiency.py --levers --contended --profile
    .venv/bin/python benchmarks/train_efficiency.py --override +experiment=best_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from deep_repro import config, data, training
from deep_repro.config.schema import Config
from deep_repro.models.registry import build_model
from deep_repro.training import device

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
FIXTURE = REPO / "tests/fixtures/fashion-mnist"
TARGET_FRACTION = 0.75  # issue 25: the default CNN step reaches >= 75% of the matmul peak
TARGET_CONTENDED = 0.60  # issue 14: contended img/s with `auto` >= 0.6x idle
WARMUP = 3
# A CPU-bound process that stops by itself even if this script is killed before `finally`.
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


# --------------------------------------------------------------------------- setup
def load_train() -> tuple[np.ndarray, np.ndarray]:
    source = REAL_DATA if (REAL_DATA / "train-images-idx3-ubyte.gz").exists() else FIXTURE
    return data.load_idx_pair(source, "train")


def make_config(args: argparse.Namespace, *extra: str) -> Config:
    overrides = [f"model={args.model}", "train.device=cpu", *args.override, *extra]
    return config.validate(config.compose(overrides, REPO / "conf"))


def gemm_peaks(sizes: Sequence[int], repeats: int) -> dict[str, float]:
    """Best fp32 GEMM GFLOP/s per library and size, at the current torch thread count.

    Two libraries multiply matrices in torch on x86: `torch.mm` calls MKL's sgemm, and the
    convolutions call oneDNN. On an AMD CPU they differ (measured on a 2-core AVX-512 EPYC:
    MKL 180-205, oneDNN 215-225 GFLOP/s), so a peak from `torch.mm` alone would flatter the
    step. oneDNN's GEMM is timed as a 1x1 convolution over a 64x64 channels_last map: the
    product of a (4096 x n) by an (n x n) matrix, through the very library the step uses."""
    peaks = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        x = torch.randn(1, n, 64, 64).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            mm_s = _best_s(functools.partial(torch.mm, a, b), repeats)
            conv_s = _best_s(functools.partial(F.conv2d, x, w), repeats)
        peaks[f"torch.mm (MKL)       n={n}"] = 2 * n**3 / mm_s
        peaks[f"1x1 conv (oneDNN)    n={n}"] = 2 * 64 * 64 * n * n / conv_s
    return {k: v / 1e9 for k, v in peaks.items()}


def _best_s(f: Callable[[], object], repeats: int) -> float:
    f()  # warm-up: page in, pick the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------- the real step
@dataclass
class StepTimes:
    step: list[float]  # whole step: batch + forward + backward + optim
    forward: list[float]
    backward: list[float]

    def median_ms(self, part: str = "step") -> float:
        return 1000 * statistics.median(getattr(self, part))


class Step:
    """`fit`'s step body on a fresh, seeded model: `device_batch` then `train_step`."""

    def __init__(self, cfg: Config, x: np.ndarray, y: np.ndarray, steps: int) -> None:
        training.seed_everything(cfg.seed, deterministic=cfg.train.deterministic)
        training.keep_freed_memory()  # as `fit` does
        self.cfg = cfg
        self.st = training.make_stepper(
            # room for a second warm-up (a compiled lever's) before the timed steps
            cfg,
            build_model(cfg.model),
            torch.device("cpu"),
            1,
            steps + 2 * WARMUP + 2,
        )
        self.st.model.train()
        self.xt, self.yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.bs = cfg.train.batch_size

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.yt), (self.bs,), generator=self.gen)
        return training.device_batch(self.st, self.xt, self.yt, idx, self.cfg.augment, self.gen)

    def flops(self) -> tuple[int, int]:
        """(forward, backward) FLOPs of one step, counted on this very model and batch."""
        xb, yb = self.batch()
        with FlopCounterMode(display=False) as fwd:
            loss = self.st.loss_fn(self.st.model(xb).float(), yb)
        self.st.opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        self.st.opt.zero_grad(set_to_none=True)
        return fwd.get_total_flops(), bwd.get_total_flops()

    def run(self, steps: int) -> StepTimes:
        times = StepTimes([], [], [])
        marks: list[float] = []

        def mark(_: str = "") -> None:
            marks.append(time.perf_counter())

        for i in range(WARMUP + steps):
            marks.clear()
            mark()
            xb, yb = self.batch()
            mark()
            training.train_step(self.st, xb, yb, on_phase=mark)
            if i >= WARMUP:
                times.step.append(marks[-1] - marks[0])
                times.forward.append(marks[2] - marks[1])
                times.backward.append(marks[3] - marks[2])
        return times


def layer_table(step: Step, peak: float, step_ms: float, repeats: int = 15) -> str:
    """Each convolution and linear layer of the model alone, forward and backward, on the
    shapes (and memory format) of a real batch: its GFLOP/s, and the step's ceiling if every
    other op (BN, ReLU, pooling, loss, optimizer, the batch) cost nothing."""
    shapes: dict[nn.Module, torch.Tensor] = {}
    layers = [m for m in step.st.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
        shapes.setdefault(module, inputs[0])  # (a hook that returns a value replaces the output)

    hooks = [m.register_forward_hook(keep) for m in layers]
    xb, _ = step.batch()
    with torch.no_grad():
        step.st.model(xb)
    for h in hooks:
        h.remove()
    lines, total_ms, total_flops = [], 0.0, 0
    for i, layer in enumerate(layers):
        x = torch.randn_like(shapes[layer]).requires_grad_(i > 0)  # same shape and strides
        with FlopCounterMode(display=False) as fc:
            out = layer(x)
        grad = torch.randn_like(out)
        with FlopCounterMode(display=False) as fcb:
            out.backward(grad)
        fwd_ms, bwd_ms = _layer_ms(layer, x, grad, repeats)
        f, b = fc.get_total_flops(), fcb.get_total_flops()
        total_ms += fwd_ms + bwd_ms
        total_flops += f + b
        name = f"{type(layer).__name__} {tuple(shapes[layer].shape)[1:]} -> {tuple(out.shape)[1:]}"
        lines.append(
            f"  {name:<44} fwd {fwd_ms:6.2f} ms {f / fwd_ms / 1e6:6.1f} GF/s | "
            f"bwd {bwd_ms:6.2f} ms {b / max(bwd_ms, 1e-6) / 1e6:6.1f} GF/s"
        )
    lines.append(
        f"  layers alone: {total_ms:.1f} ms of the {step_ms:.1f} ms step; were everything else "
        f"free, the step would reach {total_flops / total_ms / 1e6 / peak:.0%} of the peak"
    )
    return "\n".join(lines)


def _layer_ms(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Median forward ms, and backward ms (forward + backward less forward)."""

    def both() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    fwd = _median_ms(lambda: layer(x), repeats)
    return fwd, _median_ms(both, repeats) - fwd


def _median_ms(f: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_table(step: Step, steps: int, rows: int = 15) -> str:
    """Where a step's time goes: torch.profiler's operator table over `steps` real steps."""
    from torch.profiler import ProfilerActivity, profile

    step.st.sched = None  # the one-cycle schedule is sized for the timed steps only
    step.run(1)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            xb, yb = step.batch()
            training.train_step(step.st, xb, yb)
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# --------------------------------------------------------------------------- levers
@contextlib.contextmanager
def no_mkldnn() -> Iterator[None]:
    # flags() also re-sets oneDNN's TF32 switch, which warns on builds without Intel GPU support.
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
        warnings.simplefilter("ignore", UserWarning)
        yield


@dataclass(frozen=True)
class Lever:
    overrides: tuple[str, ...] = ()
    context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    # torch.compile (Inductor: generated C++ around oneDNN's convolutions) of the model; its
    # compile time is the first (warm-up) step, printed apart from the median step.
    compiled: bool = False


LEVERS: dict[str, Lever] = {
    "default": Lever(),
    # The default CNN before issue 14: two conv-BN-ReLU-pool blocks (BN/ReLU at full size).
    "old default cnn": Lever(("model.channels=[32,64]", "model.pool_before_bn=false")),
    "pool_before_bn=false": Lever(("model.pool_before_bn=false",)),
    "channels_last=false": Lever(("train.channels_last=false",)),
    "deterministic=false": Lever(("train.deterministic=false",)),
    "mkldnn off": Lever(context=no_mkldnn),
    "torch.compile": Lever(compiled=True),
    # bf16 autocast (convolutions and linear layers in bf16, fp32 weights and optimizer):
    # another model's numbers,
    # not the default's; fast only where the CPU multiplies bf16 natively (AVX512_BF16, AMX).
    "precision=bf16": Lever(("train.precision=bf16",)),
}


def measure_levers(args: argparse.Namespace, x: np.ndarray, y: np.ndarray, steps: int) -> None:
    """Each lever's median step, in interleaved rounds so that outside load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in LEVERS}
    flops: dict[str, int] = {}
    compile_s: list[float] = []
    for _ in range(args.rounds):
        for name, lever in LEVERS.items():
            with lever.context():
                step = Step(make_config(args, *lever.overrides), x, y, steps)
                flops.setdefault(name, sum(step.flops()))
                if lever.compiled:
                    step.st.model = torch.compile(step.st.model)  # type: ignore[assignment]
                    start = time.perf_counter()
                    step.run(0)  # the warm-up steps: tracing and C++ compilation
                    compile_s.append(time.perf_counter() - start)
                times[name] += step.run(steps).step
    training.seed_everything(0, deterministic=True)  # back to the pipeline's kernels
    base = statistics.median(times["default"])
    print("\nlevers (median step, same run, interleaved rounds; img/s relative to default):")
    for name, t in times.items():
        med = statistics.median(t)
        print(
            f"  {name:<22} {1000 * med:7.1f} ms/step  {flops[name] / med / 1e9:6.1f} GFLOP/s  "
            f"{base / med:5.2f}x default"
        )
    if compile_s:
        print(f"  (torch.compile: first steps {', '.join(f'{c:.1f}' for c in compile_s)} s)")


# --------------------------------------------------------------------------- contention
def img_per_s(args: argparse.Namespace, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    torch.set_num_threads(threads)
    cfg = make_config(args)
    step = Step(cfg, x, y, args.steps)
    return cfg.train.batch_size / statistics.median(step.run(args.steps).step)


def contended(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> tuple[int, float, float]:
    """With ONE busy process running: (threads `auto` picks, img/s with 2 threads, with auto)."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.busy_seconds)])
    try:
        time.sleep(0.3)  # interpreter start-up: the loop must spin before we measure
        auto = device.resolve_num_threads("auto")
        return auto, img_per_s(args, x, y, 2), img_per_s(args, x, y, auto)
    finally:
        busy.kill()
        busy.wait()
        time.sleep(0.3)


def measure_contention(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> None:
    """`--rounds` rounds of idle (2 threads, then 1) / contended (2 threads, then auto), and a
    last idle run: medians, so that a drift of the machine's speed hits both sides alike."""
    idle: list[float] = []
    idle_one: list[float] = []
    two: list[float] = []
    chosen: list[float] = []
    picks: list[int] = []
    for _ in range(args.rounds):
        idle.append(img_per_s(args, x, y, 2))
        idle_one.append(img_per_s(args, x, y, 1))
        auto, t, c = contended(args, x, y)
        picks.append(auto)
        two.append(t)
        chosen.append(c)
    idle.append(img_per_s(args, x, y, 2))
    base = statistics.median(idle)
    ratio = statistics.median(chosen) / base
    verdict = "met" if ratio >= TARGET_CONTENDED else "NOT met"
    runs = ", ".join(f"{v:.0f}" for v in idle)
    print(
        f"\ncontention: 1 busy process, {device.usable_cores()} usable cores, {args.rounds} rounds"
    )
    print(f"  idle,       2 threads : {base:8.0f} img/s (median of {runs})")
    print(
        f"  idle,       1 thread  : {statistics.median(idle_one):8.0f} img/s = "
        f"{statistics.median(idle_one) / base:.2f}x idle (what 1 free core can do)"
    )
    print(
        f"  contended,  2 threads : {statistics.median(two):8.0f} img/s = "
        f"{statistics.median(two) / base:.2f}x idle"
    )
    print(
        f"  contended, auto = {'/'.join(map(str, sorted(set(picks))))}   : "
        f"{statistics.median(chosen):8.0f} img/s = {ratio:.2f}x idle "
        f"(target >= {TARGET_CONTENDED}x: {verdict})"
    )


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cnn")
    p.add_argument("--images", type=int, default=3840, help="timed images per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3, help="GEMM repeats (best is kept)")
    p.add_argument("--levers", action="store_true", help="time step variants side by side")
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of --levers and --contended"
    )
    p.add_argument("--contended", action="store_true", help="also measure under 1 busy process")
    p.add_argument("--profile", action="store_true", help="operator table of 10 real steps")
    p.add_argument("--layers", action="store_true", help="each conv/linear layer timed alone")
    p.add_argument("--busy-seconds", type=float, default=120.0)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    args.steps = max(3, args.images // cfg.train.batch_size)
    x, y = load_train()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {device.usable_cores()} usable cores, {args.threads} threads, "
        f"model={args.model}, batch {cfg.train.batch_size}, {args.steps} timed steps"
    )
    step = Step(cfg, x, y, args.steps)
    fwd_flops, bwd_flops = step.flops()
    peak_before = gemm_peaks(args.sizes, args.repeats)
    times = step.run(args.steps)
    peak_after = gemm_peaks(args.sizes, args.repeats)
    # Best of before/after the step: the peak is a capability, load on a shared machine only
    # lowers it, and a lowered peak would flatter the fraction.
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    top = max(peak.values())
    mkl = max(v for k, v in peak.items() if k.startswith("torch.mm"))
    total = fwd_flops + bwd_flops
    step_s = times.median_ms() / 1000
    achieved = total / step_s / 1e9
    for name, g in peak.items():
        print(f"fp32 GEMM  {name}: {g:6.1f} GFLOP/s (best of {2 * args.repeats})")
    print(
        f"step FLOPs   {total / 1e9:.2f} GFLOP (forward {fwd_flops / 1e9:.2f}, backward "
        f"{bwd_flops / 1e9:.2f}); step {1000 * step_s:.1f} ms median = "
        f"{cfg.train.batch_size / step_s:.0f} img/s"
    )
    fwd_s, bwd_s = times.median_ms("forward") / 1000, times.median_ms("backward") / 1000
    print(
        f"  forward  {1000 * fwd_s:6.1f} ms  {fwd_flops / fwd_s / 1e9:6.1f} GFLOP/s = "
        f"{fwd_flops / fwd_s / 1e9 / top:.0%} of peak"
    )
    print(
        f"  backward {1000 * bwd_s:6.1f} ms  {bwd_flops / bwd_s / 1e9:6.1f} GFLOP/s = "
        f"{bwd_flops / bwd_s / 1e9 / top:.0%} of peak"
    )
    frac = achieved / top
    verdict = "met" if frac >= TARGET_FRACTION else "NOT met"
    if cfg.train.precision == "bf16":  # e.g. best_cpu: its convolutions multiply in bf16
        verdict = "n/a: a bf16 step, and the peak is fp32's"
    print(
        f"achieved {achieved:.1f} GFLOP/s = {frac:.0%} of the matmul peak {top:.1f} GFLOP/s "
        f"(the best GEMM above; whole step incl. batch + optimizer; target >= "
        f"{TARGET_FRACTION:.0%}: {verdict}) [{achieved / mkl:.0%} of torch.mm's alone]"
    )
    if args.layers:
        print(f"\neach layer alone (the step's shapes):\n{layer_table(step, top, 1000 * step_s)}")
    if args.profile:
        print(f"\nwhere the time goes (torch.profiler, 10 steps):\n{profile_table(step, 10)}")
    if args.levers:
        measure_levers(args, x, y, args.steps)
    if args.contended:
        measure_contention(args, x, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
