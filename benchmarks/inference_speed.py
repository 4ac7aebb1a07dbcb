"""Inference speed of the exported program: memory layout x images per call x test-time views.

Exports the pipeline's trained network (`models/checkpoint.pt` with `params.yaml`'s model: run
`dvc repro` first) as the postprocess stage does, once per variant, loads each through the
safe-archive check, and times `inference.predict_logits` over the 6,000 validation images,
interleaved (one round visits every variant; `--repeats` rounds; median), on `--threads`
threads. Prints ms per image, minor page faults per image (memory the allocator mapped afresh
and the kernel had to zero), validation accuracy, and each variant's time as a ratio of the
previous default's (contiguous weights, 1,024 images a call, `hflip`).

Why the variants: oneDNN runs convolutions fastest with channels-last activations, which a
program gets from channels-last weights; and glibc hands any block over 32 MB back to the kernel
when it is freed, so a call whose activations exceed it faults in fresh pages every time (the
6-view TTA at 1,024 images a call: 3,072 views, a 308 MB first activation).

    .venv/bin/python benchmarks/inference_speed.py
    .venv/bin/python benchmarks/inference_speed.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deep_repro import data, inference
from deep_repro.config.stage_view import load_stage_config
from deep_repro.models.registry import build_model
from deep_repro.pipeline import CHECKPOINT, SPLIT_TRAIN_VAL

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    tta: str
    channels_last: bool
    batch: int

    def __str__(self) -> str:
        layout = "channels-last" if self.channels_last else "contiguous"
        return f"{self.tta:<12} {layout:<13} {self.batch:>5}"


BEFORE = Variant("hflip", False, 1024)  # the program and batch of main before this benchmark
VARIANTS = (
    BEFORE,
    Variant("none", True, 64),
    Variant("hflip", True, 64),
    Variant("hflip_shift", False, 1024),
    Variant("hflip_shift", True, 1024),
    Variant("hflip_shift", True, 64),  # what `dvc repro` now runs (tta: auto chooses it)
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    checkpoint = REPO / CHECKPOINT
    if not checkpoint.exists():
        sys.exit(f"{checkpoint} not found: run `uv run dvc repro` first")
    torch.set_num_threads(args.threads)
    cfg = load_stage_config("postprocess", REPO / "params.yaml")
    net = build_model(cfg.model)
    net.load_state_dict(inference.load_checkpoint(checkpoint))
    net.eval()
    split = data.load_arrays(REPO / SPLIT_TRAIN_VAL)
    x_val, y_val = torch.from_numpy(split["x_val"]), torch.from_numpy(split["y_val"])

    programs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tta, channels_last in {(v.tta, v.channels_last) for v in VARIANTS}:
            module = inference.build_inference_module(net, tta=tta, channels_last=channels_last)
            target = Path(tmp) / f"{tta}-{channels_last}.pt2"
            inference.export(module, x_val[:2], target)
            programs[(tta, channels_last)] = inference.load_inference_model(target)

    seconds: dict[Variant, list[float]] = {v: [] for v in VARIANTS}
    faults: dict[Variant, list[int]] = {v: [] for v in VARIANTS}
    accuracy = {}
    for _ in range(args.repeats):
        for v in VARIANTS:
            program = programs[(v.tta, v.channels_last)]
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            logits = inference.predict_logits(program, x_val, batch_size=v.batch)
            seconds[v].append(time.perf_counter() - start)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            accuracy[v] = float((logits.argmax(1) == y_val).float().mean())

    n = len(x_val)
    base = statistics.median(seconds[BEFORE])
    print(
        f"torch {torch.__version__}, {args.threads} threads, model={cfg.model.name}, "
        f"{n} val images, median of {args.repeats} interleaved rounds"
    )
    print(f"{'tta':<12} {'layout':<13} {'batch':>5}  ms/img  faults/img  val acc  time / before")
    for v in VARIANTS:
        t = statistics.median(seconds[v])
        f = statistics.median(faults[v]) / n
        print(f"{v}  {1e3 * t / n:6.3f}  {f:10.1f}  {accuracy[v]:.4f}  {t / base:6.2f}")


if __name__ == "__main__":
    main()
