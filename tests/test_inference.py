"""Inference architecture: folded, exported, equivalent, quantised, portable."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from deep_repro import config, data, inference, models, training
from deep_repro.errors import DataError
from deep_repro.files import atomic_path
from deep_repro.inference import safe_archive
from tests.helpers import REPO

Make = Callable[..., config.Config]

SMALL = {
    "logreg": ["model=logreg", "model.max_iter=30"],
    "mlp": ["model=mlp", "model.hidden_sizes=[64]"],
    "cnn": ["model=cnn", "model.channels=[8,16]", "model.hidden=32"],
    "cnn-vgg": [
        "model=cnn",
        "model.channels=[8,16]",
        "model.convs_per_block=2",
        "model.pool_before_bn=false",
        "model.hidden=32",
    ],
    "resnet": ["model=resnet", "model.width=8", "model.blocks=[1,1]"],
    "mobilenet": ["model=mobilenet", "model.width=8", "model.channels=[8,16]"],
}


def test_every_registered_model_kind_is_exported_here() -> None:
    from deep_repro.models.registry import MODELS

    assert set(MODELS) == {name.split("-")[0] for name in SMALL}


def _trained(make_cfg: Make, splits: data.Splits, name: str) -> torch.nn.Module:
    cfg = make_cfg("train.epochs=1", *SMALL[name])
    return training.train_model(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val
    ).model


def _export_to(tmp_path: Path, net: torch.nn.Module, tta: str, splits: data.Splits) -> Path:
    """`net` exported with test-time augmentation `tta` to `tmp_path/inference.pt2`."""
    target = tmp_path / "inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(
            inference.build_inference_module(net, tta=tta), torch.from_numpy(splits.x_val[:2]), tmp
        )
    return target


def _unfolded_batchnorms(module: torch.nn.Module) -> list[str]:
    """BatchNorms left directly after a conv/linear layer (those must have been folded)."""
    left = []
    for name, seq in module.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            for first, second in itertools.pairwise(seq.children()):
                if isinstance(first, torch.nn.Conv2d | torch.nn.Linear) and isinstance(
                    second, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d
                ):
                    left.append(name)
    return left


@pytest.mark.parametrize("name", list(SMALL))
def test_export_is_equivalent_for_every_model(
    make_cfg: Make, splits: data.Splits, tmp_path: Path, name: str
) -> None:
    net = _trained(make_cfg, splits, name)
    module = inference.build_inference_module(net)
    # Dropout gone, BatchNorm folded into the conv/linear before it (a BN after a max-pool,
    # `model.pool_before_bn`, cannot be: max does not commute with a negative BN scale).
    kinds = {type(m).__name__ for m in module.modules()}
    assert "Dropout" not in kinds
    assert _unfolded_batchnorms(module) == []
    target = tmp_path / "inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(module, torch.from_numpy(splits.x_val[:2]), tmp)
    exported = inference.load_inference_model(target)
    # The loaded program keeps its conv weights channels-last, the layout oneDNN runs fastest
    # (~2x the contiguous one on CPU): `torch.export` saves strides, the loader must keep them.
    weights = [p for p in exported.parameters() if p.dim() == 4]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert (len(weights) > 0) == (name not in ("logreg", "mlp"))
    reference = training.evaluate_logits(net.eval(), torch.from_numpy(splits.x_val))
    got = inference.predict_logits(exported, splits.x_val)
    eq = inference.check_equivalence(
        reference, got, splits.y_val, quantize="none", atol=1e-4, max_acc_drop=0.005
    )
    assert eq.max_abs_diff <= 1e-4
    # Any batch size and both input layouts work; no training code needed to run it.
    assert exported(torch.from_numpy(splits.x_val[:1])).shape == (1, 10)
    assert inference.predict_logits(exported, splits.x_val[:3, None]).shape == (3, 10)
    # `postprocess.tta: auto`, measured on every registered model kind: the most accurate
    # candidate on validation (ties: the richer), and the reference is what the program computes.
    choice = training.choose_tta(net, splits.x_val, splits.y_val, "auto")
    accuracy = choice.val_accuracy
    assert list(accuracy) == ["none", "hflip", "hflip_shift"]
    richer = list(accuracy)[list(accuracy).index(choice.tta) + 1 :]
    assert accuracy[choice.tta] == max(accuracy.values())
    assert all(accuracy[t] < accuracy[choice.tta] for t in richer)
    assert torch.allclose(
        choice.reference,
        training.evaluate_logits(net, torch.from_numpy(splits.x_val), tta=choice.tta),
        atol=1e-5,
    )


def test_hflip_tta_is_baked_into_the_program(
    make_cfg: Make, splits: data.Splits, tmp_path: Path
) -> None:
    """`postprocess.tta: hflip`: the exported program alone averages each image's logits with
    those of its mirror image, and the equivalence check compares like with like."""
    net = _trained(make_cfg, splits, "cnn").eval()
    target = _export_to(tmp_path, net, "hflip", splits)
    exported = inference.load_inference_model(target)
    x = torch.from_numpy(splits.x_val)
    got = inference.predict_logits(exported, splits.x_val)
    plain = training.evaluate_logits(net, x)
    mirrored = training.evaluate_logits(net, x.flip(-1))
    assert torch.allclose(got, (plain + mirrored) / 2, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # TTA really changed the logits
    eq = inference.check_equivalence(
        training.evaluate_logits(net, x, tta="hflip"),
        got,
        splits.y_val,
        quantize="none",
        atol=1e-4,
        max_acc_drop=0.005,
    )
    assert eq.max_abs_diff <= 1e-4
    # Mirror images get the same answer: the program is symmetric by construction.
    flipped = inference.predict_logits(exported, splits.x_val[:, :, ::-1].copy())
    assert torch.allclose(flipped, got, atol=1e-4)


def test_broken_export_fails_the_check(make_cfg: Make, splits: data.Splits) -> None:
    net = _trained(make_cfg, splits, "mlp")
    module = inference.build_inference_module(net)
    with torch.no_grad():
        module.net[1].weight.mul_(1.01)  # a subtly wrong export
    reference = training.evaluate_logits(net.eval(), torch.from_numpy(splits.x_val))
    got = inference.predict_logits(module, splits.x_val)
    with pytest.raises(
        inference.EquivalenceError,
        match=r"max \|logit diff\| = .* > "
        r"postprocess.atol = 0.0001 on 200 val images",
    ):
        inference.check_equivalence(
            reference, got, splits.y_val, quantize="none", atol=1e-4, max_acc_drop=0.005
        )


def test_int8_is_within_tolerance_and_smaller(
    make_cfg: Make, splits: data.Splits, tmp_path: Path
) -> None:
    net = _trained(make_cfg, splits, "mlp")
    reference = training.evaluate_logits(net.eval(), torch.from_numpy(splits.x_val))
    paths = {}
    for mode in ("none", "int8"):
        module = inference.build_inference_module(net, quantize=mode)
        paths[mode] = tmp_path / f"{mode}.pt2"
        with atomic_path(paths[mode]) as tmp:
            inference.export(module, torch.from_numpy(splits.x_val[:2]), tmp)
    q = inference.load_inference_model(paths["int8"])
    eq = inference.check_equivalence(
        reference,
        inference.predict_logits(q, splits.x_val),
        splits.y_val,
        quantize="int8",
        atol=1e-4,
        max_acc_drop=0.005,
    )
    assert eq.accuracy_drop <= 0.005
    assert paths["int8"].stat().st_size < 0.5 * paths["none"].stat().st_size
    with pytest.raises(inference.EquivalenceError, match="int8 model loses"):
        wrong = torch.roll(reference, 1, dims=1)
        inference.check_equivalence(
            reference, wrong, splits.y_val, quantize="int8", atol=1e-4, max_acc_drop=0.005
        )


def test_export_is_byte_reproducible(make_cfg: Make, splits: data.Splits, tmp_path: Path) -> None:
    net = _trained(make_cfg, splits, "cnn")
    blobs = []
    for i in range(2):
        target = tmp_path / str(i) / "inference.pt2"
        with atomic_path(target) as tmp:
            inference.export(
                inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
            )
        blobs.append(target.read_bytes())
    assert blobs[0] == blobs[1]


# Run in a copy of the project: imports deep_repro from there, exports the checkpoint's model.
_EXPORT_IN_CLONE = """
import sys
from pathlib import Path

import torch

import deep_repro
from deep_repro import config, inference, models

root = Path.cwd()
assert Path(deep_repro.__file__).is_relative_to(root), deep_repro.__file__
cfg = config.validate(config.compose(["model=cnn"], root / "conf"))
net = models.build_model(cfg.model)
net.load_state_dict(torch.load(sys.argv[1], weights_only=True))
module = inference.build_inference_module(net, "none", "hflip")
inference.export(module, torch.zeros(2, 28, 28, dtype=torch.uint8), root / "inference.pt2")
"""


def test_the_exported_file_does_not_depend_on_where_the_project_lives(tmp_path: Path) -> None:
    """Two checkouts at different paths, same checkpoint: the same bytes (the recorded stack
    traces named both paths, and the serialization id, a checksum, followed)."""
    cfg = config.validate(config.compose(["model=cnn"], REPO / "conf"))
    torch.manual_seed(0)
    net = models.build_model(cfg.model)
    for module in net.modules():  # BatchNorm statistics as after training, not 0 and 1
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(net.state_dict(), checkpoint)
    clones = [tmp_path / "a", tmp_path / "b" / "deeper" / "checkout"]
    procs = []
    for clone in clones:
        for part in ("src", "conf"):
            shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(clone / "src")}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _EXPORT_IN_CLONE, str(checkpoint)],
                cwd=clone,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    first, second = ((clone / "inference.pt2").read_bytes() for clone in clones)
    assert first == second
    for place in (tmp_path, REPO, Path(sys.prefix)):
        assert str(place).encode() not in first
    assert safe_archive.check_pt2(first) is None


def test_predict_rejects_float_input(splits: data.Splits) -> None:
    module = inference.build_inference_module(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    )
    with pytest.raises(
        DataError,
        match=r"^inference expects uint8 pixel values 0\.\.255, "
        r"got torch\.float32$",
    ):
        inference.predict_logits(module, splits.x_val.astype(np.float32))


def test_latency_is_measured(splits: data.Splits) -> None:
    module = inference.build_inference_module(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    )
    assert 0 < inference.measure_latency(module, splits.x_val, 1, repeats=3) < 1


def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """uint8 images moved dy pixels down and dx right, black where nothing moved in."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_shift_tta_is_the_mean_over_moved_and_mirrored_copies(
    make_cfg: Make, splits: data.Splits, tmp_path: Path
) -> None:
    """`postprocess.tta: hflip_shift`: the exported program (pure operators only: the shifts are
    a convolution) averages the logits of each image, of it moved one pixel up-left and
    down-right (black edges, as the training crops pad), and of the mirror images of all three
    — checked against those six copies made independently, by slicing uint8 images."""
    net = _trained(make_cfg, splits, "cnn").eval()
    target = _export_to(tmp_path, net, "hflip_shift", splits)
    got = inference.predict_logits(inference.load_inference_model(target), splits.x_val)
    x = torch.from_numpy(splits.x_val)
    views = [_moved(x, d, d) for d in (0, -1, 1)]
    views += [v.flip(-1) for v in views]
    expected = sum(training.evaluate_logits(net, v) for v in views) / 6
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, training.evaluate_logits(net, x, tta="hflip"), atol=1e-3)
    # Chosen explicitly: scored against one pass only.
    choice = training.choose_tta(net, splits.x_val, splits.y_val, "hflip_shift")
    assert choice.tta == "hflip_shift" and list(choice.val_accuracy) == ["none", "hflip_shift"]
    assert (choice.reference - got).abs().max() <= 1e-4


def test_tta_auto_never_lowers_validation_accuracy_of_a_linear_model(
    make_cfg: Make, splits: data.Splits, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 20 §6): the default flip TTA was applied to a logistic regression trained
    without flips (test accuracy 0.842 -> 0.673 on the full data). The default now decides on
    validation; an explicit `hflip` is obeyed but warned about."""
    cfg = make_cfg("model=logreg", "model.max_iter=30")  # the default postprocess config
    assert cfg.postprocess.tta == "auto"
    net = _trained(make_cfg, splits, "logreg").eval()
    caplog.clear()
    choice = training.choose_tta(net, splits.x_val, splits.y_val, cfg.postprocess.tta)
    assert choice.val_accuracy["hflip"] < choice.val_accuracy["none"]  # the flip hurts it here
    assert choice.tta == "none" and choice.rule == "auto"
    assert all(r.levelname == "INFO" for r in caplog.records)
    forced = training.choose_tta(net, splits.x_val, splits.y_val, "hflip")
    assert forced.tta == "hflip"
    assert any("lowers validation accuracy" in r.getMessage() for r in caplog.records)
    # A model that is mirror-symmetric by construction ties, and a tie keeps the flip (or the
    # shifts on top of it, where they score at least as well).
    symmetric = _Symmetric(net)
    tie = training.choose_tta(symmetric, splits.x_val, splits.y_val, "auto")
    assert tie.val_accuracy["hflip"] == tie.val_accuracy["none"]
    shifts_win = tie.val_accuracy["hflip_shift"] >= tie.val_accuracy["hflip"]
    assert tie.tta == ("hflip_shift" if shifts_win else "hflip")
    assert training.choose_tta(symmetric, splits.x_val, splits.y_val, "none").tta == "none"


class _Symmetric(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.net(x.flip(-1))
