"""Inference architecture: the trained network post-processed into one deployable artifact.

Every model type (logreg, mlp, cnn, resnet) becomes the same kind of thing: a `torch.export`
program (`models/inference.pt2`) that takes raw uint8 images `[N, 28, 28]` and returns logits.
The training-time normalisation is baked in (no train/serve skew), dropout is removed and
BatchNorm folded into the preceding conv/linear layer, optionally weights are stored as int8,
test-time augmentation (the views of `postprocess.tta`) is part of the program, and conv
weights are kept channels-last (oneDNN then runs every op in that layout instead of reordering).
The file loads with torch alone (no training code needed to serve it), and only through
`load_inference_model`, which first refuses any archive that would unpickle or evaluate code
(`deep_repro.inference.safe_archive`).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deep_repro.config.task import PIXEL_MEAN, PIXEL_STD
from deep_repro.errors import DataError, DeepReproError, first_line
from deep_repro.inference import safe_archive


class EquivalenceError(DeepReproError):
    """The exported inference model does not reproduce the trained model's outputs."""


class NormalisedClassifier(nn.Module):
    """uint8 images in, logits out: the preprocessing the network was trained with, baked in;
    with `tta="hflip"` the mean logits of each image and its mirror image, with "hflip_shift"
    of those and of their copies moved by a pixel (one program, the same `[N, 28, 28] ->
    [N, 10]` contract, 2x or 6x the compute; `training.augment.TTA_VIEWS`)."""

    def __init__(self, net: nn.Module, tta: str = "none") -> None:
        super().__init__()
        self.net = net
        self.tta = tta
        self.kernels: torch.Tensor | None
        if tta in ("none", "hflip"):
            self.kernels = None  # no buffer: such programs stay what they were
        else:
            from deep_repro.training.augment import shift_kernels

            self.register_buffer("kernels", shift_kernels(tta))
        # Annotated so type checkers see tensors (register_buffer stores them on the module).
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * PIXEL_STD)))
        self.register_buffer("shift", torch.tensor(PIXEL_MEAN / PIXEL_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(-1, 1, 28, 28).to(torch.float32) * self.scale - self.shift
        if self.tta != "none":
            # Imported here, where an export traces it: loading a program to predict with
            # (`deep-repro predict`) then needs none of the training code or its config schema.
            from deep_repro.training.augment import tta_logits

            return tta_logits(self.net, x, self.tta, self.kernels)
        return self.net(x)


# --------------------------------------------------------------------------- rewrites
def _fold_bn(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> nn.Module:
    """Return a copy of `layer` with the (eval-mode) BatchNorm after it folded into its weights:
    y = gamma * (Wx + b - mean) / sqrt(var + eps) + beta."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = type(layer).__new__(type(layer))
    fused.__dict__ = {**layer.__dict__}
    fused._parameters = {}
    fused._buffers = {}
    fused._modules = {}
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    fused.weight = nn.Parameter(layer.weight.detach() * scale.reshape(shape))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every `Conv/Linear -> BatchNorm` pair inside Sequentials; drop Dropout (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(module, name, nn.Identity())
        else:
            fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        keys = list(module._modules)
        for a, b in itertools.pairwise(keys):
            first, second = module._modules[a], module._modules[b]
            if (isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d)) or (
                isinstance(first, nn.Linear) and isinstance(second, nn.BatchNorm1d)
            ):
                module._modules[a] = _fold_bn(first, second)
                module._modules[b] = nn.Identity()
    return module


class Int8Linear(nn.Module):
    """Linear layer with int8 weights (per-output-channel scales) and dynamic per-tensor int8
    quantisation of its input. The arithmetic is emulated in fp32 so the graph stays exportable
    (PyTorch's packed quantized ops cannot go through `torch.export`); numerics, and the 4x
    smaller weights on disk, are those of int8."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.weight_int8: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0])
        self.register_buffer("bias", bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = x.abs().amax().clamp(min=1e-12) / 127.0
        xq = torch.round(x / x_scale).clamp(-127, 127) * x_scale
        weight = self.weight_int8.to(torch.float32) * self.weight_scale[:, None]
        return nn.functional.linear(xq, weight, self.bias)


def quantize_int8(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return module


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm that could not be folded (it follows a pool, not a conv) as the
    per-channel `x * scale + shift` it computes: plain `mul`/`add` in the exported graph, where
    `aten.batch_norm` would be refused by the loader (with `training=True` it writes its
    running statistics: see safe_archive). Same arithmetic as torch's CPU inference kernel."""

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight.detach() * (1.0 / torch.sqrt(bn.running_var + bn.eps))
        shift = bn.bias.detach() - bn.running_mean * scale
        shape = (-1, 1, 1) if isinstance(bn, nn.BatchNorm2d) else (-1,)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", scale.reshape(shape).clone())
        self.register_buffer("shift", shift.reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def pure_layers(module: nn.Module) -> nn.Module:
    """Only pure tensor operators in the export (in place): remaining BatchNorms become
    `ChannelAffine`, in-place ReLUs out-of-place (`aten.relu_` writes its input)."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, ChannelAffine(child))
        elif isinstance(child, nn.ReLU):
            child.inplace = False
        else:
            pure_layers(child)
    return module


def build_inference_module(
    net: nn.Module, quantize: str = "none", tta: str = "none", *, channels_last: bool = True
) -> NormalisedClassifier:
    """Trained network -> inference architecture (eval mode, no dropout, folded BN, TTA)."""
    import copy

    net = copy.deepcopy(net).float().cpu().eval()
    net = pure_layers(fold_batchnorm(net))
    # Conv weights in channels-last order (the export keeps their strides): oneDNN then runs
    # every convolution, pool and elementwise op of the program in that layout, ~2x faster on
    # CPU than the contiguous one (benchmarks/inference_speed.py): what lets the 6-view TTA
    # cost no more than the flip did. Linear weights (2-D) are untouched.
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if quantize == "int8":
        net = quantize_int8(net)
    return NormalisedClassifier(net, tta).eval()


# --------------------------------------------------------------------------- export / load
def export(module: nn.Module, example: torch.Tensor, target: Path) -> None:
    """Export to a portable `.pt2` at `target` (callers pass a `files.atomic_path`)."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    # The stack traces torch records per node name the source files by absolute path (this
    # checkout, the venv): the file's bytes would depend on where the project lives. They are
    # debugging aids only; without them the file (and its serialization id, a checksum of the
    # members) is a function of the module and the example alone.
    for graph_module in program.graph_module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            for node in graph_module.graph.nodes:
                node.meta.pop("stack_trace", None)
    with warnings.catch_warnings():
        # Said of every channels-last weight (not "contiguous", so torch cannot tell it covers
        # its whole storage): the file stores that storage in full, with the strides; the
        # warning is about weights on another device, which an export here never has.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, target)


def load_inference_model(path: Path) -> nn.Module:
    """Load an exported program as a module: the one loader every `.pt2` goes through.

    `torch.export.load` by itself unpickles (weights_only=False) whatever a crafted archive asks
    it to, so the archive is checked first and refused unless it is a plain tensor-only program.
    """
    module: nn.Module = load_exported_program(path).module()
    return module


def load_exported_program(path: Path) -> Any:
    """The checked `ExportedProgram` (see `load_inference_model`)."""
    return _refusing(path, safe_archive.load_exported)


def read_checked_model(path: Path) -> bytes:
    """The bytes of the `.pt2` at `path`, checked (no torch.export.load): one-line errors."""
    data: bytes = _refusing(path, safe_archive.read_checked)
    return data


def _refusing(path: Path, load: Callable[[Path], Any]) -> Any:
    if not path.exists():
        raise DataError(f"{path} not found: run the postprocess stage first (`dvc repro`)")
    try:
        return load(path)
    except safe_archive.UnsafeArchiveError as exc:
        raise DataError(
            f"{path}: refused to load model ({exc}); re-export it with `dvc repro postprocess`"
        ) from None


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A training checkpoint (`state_dict`), with torch's restricted unpickler only."""
    import pickle

    if not path.exists():
        raise DataError(f"{path} not found: run the train stage first (`dvc repro`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False: exactly what must not be done here.
        raise DataError(
            f"{path}: refused to load checkpoint (it holds objects other than "
            "tensors, which could run code); retrain with `dvc repro train`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: refused to load checkpoint ({first_line(exc, 200)}); retrain with "
            "`dvc repro train`"
        ) from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a state_dict checkpoint; retrain with `dvc repro train`")
    return state


@torch.no_grad()
def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images_u8: np.ndarray | torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Logits for uint8 images `[N, 28, 28]`, `[N, 1, 28, 28]` or `[N, 784]`, batched.

    64 at a time: the default CNN's largest activation (a 6-view TTA's first conv output, 19 MB)
    then stays under glibc's 32 MB limit for reusing freed memory; above it every call maps
    fresh pages and faults them in (benchmarks/inference_speed.py, 6,000 images, six views:
    583 page faults per image and 2.76 ms at 1,024 a call, none and 1.26 ms at 64)."""
    x = torch.as_tensor(images_u8)
    if x.dtype != torch.uint8:
        raise DataError(f"inference expects uint8 pixel values 0..255, got {x.dtype}")
    x = x.reshape(-1, 28, 28)
    outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, 10)


# --------------------------------------------------------------------------- checks & numbers
@dataclass(frozen=True)
class Equivalence:
    max_abs_diff: float
    reference_accuracy: float
    exported_accuracy: float

    @property
    def accuracy_drop(self) -> float:
        return self.reference_accuracy - self.exported_accuracy


def check_equivalence(
    reference: torch.Tensor,
    exported: torch.Tensor,
    labels: np.ndarray,
    *,
    quantize: str,
    atol: float,
    max_acc_drop: float,
) -> Equivalence:
    """Compare logits of the trained and exported model on the validation set; raise if off."""
    y = torch.as_tensor(labels.astype(np.int64))
    eq = Equivalence(
        max_abs_diff=float((reference - exported).abs().max()),
        reference_accuracy=float((reference.argmax(1) == y).float().mean()),
        exported_accuracy=float((exported.argmax(1) == y).float().mean()),
    )
    if quantize == "none" and not eq.max_abs_diff <= atol:
        raise EquivalenceError(
            f"exported model differs from the trained model: max |logit diff| = "
            f"{eq.max_abs_diff:.3g} > postprocess.atol = {atol:g} on {len(y)} val images"
        )
    if quantize == "int8" and not eq.accuracy_drop <= max_acc_drop:
        raise EquivalenceError(
            f"int8 model loses {eq.accuracy_drop * 100:.2f} accuracy points on val "
            f"({eq.reference_accuracy:.4f} -> {eq.exported_accuracy:.4f}) > "
            f"postprocess.int8_max_acc_drop = {max_acc_drop:g}"
        )
    return eq


def measure_latency(
    model: nn.Module, images_u8: np.ndarray, batch_size: int, repeats: int = 20
) -> float:
    """Median seconds per forward pass of `batch_size` images (after warm-up)."""
    x = torch.as_tensor(images_u8[:batch_size]).reshape(-1, 28, 28)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            start = time.perf_counter()
            model(x)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
