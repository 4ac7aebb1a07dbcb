"""Training protocol on the fixture: it learns, it is bit-reproducible, and it refuses bad input."""

from __future__ import annotations

import io
import logging
import math
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deep_repro import config, data, inference, machine, training
from deep_repro.config.schema import LightAugmentConfig, NoAugmentConfig
from deep_repro.errors import TrainingError
from deep_repro.files import atomic_path
from deep_repro.models.registry import MODELS, build_model, count_parameters, get_spec
from deep_repro.training import device

Make = Callable[..., config.Config]


def _state_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_torch_models_learn(make_cfg: Make, splits: data.Splits, model: str) -> None:
    extra = ["model.width=8", "model.blocks=[1]"] if model == "resnet" else []
    cfg = make_cfg(f"model={model}", "train.epochs=3", *extra)
    seen: list[training.EpochMetrics] = []
    result = training.fit(
        cfg,
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        on_epoch=seen.append,
        progress=False,
    )
    assert [m.step for m in seen] == [1, 2, 3]
    # 10 classes: chance is 0.10; the tiny ResNet learns slowest on 1,800 images.
    assert result.best_val_accuracy > (0.3 if model == "resnet" else 0.45)
    assert result.best_epoch in (1, 2, 3)
    # It learns: the training loss falls every epoch, and the best validation loss is below
    # ln(10) = 2.30, the cross-entropy of a uniform guess.
    losses = [m.train_loss for m in seen]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.9 * losses[0]
    assert min(m.val_loss for m in seen) < math.log(10)
    # The returned model holds the weights of the best epoch, not of the last.
    assert result.best_val_accuracy == max(m.val_accuracy for m in seen)


def test_logreg_matches_its_linear_module(make_cfg: Make, splits: data.Splits) -> None:
    cfg = make_cfg("model=logreg", "model.max_iter=50")
    result = training.train_model(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    assert result.best_val_accuracy > 0.7
    assert "lbfgs" in result.stop_reason
    assert count_parameters(result.model) == 784 * 10 + 10


def test_the_default_logreg_converges_without_a_warning(
    make_cfg: Make, splits: data.Splits, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 20 §6): with C = 1 lbfgs stopped at max_iter = 200 unconverged and
    warned on every logreg run (here and on the full data, where it needs > 1000 iterations)."""
    cfg = make_cfg("model=logreg")  # conf/model/logreg.yaml as committed
    result = training.train_model(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    assert result.stop_reason.startswith("lbfgs converged"), result.stop_reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_training_is_bit_reproducible(make_cfg: Make, splits: data.Splits) -> None:
    cfg = make_cfg("model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.epochs=1")
    runs = [
        training.fit(
            cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False
        )
        for _ in range(2)
    ]
    assert _state_bytes(runs[0].model) == _state_bytes(runs[1].model)
    assert runs[0].history == runs[1].history
    other = training.fit(
        make_cfg(
            "model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.epochs=1", "seed=1"
        ),
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        progress=False,
    )
    assert _state_bytes(other.model) != _state_bytes(runs[0].model)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_reuses_freed_memory_instead_of_faulting_in_fresh_pages(
    make_cfg: Make, splits: data.Splits
) -> None:
    """After `fit` set it up, freed 64 MB blocks (above glibc's largest adaptive mmap
    threshold) are reused: once the heap has grown to fit them (a few allocations, as aligned
    requests meet freed blocks), allocating again faults in no fresh pages. Before, every
    allocation cost 16,384 4-KB page faults: every training step, for each such activation."""
    cfg = make_cfg("model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.epochs=1")
    training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False)

    def faults_of(allocations: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(allocations):
            torch.ones(16 << 20)  # 64 MB, written, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of(20)  # the heap grows to fit (2 to 9 allocations, measured)
    assert faults_of(20) < 1_000


def test_ema_keeps_the_moving_average_of_weights_and_bn_statistics(
    make_cfg: Make, splits: data.Splits
) -> None:
    """`train.ema_decay`: after every step the kept network is decay * itself + (1 - decay) *
    the optimizer's network (weights AND BatchNorm running statistics), starting from a copy;
    `fit` validates, keeps and returns that average, reproducibly."""
    small = ["model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.batch_size=64"]
    cfg = make_cfg(*small, "train.ema_decay=0.75")
    training.seed_everything(cfg.seed, deterministic=True)
    st = training.make_stepper(cfg, build_model(cfg.model), torch.device("cpu"), 1, 10)
    assert st.kept is not st.model
    gen = torch.Generator().manual_seed(0)
    x, y = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train).long()
    expected: dict[str, torch.Tensor] = {}
    st.model.train()
    for step in range(3):
        idx = torch.arange(step * 64, (step + 1) * 64)
        training.train_step(st, *training.device_batch(st, x, y, idx, cfg.augment, gen))
        now = {k: v.detach().clone() for k, v in st.model.state_dict().items()}
        for k, v in now.items():
            if v.is_floating_point():
                expected[k] = v if step == 0 else 0.75 * expected[k] + 0.25 * v
    kept = st.kept.state_dict()
    assert any("running_var" in k for k in expected)
    for k, v in expected.items():
        torch.testing.assert_close(kept[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(kept["0.weight"], st.model.state_dict()["0.weight"])

    def fit(decay: float) -> training.TrainResult:
        cfg = make_cfg(*small, "train.epochs=2", f"train.ema_decay={decay}")
        return training.fit(
            cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False
        )

    runs = [fit(0.9), fit(0.9), fit(0.0)]
    assert _state_bytes(runs[0].model) == _state_bytes(runs[1].model)
    assert _state_bytes(runs[0].model) != _state_bytes(runs[2].model)
    # The returned model is the averaged one that was validated: its val accuracy is the best.
    logits = training.evaluate_logits(runs[0].model, torch.from_numpy(splits.x_val))
    accuracy = (logits.argmax(1) == torch.from_numpy(splits.y_val).long()).float().mean().item()
    assert accuracy == pytest.approx(runs[0].best_val_accuracy, abs=1e-6)


@pytest.mark.parametrize("opt,sched", [("sgd", "cosine"), ("adamw", "none"), ("sgd", "onecycle")])
def test_optimizer_scheduler_combinations(
    make_cfg: Make, splits: data.Splits, opt: str, sched: str
) -> None:
    cfg = make_cfg(
        "model=mlp", f"optimizer={opt}", f"scheduler={sched}", "train.epochs=2", "augment=none"
    )
    result = training.fit(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False
    )
    assert result.best_val_accuracy > 0.5


def test_early_stopping_records_reason(make_cfg: Make, splits: data.Splits) -> None:
    # lr so small nothing improves after the first epoch -> patience 1 stops at epoch 2 or 3
    cfg = make_cfg(
        "model=mlp", "model.lr=1e-9", "scheduler=none", "train.epochs=6", "train.patience=1"
    )
    result = training.fit(
        cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False
    )
    assert len(result.history) < 6
    assert result.stop_reason.startswith("early stop at epoch")


def test_divergence_is_an_error_naming_epoch_and_step(make_cfg: Make, splits: data.Splits) -> None:
    cfg = make_cfg(
        "model=mlp", "model.lr=1e12", "optimizer=sgd", "scheduler=none", "train.label_smoothing=0"
    )
    with pytest.raises(TrainingError, match=r"diverged: loss is (nan|inf) at epoch 1, step \d+"):
        training.fit(
            cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val, progress=False
        )


def test_bad_training_input_fails_before_work(make_cfg: Make, splits: data.Splits) -> None:
    with pytest.raises(TrainingError, match=r"train\.batch_size = 5000 exceeds the 1800"):
        training.fit(
            make_cfg("model=mlp", "train.batch_size=5000"),
            splits.x_train,
            splits.y_train,
            splits.x_val,
            splits.y_val,
            progress=False,
        )
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match=r"train\.device = 'cuda' but CUDA is not"):
            training.resolve_device(make_cfg("train.device=cuda").train)


def test_device_and_precision_defaults(make_cfg: Make, splits: data.Splits) -> None:
    # train.device=auto trains on CUDA when there is one, else on the CPU; precision=auto means
    # fp32 on the CPU (the same bytes as an explicit fp32), while bf16 really changes the numbers.
    small = ["model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.epochs=1"]

    def train(*extra: str) -> training.TrainResult:
        return training.fit(
            make_cfg(*small, *extra),
            splits.x_train[:640],
            splits.y_train[:640],
            splits.x_val,
            splits.y_val,
            progress=False,
        )

    auto = train()
    assert auto.device.startswith("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = train("train.device=cpu", "train.precision=auto")
    assert on_cpu.device == "cpu"
    assert _state_bytes(on_cpu.model) == _state_bytes(
        train("train.device=cpu", "train.precision=fp32").model
    )
    bf16 = train("train.device=cpu", "train.precision=bf16")
    assert _state_bytes(bf16.model) != _state_bytes(on_cpu.model)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # autocast, fp32 weights
    # bf16 on the CPU is as reproducible as fp32 (best_cpu trains in it): the same bytes again.
    assert _state_bytes(train("train.device=cpu", "train.precision=bf16").model) == _state_bytes(
        bf16.model
    )


def test_bf16_on_a_cpu_without_it_says_to_use_fp32(
    make_cfg: Make, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Native bf16 is a CPU feature (x86 AVX512_BF16 or AMX, Arm BF16), read from torch's map;
    # without it bf16 is emulated (slower than fp32): the run says so, and what to set instead.
    assert machine.native_bf16({"avx512_bf16": True, "avx2": True})
    assert machine.native_bf16({"amx_bf16": True}) and machine.native_bf16({"bf16": True})
    assert not machine.native_bf16({"avx2": True, "avx512_f": True, "fma3": True})
    assert machine.native_bf16() in (True, False)  # this machine's own answer, whichever it is
    cpu = torch.device("cpu")
    bf16, auto = (make_cfg(f"train.precision={p}").train for p in ("bf16", "auto"))
    for native, expected in ((True, 0), (False, 1), (None, 0)):  # None: torch cannot tell
        monkeypatch.setattr(machine, "native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=device.log.name):
            assert device.autocast_dtype(bf16, cpu) is torch.bfloat16
            assert device.autocast_dtype(auto, cpu) is None  # fp32 on the CPU: nothing to say
        warned = [r.getMessage() for r in caplog.records if r.name == device.log.name]
        assert len(warned) == expected, (native, warned)
        assert all("use -S train.precision=fp32" in w for w in warned)


def test_augmentation_is_batched_label_preserving_and_seeded(splits: data.Splits) -> None:
    x = torch.from_numpy(splits.x_train[:64])
    cfg = LightAugmentConfig(name="light", crop_padding=2, hflip=True, random_erasing=0.5)
    a = training.augment_batch(x, cfg, torch.Generator().manual_seed(0))
    b = training.augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(
        training.augment_batch(x, NoAugmentConfig(name="none"), torch.Generator()), x
    )
    # Pure flips keep every pixel value: a flipped image is a permutation of the original.
    flip_only = LightAugmentConfig(name="light", crop_padding=0, hflip=True, random_erasing=0.0)
    f = training.augment_batch(x, flip_only, torch.Generator().manual_seed(1))
    assert torch.equal(f.sort(dim=-1).values, x.sort(dim=-1).values)


def test_models_build_from_every_config(make_cfg: Make) -> None:
    assert {"mlp", "cnn", "resnet", "logreg", "mobilenet"} <= set(MODELS)
    for name in MODELS:
        net = build_model(make_cfg(f"model={name}").model).eval()
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("pool_before_bn", [True, False])
def test_cnn_blocks_follow_the_config(make_cfg: Make, pool_before_bn: bool) -> None:
    """`convs_per_block` 3x3 convolutions per block; the block's last one pooled either before
    its BN-ReLU (BN/ReLU on a quarter of the pixels) or after them."""
    cfg = make_cfg(
        "model=cnn",
        "model.channels=[8,16,32]",
        "model.convs_per_block=2",
        f"model.pool_before_bn={str(pool_before_bn).lower()}",
    )
    net = build_model(cfg.model)
    kinds = [type(m).__name__ for m in net]
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    pooled_first = ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    pooled_last = ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    block = pooled_first if pool_before_bn else pooled_last
    assert kinds[3:7] == block  # the first block's second (pooled) convolution
    assert kinds.count("MaxPool2d") == 3
    assert net.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_fit_refuses_a_model_it_does_not_train(make_cfg: Make, splits: data.Splits) -> None:
    with pytest.raises(TrainingError, match=r"model = logreg is not trained by gradient descent"):
        training.fit(
            make_cfg("model=logreg"),
            splits.x_train,
            splits.y_train,
            splits.x_val,
            splits.y_val,
            progress=False,
        )


def test_new_architecture_trains_and_exports_through_the_registry(
    make_cfg: Make, splits: data.Splits, tmp_path: Path
) -> None:
    # mobilenet was added with conf/model/mobilenet.yaml, entries in config/architectures.py
    # and models/registry.py, and conf/search/mobilenet.yaml only: train_model, the memory
    # format and export find it.
    # One epoch at full lr (no one-cycle warm-up, no augmentation) to learn visibly in 28 steps.
    cfg = make_cfg(
        "model=mobilenet",
        "model.width=8",
        "model.channels=[16,32]",
        "train.epochs=1",
        "scheduler=none",
        "augment=none",
    )
    assert cfg.is_torch_model and get_spec(cfg.model.name).channels_last
    result = training.train_model(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    assert len(result.history) == 1 and math.isfinite(result.history[0].train_loss)
    assert result.best_val_accuracy > 0.25  # chance is 0.10
    module = inference.build_inference_module(result.model)
    target = tmp_path / "inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(module, torch.from_numpy(splits.x_val[:2]), tmp)
    reference = training.evaluate_logits(result.model, torch.from_numpy(splits.x_val))
    got = inference.predict_logits(inference.load_inference_model(target), splits.x_val)
    eq = inference.check_equivalence(
        reference, got, splits.y_val, quantize="none", atol=1e-4, max_acc_drop=0.005
    )
    assert eq.max_abs_diff <= 1e-4


def test_free_cores_counts_other_processes_not_ours() -> None:
    n = device.usable_cores()
    assert 1 <= device.free_cores(0.1) <= n
    assert device.resolve_num_threads(3) == 3
    before = torch.get_num_threads()
    try:
        used = device.seed_everything(0, deterministic=False, num_threads="auto")
        assert 1 <= used == torch.get_num_threads() <= n
    finally:
        torch.set_num_threads(before)
    if n < 2:
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let the interpreter start and spin
        assert device.free_cores(0.3) <= n - 1
    finally:
        busy.kill()
        busy.wait()
