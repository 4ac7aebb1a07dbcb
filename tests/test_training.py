"""Training protocol on the fixture: it learns, it is bit-reproducible, and it refuses bad input."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from deep_repro import config, data, training
from deep_repro.config import AugmentConfig
from deep_repro.errors import TrainingError
from deep_repro.models import build_model, count_parameters

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
    result = training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                          on_epoch=seen.append, progress=False)
    assert [m.step for m in seen] == [1, 2, 3]
    # 10 classes: chance is 0.10; the tiny ResNet learns slowest on 1,800 images.
    assert result.best_val_accuracy > (0.3 if model == "resnet" else 0.45)
    assert result.best_epoch in (1, 2, 3)
    assert all(m.lr >= 0 for m in seen)


def test_logreg_matches_its_linear_module(make_cfg: Make, splits: data.Splits) -> None:
    cfg = make_cfg("model=logreg", "model.max_iter=50")
    result = training.train_model(cfg, splits.x_train, splits.y_train, splits.x_val,
                                  splits.y_val)
    assert result.best_val_accuracy > 0.7
    assert "lbfgs" in result.stop_reason
    assert count_parameters(result.model) == 784 * 10 + 10


def test_training_is_bit_reproducible(make_cfg: Make, splits: data.Splits) -> None:
    cfg = make_cfg("model=cnn", "model.channels=[8,16]", "model.hidden=32", "train.epochs=1")
    runs = [training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                         progress=False) for _ in range(2)]
    assert _state_bytes(runs[0].model) == _state_bytes(runs[1].model)
    assert runs[0].history == runs[1].history
    other = training.fit(make_cfg("model=cnn", "model.channels=[8,16]", "model.hidden=32",
                                  "train.epochs=1", "seed=1"),
                         splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                         progress=False)
    assert _state_bytes(other.model) != _state_bytes(runs[0].model)


@pytest.mark.parametrize("opt,sched", [("sgd", "cosine"), ("adamw", "none"),
                                       ("sgd", "onecycle")])
def test_optimizer_scheduler_combinations(make_cfg: Make, splits: data.Splits, opt: str,
                                          sched: str) -> None:
    cfg = make_cfg("model=mlp", f"optimizer={opt}", f"scheduler={sched}", "train.epochs=2",
                   "augment=none")
    result = training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                          progress=False)
    assert result.best_val_accuracy > 0.5


def test_early_stopping_records_reason(make_cfg: Make, splits: data.Splits) -> None:
    # lr so small nothing improves after the first epoch -> patience 1 stops at epoch 2 or 3
    cfg = make_cfg("model=mlp", "model.lr=1e-9", "scheduler=none", "train.epochs=6",
                   "train.patience=1")
    result = training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                          progress=False)
    assert len(result.history) < 6
    assert result.stop_reason.startswith("early stop at epoch")


def test_divergence_is_an_error_naming_epoch_and_step(make_cfg: Make,
                                                      splits: data.Splits) -> None:
    cfg = make_cfg("model=mlp", "model.lr=1e12", "optimizer=sgd", "scheduler=none",
                   "train.label_smoothing=0")
    with pytest.raises(TrainingError, match=r"diverged: loss is (nan|inf) at epoch 1, step \d+"):
        training.fit(cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                     progress=False)


def test_bad_training_input_fails_before_work(make_cfg: Make, splits: data.Splits) -> None:
    with pytest.raises(TrainingError, match=r"train\.batch_size = 5000 exceeds the 1800"):
        training.fit(make_cfg("model=mlp", "train.batch_size=5000"), splits.x_train,
                     splits.y_train, splits.x_val, splits.y_val, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match=r"train\.device = 'cuda' but CUDA is not"):
            training.resolve_device(make_cfg("train.device=cuda").train)


def test_device_and_precision_defaults(make_cfg: Make) -> None:
    cfg = make_cfg()
    device = training.resolve_device(cfg.train)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert training.autocast_dtype(cfg.train, torch.device("cpu")) is None
    assert training.autocast_dtype(cfg.train, torch.device("cuda")) == torch.bfloat16


def test_augmentation_is_batched_label_preserving_and_seeded(splits: data.Splits) -> None:
    x = torch.from_numpy(splits.x_train[:64])
    cfg = AugmentConfig(name="light", crop_padding=2, hflip=True, random_erasing=0.5)
    a = training.augment_batch(x, cfg, torch.Generator().manual_seed(0))
    b = training.augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(training.augment_batch(x, AugmentConfig(name="none"),
                                              torch.Generator()), x)
    # Pure flips keep every pixel value: a flipped image is a permutation of the original.
    flip_only = AugmentConfig(name="light", crop_padding=0, hflip=True)
    f = training.augment_batch(x, flip_only, torch.Generator().manual_seed(1))
    assert torch.equal(f.sort(dim=-1).values, x.sort(dim=-1).values)


def test_models_build_from_every_config(make_cfg: Make) -> None:
    for name in ("mlp", "cnn", "resnet", "logreg"):
        net = build_model(make_cfg(f"model={name}").model).eval()
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
