"""Training throughput: our on-device batch loop vs the conventional torchvision/DataLoader loop.

Both loops train the same model (same config, same initial weights, same optimizer, scheduler,
loss, batch size, thread count, precision and memory format) on the same uint8 images; they
differ only in how a batch is produced and in per-step bookkeeping:

* ours      - `deep_repro.training`: the split lives on the device as one uint8 tensor, a batch
              is an index into it, augmented (`augment_batch`) and normalised (`normalise`) as one
              tensor. The step body is the one of `training.fit` (same building blocks, same order).
* reference - torchvision's own `FashionMNIST.__getitem__` (uint8 -> PIL image -> `transform`)
              with `RandomCrop(28, padding)` + `RandomHorizontalFlip` + `ToTensor` + `Normalize`,
              batched by `torch.utils.data.DataLoader(shuffle=True, num_workers=W)`.

Augmentation follows `--augment` for *both* loops (default `light`, the pipeline's default).
Measurements are interleaved (ours, reference, reference, ours, ...) so that load from other
processes on a shared machine hits both loops alike; warm-up steps are excluded.

    .venv/bin/python benchmarks/train_throughput.py                     # mlp + cnn, table
    .venv/bin/python benchmarks/train_throughput.py --models cnn --images 6400 --profile
    .venv/bin/python benchmarks/train_throughput.py --time-to-accuracy 0.94   # GPU: resnet TTA
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import FashionMNIST

from deep_repro import config, data, training
from deep_repro.config.schema import AugmentConfig, Config, LightAugmentConfig
from deep_repro.config.task import PIXEL_MEAN, PIXEL_STD
from deep_repro.models.registry import MODELS, build_model, get_spec

log = logging.getLogger("train_throughput")

REPO = Path(__file__).resolve().parents[1]
# Every architecture `training.fit` trains (from the registry, so a new model is benchmarkable).
TORCH_MODELS = sorted(name for name, spec in MODELS.items() if spec.trainer == "torch")
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
FIXTURE = REPO / "tests/fixtures/fashion-mnist"
# Targets of the issue (2-core CPU): minimum ratio ours/reference.
TARGETS: dict[str, float] = {"mlp": 2.0, "cnn": 1.2}
# Training images per loop and model: the defaults run in ~30-45 s on 2 free cores.
DEFAULT_IMAGES: dict[str, int] = {"mlp": 25_600, "cnn": 12_800, "resnet": 2_560}
PHASES = ("data", "forward", "backward", "optim", "other")


# --------------------------------------------------------------------------- data and config
def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """Real Fashion-MNIST if installed, else the committed fixture subset (uint8 arrays)."""
    source = REAL_DATA if (REAL_DATA / "train-images-idx3-ubyte.gz").exists() else FIXTURE
    x_train, y_train = data.load_idx_pair(source, "train")
    x_test, y_test = data.load_idx_pair(source, "t10k")
    return x_train, y_train, x_test, y_test, source


def make_config(model: str, args: argparse.Namespace, *extra: str) -> Config:
    overrides = [
        f"model={model}",
        f"augment={args.augment}",
        f"train.device={args.device}",
        f"train.num_threads={args.threads}",
        *args.override,
        *extra,
    ]
    return config.validate(config.compose(overrides, REPO / "conf"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the two loops
@dataclass
class Phases:
    """Wall time per phase of a step (meaningful on CPU, where every op is synchronous)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    def ms_per_step(self, phase: str) -> float:
        return 1000 * self.seconds[phase] / max(1, self.steps)


class Loop:
    """One training loop: `step()` trains on one batch; `phases` accumulates its breakdown.

    Both loops run `fit`'s own code for everything but the batch: `training.make_stepper` (memory
    format, optimizer, schedule, loss) and `training.train_step` (forward, backward, step)."""

    name = ""

    def __init__(self, cfg: Config, model: nn.Module, total_steps: int) -> None:
        self.cfg = cfg
        self.device = training.resolve_device(cfg.train)
        # One "epoch" of exactly the steps this benchmark runs (OneCycleLR refuses extra steps).
        self.st = training.make_stepper(cfg, model, self.device, 1, total_steps)
        self.st.model.train()
        self.channels_last = self.st.channels_last
        self.batch_size = cfg.train.batch_size
        self.phases = Phases()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def bookkeeping(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        marks = [time.perf_counter()]
        xb, yb = self.batch()
        marks.append(time.perf_counter())
        loss, logits = training.train_step(
            self.st, xb, yb, on_phase=lambda _: marks.append(time.perf_counter())
        )
        self.bookkeeping(loss, logits, yb)
        marks.append(time.perf_counter())
        for phase, (t0, t1) in zip(PHASES, itertools.pairwise(marks), strict=True):
            self.phases.seconds[phase] += t1 - t0
        self.phases.steps += 1

    def run(self, steps: int) -> float:
        """Train `steps` batches; wall seconds (device work included)."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - start


class OursLoop(Loop):
    """`deep_repro.training.fit`'s epoch, built from its own functions (`device_batch`,
    `train_step`, `RunningTotals`), but run for a given number of steps rather than epochs."""

    name = "ours"

    def __init__(
        self, cfg: Config, model: nn.Module, total_steps: int, x: np.ndarray, y: np.ndarray
    ) -> None:
        super().__init__(cfg, model, total_steps)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed)
        self.xt = torch.from_numpy(x).to(self.device)
        self.yt = torch.from_numpy(y.astype(np.int64)).to(self.device)
        self.n = len(self.yt)
        self.steps_per_epoch = self.n // self.batch_size
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = self.steps_per_epoch  # -> a new permutation on the first batch
        self.totals = training.RunningTotals(self.device)
        self.check_every = 1 if self.device.type == "cpu" else 25

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos >= self.steps_per_epoch:
            self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
            self.pos = 0
        bs = self.batch_size
        idx = self.perm[self.pos * bs : (self.pos + 1) * bs]
        self.pos += 1
        return training.device_batch(self.st, self.xt, self.yt, idx, self.cfg.augment, self.gen)

    def bookkeeping(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        self.totals.add(loss, logits, yb)
        if self.totals.steps % self.check_every == 0:  # fit's divergence check (a device sync)
            self.totals.check_finite(1, self.st.lr)


class ArrayFashionMNIST(FashionMNIST):
    """torchvision's `FashionMNIST` (its own `__getitem__`: uint8 tensor -> PIL 'L' image ->
    transform), fed from in-memory arrays instead of IDX files under `root`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: T.Compose) -> None:
        self._arrays = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
        super().__init__(root="in-memory", train=True, transform=transform, download=False)

    def _check_legacy_exist(self) -> bool:
        return False

    def _check_exists(self) -> bool:
        return True

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._arrays


def reference_transform(aug: AugmentConfig) -> T.Compose:
    """The torchvision equivalent of `augment_batch` + `normalise`."""
    ops: list[Any] = []
    if isinstance(aug, LightAugmentConfig):
        if aug.crop_padding > 0:
            ops.append(T.RandomCrop(28, padding=aug.crop_padding))
        if aug.hflip:
            ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToTensor())
    # Erase to black, before Normalize.
    if isinstance(aug, LightAugmentConfig) and aug.random_erasing > 0:
        ops.append(T.RandomErasing(p=aug.random_erasing, value=0))
    ops.append(T.Normalize((PIXEL_MEAN,), (PIXEL_STD,)))
    return T.Compose(ops)


class ReferenceLoop(Loop):
    """The conventional loop: Dataset + transforms + DataLoader, `loss.item()` every step."""

    name = "reference"

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        total_steps: int,
        x: np.ndarray,
        y: np.ndarray,
        workers: int,
    ) -> None:
        super().__init__(cfg, model, total_steps)
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        self.loader = DataLoader(
            ArrayFashionMNIST(x, y, reference_transform(cfg.augment)),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=gen,
        )
        self.it: Iterator[Any] = iter(self.loader)
        self.running = 0.0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            xb, yb = next(self.it)
        except StopIteration:  # next epoch
            self.it = iter(self.loader)
            xb, yb = next(self.it)
        xb = xb.to(self.device, non_blocking=True)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb.to(self.device, non_blocking=True)

    def bookkeeping(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None:
        self.running += loss.item()


# --------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    model: str
    images: int
    seconds: dict[str, float]
    phases: dict[str, Phases]
    fit_rate: float | None = None

    def rate(self, loop: str) -> float:
        return self.images / self.seconds[loop]

    @property
    def ratio(self) -> float:
        return self.rate("ours") / self.rate("reference")


def measure(model_name: str, args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> Measurement:
    cfg = make_config(model_name, args)
    tc = cfg.train
    training.seed_everything(cfg.seed, deterministic=tc.deterministic, num_threads=tc.num_threads)
    if args.no_fill_uninitialized_memory:  # what-if: a proposed change to seed_everything
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    init = build_model(cfg.model).state_dict()  # one initialisation, copied into both loops

    def fresh_model() -> nn.Module:
        model = build_model(cfg.model)
        model.load_state_dict(copy.deepcopy(init))
        return model

    images = args.images or DEFAULT_IMAGES.get(model_name, 12_800)
    steps = max(args.rounds, images // tc.batch_size)
    per_round = [steps // args.rounds + (r < steps % args.rounds) for r in range(args.rounds)]
    total = args.warmup + steps + (args.profile_steps if args.profile else 0)
    loops: dict[str, Loop] = {
        "ours": OursLoop(cfg, fresh_model(), total, x, y),
        "reference": ReferenceLoop(cfg, fresh_model(), total, x, y, args.workers),
    }
    log.info(
        "%s: %d warm-up + %d measured steps of %d images per loop, %d rounds",
        model_name,
        args.warmup,
        steps,
        tc.batch_size,
        args.rounds,
    )
    for loop in loops.values():
        loop.run(args.warmup)
        loop.phases.reset()
    seconds = dict.fromkeys(loops, 0.0)
    for r, n in enumerate(per_round):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        for name in order:
            seconds[name] += loops[name].run(n)
    if args.profile:
        profile(loops["ours"], args.profile_steps)
    fit_rate = check_fit(cfg, args, x, y, steps) if args.check_fit else None
    return Measurement(
        model_name,
        steps * tc.batch_size,
        seconds,
        {k: v.phases for k, v in loops.items()},
        fit_rate,
    )


def check_fit(
    cfg: Config, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, steps: int
) -> float:
    """img/s of `training.fit` itself: one epoch over as many images as the loops measured
    (+ the warm-up), validation on 1,024 images. Setup, warm-up and validation are included,
    so this is a lower bound of the loop's rate; it shows that `OursLoop` is what fit does."""
    n = (args.warmup + steps) * cfg.train.batch_size
    start = time.perf_counter()
    training.fit(cfg, x[:n], y[:n], x[-1024:], y[-1024:], epochs=1, progress=False)
    return n / (time.perf_counter() - start)


def profile(loop: Loop, steps: int) -> None:
    """torch.profiler operator table of a few steps of our loop."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if loop.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        loop.run(steps)
    sort = "self_device_time_total" if loop.device.type == "cuda" else "self_cpu_time_total"
    print(f"\n# torch.profiler, ours, {loop.cfg.model.name}, {steps} steps (sorted by {sort})")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40))


# --------------------------------------------------------------------------- reporting
def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    out = [line.format(*header), "  ".join("-" * w for w in widths)]
    out += [line.format(*row) for row in rows]
    return "\n".join(out)


def environment(args: argparse.Namespace, source: Path, device: torch.device) -> str:
    loadavg = os.getloadavg()
    load = " ".join(f"{v:.2f}" for v in loadavg)
    cpus = os.cpu_count() or 1
    lines = [
        f"# torch {torch.__version__}, torchvision {torchvision.__version__}, python "
        f"{platform.python_version()}, device {device}, threads {args.threads}, {cpus} CPUs, "
        f"load average {load}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        f"# data: {source}; augment={args.augment} (both loops); reference DataLoader "
        f"num_workers={args.workers}; warm-up {args.warmup} steps/loop excluded; "
        f"{args.rounds} interleaved rounds; fill_uninitialized_memory="
        f"{not args.no_fill_uninitialized_memory}",
    ]
    if args.workers > 0 and args.rounds > 1:
        lines.append(
            "# note: between rounds the reference's workers prefetch up to "
            "2 x num_workers batches for free; use --rounds 1 with --workers"
        )
    if device.type == "cpu" and loadavg[0] > 0.5 and args.threads > 1:
        lines.append(
            "# note: other processes already use the CPUs; with OpenMP's default "
            "spin-waiting, multi-threaded torch ops then slow down badly "
            "(see --omp-wait-policy)"
        )
    return "\n".join(lines)


def report(results: Sequence[Measurement], device: torch.device) -> None:
    rows = []
    for m in results:
        target = TARGETS.get(m.model)
        met = "-" if target is None else ("yes" if m.ratio >= target else "NO")
        rows.append(
            [
                m.model,
                str(m.images),
                f"{m.rate('ours'):.0f}",
                f"{m.rate('reference'):.0f}",
                f"{m.ratio:.2f}x",
                "-" if target is None else f">= {target:.1f}x",
                met,
            ]
        )
    print(
        table(
            rows,
            ["model", "images", "ours img/s", "reference img/s", "ours/reference", "target", "met"],
        )
    )
    note = " (CUDA: host-side time, kernels run asynchronously)" if device.type == "cuda" else ""
    print(f"\n# where a step's time goes, ms per batch{note}")
    rows = []
    for m in results:
        for loop, ph in m.phases.items():
            total = sum(ph.ms_per_step(p) for p in PHASES)
            rows.append(
                [m.model, loop, *(f"{ph.ms_per_step(p):.1f}" for p in PHASES), f"{total:.1f}"]
            )
    print(table(rows, ["model", "loop", *PHASES, "total"]))
    for m in results:
        target = TARGETS.get(m.model)
        if target is not None:
            verdict = "met" if m.ratio >= target else "NOT met"
            print(f"target {m.model}: ours >= {target:.1f}x reference: {verdict} ({m.ratio:.2f}x)")
    for m in results:
        if m.fit_rate is not None:
            print(
                f"check {m.model}: training.fit end-to-end (1 epoch, setup + validation "
                f"included) {m.fit_rate:.0f} img/s vs ours {m.rate('ours'):.0f} img/s"
            )


# --------------------------------------------------------------------------- time to accuracy
class TargetReached(Exception):
    """Raised from fit's epoch callback to stop training once the target is reached."""

    def __init__(self, epoch: int, seconds: float, accuracy: float) -> None:
        super().__init__(epoch, seconds, accuracy)
        self.epoch, self.seconds, self.accuracy = epoch, seconds, accuracy


def time_to_accuracy(
    args: argparse.Namespace,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> bool:
    """Train `--tta-model` with `training.fit` until test accuracy >= target; print wall time.

    The test set takes the place of fit's validation set (evaluated after every epoch, as in
    time-to-accuracy benchmarks); early stopping is off. Wall time covers everything `fit` does:
    moving the data to the device, building the model, training and the per-epoch evaluation.
    """
    extra = ["train.patience=0"] + ([f"train.epochs={args.tta_epochs}"] if args.tta_epochs else [])
    cfg = make_config(args.tta_model, args, *extra)
    if args.images and args.images < len(y_train):
        keep = data.stratified_subset(y_train, args.images, np.random.default_rng(cfg.seed))
        x_train, y_train = x_train[keep], y_train[keep]
    if args.eval_images and args.eval_images < len(y_test):
        x_test, y_test = x_test[: args.eval_images], y_test[: args.eval_images]
    device = training.resolve_device(cfg.train)
    if device.type == "cuda":  # CUDA context creation is not training time
        torch.zeros(1, device=device)
        sync(device)
    amp = training.autocast_dtype(cfg.train, device)
    print(
        f"# time to accuracy: model={cfg.model.name}, target test accuracy "
        f"{args.time_to_accuracy}, device {device}, precision "
        f"{'bf16 autocast' if amp else 'fp32'}, channels_last "
        f"{cfg.train.channels_last and get_spec(cfg.model.name).channels_last}, "
        f"{len(y_train)} train / {len(y_test)} test images, up to {cfg.train.epochs} epochs "
        f"of batch {cfg.train.batch_size}, deterministic {cfg.train.deterministic}"
    )
    start = time.perf_counter()

    def on_epoch(m: training.EpochMetrics) -> None:
        sync(device)
        elapsed = time.perf_counter() - start
        print(
            f"epoch {m.step:3d}  {elapsed:8.1f} s  train loss {m.train_loss:.4f}  "
            f"test accuracy {m.val_accuracy:.4f}",
            flush=True,
        )
        if m.val_accuracy >= args.time_to_accuracy:
            raise TargetReached(m.step, elapsed, m.val_accuracy)

    try:
        result = training.fit(
            cfg, x_train, y_train, x_test, y_test, on_epoch=on_epoch, progress=False
        )
    except TargetReached as hit:
        print(
            f"time to {args.time_to_accuracy:.4f} test accuracy: {hit.seconds:.1f} s "
            f"(epoch {hit.epoch}, accuracy {hit.accuracy:.4f})"
        )
        return True
    elapsed = time.perf_counter() - start
    print(
        f"target {args.time_to_accuracy:.4f} NOT reached in {len(result.history)} epochs "
        f"({elapsed:.1f} s); best test accuracy {result.best_val_accuracy:.4f}"
    )
    return False


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=TORCH_MODELS)
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="training images per loop and model (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGES.items())
        + "); with --time-to-accuracy: size of the training subset",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads, both loops")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--augment",
        choices=["light", "none"],
        default="light",
        help="augmentation config for both loops (default: light, the pipeline's)",
    )
    p.add_argument("--workers", type=int, default=0, help="reference DataLoader num_workers")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved measuring rounds per loop (alternating order)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print a torch.profiler operator table of our loop",
    )
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument(
        "--check-fit",
        action="store_true",
        help="also time training.fit itself over the same number of images",
    )
    p.add_argument(
        "--omp-wait-policy",
        choices=["inherit", "passive", "active"],
        default="inherit",
        help="run with OMP_WAIT_POLICY set (re-executes the script: OpenMP reads it "
        "when torch is loaded); passive stops idle threads spinning, which "
        "matters when other processes compete for the cores",
    )
    p.add_argument(
        "--no-fill-uninitialized-memory",
        action="store_true",
        help="both loops: torch.utils.deterministic.fill_uninitialized_memory=False "
        "(what-if for a proposed change to training.seed_everything)",
    )
    p.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for every model, e.g. train.batch_size=512 "
        "train.channels_last=false",
    )
    p.add_argument(
        "--time-to-accuracy",
        type=float,
        default=None,
        metavar="ACC",
        help="instead of throughput: train --tta-model with fit until test accuracy "
        ">= ACC and print the wall time (meant for a GPU, e.g. 0.94)",
    )
    p.add_argument("--tta-model", default="resnet", choices=TORCH_MODELS)
    p.add_argument(
        "--tta-epochs",
        type=int,
        default=None,
        help="epoch budget (the one-cycle schedule spans it); default train.epochs",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="time-to-accuracy: evaluate on only the first N test images (smoke tests)",
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or args.workers < 0:
        p.error("--rounds and --threads must be >= 1, --warmup and --workers >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("deep_repro").setLevel(logging.WARNING)  # fit's per-epoch lines
    args = parse_args(argv)
    if args.omp_wait_policy != "inherit":
        policy = args.omp_wait_policy.upper()
        if os.environ.get("OMP_WAIT_POLICY") != policy:
            os.environ["OMP_WAIT_POLICY"] = policy
            os.execv(sys.executable, [sys.executable, *sys.argv])
    x_train, y_train, x_test, y_test, source = load_fashion_mnist()
    if args.time_to_accuracy is not None:
        return 0 if time_to_accuracy(args, x_train, y_train, x_test, y_test) else 1
    device = training.resolve_device(make_config(args.models[0], args).train)
    print(environment(args, source, device))
    results = [measure(name, args, x_train, y_train) for name in args.models]
    print()
    report(results, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
