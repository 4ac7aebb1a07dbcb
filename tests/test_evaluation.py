"""Metrics on hand-checkable inputs, and figures a person can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deep_repro import evaluation, files
from deep_repro.config import class_label


def _logits(pred: list[int], second: list[int], conf: float = 4.0) -> np.ndarray:
    out = np.zeros((len(pred), 10))
    for i, (p, s) in enumerate(zip(pred, second, strict=True)):
        out[i, p] = conf
        out[i, s] = conf / 2
    return out


def test_report_numbers() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    pred = [0, 0, 1, 0, 2, 2, 3, 3, 4, 1]
    second = [1, 1, 0, 1, 1, 1, 1, 1, 1, 4]
    report = evaluation.classification_report(y, _logits(pred, second))
    assert report.accuracy == pytest.approx(0.8)
    assert report.top2_accuracy == pytest.approx(1.0)
    assert report.confusion[1, 0] == 1 and report.confusion[4, 1] == 1
    assert report.precision[0] == pytest.approx(2 / 3)
    assert report.recall[1] == pytest.approx(0.5)
    f1_present = [2 * (2 / 3) / (2 / 3 + 1), 0.5, 1.0, 1.0, 2 * 0.5 / 1.5]
    assert report.macro_f1 == pytest.approx(sum(f1_present) / 10)
    # Every sample has the same confidence (one bin), so ECE = |accuracy - confidence|.
    confidence = float(evaluation.softmax(_logits(pred, second)).max(1)[0])
    assert 0.7 < confidence < 0.8
    assert report.ece == pytest.approx(0.8 - confidence)


def test_ece_of_a_perfectly_calibrated_model_is_zero() -> None:
    conf = np.full(100, 0.7)
    correct = np.arange(100) < 70
    ece, table = evaluation.expected_calibration_error(conf, correct)
    assert ece == pytest.approx(0.0)
    assert sum(row["count"] for row in table) == 100


def test_files_and_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    logits = rng.normal(size=(200, 10))
    report = evaluation.classification_report(y, logits)
    files.write_csv(tmp_path / "per_class.csv", evaluation.per_class_rows(report))
    lines = (tmp_path / "per_class.csv").read_text().splitlines()
    assert lines[0] == "class,precision,recall,f1,support" and len(lines) == 11
    rows = evaluation.prediction_rows(y, logits.argmax(1))
    assert set(rows[0]) == {"actual", "predicted"}
    images = rng.integers(0, 255, (200, 28, 28), dtype=np.uint8)
    _, bins = evaluation.expected_calibration_error(
        evaluation.softmax(logits).max(1), logits.argmax(1) == y
    )
    for name, fig in {
        "cm.png": evaluation.confusion_figure(report.confusion, "t"),
        "mis.png": evaluation.misclassified_figure(images, y, logits),
        "rel.png": evaluation.reliability_figure(bins, report.ece),
    }.items():
        files.save_figure(fig, tmp_path / name)
        first = (tmp_path / name).read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n"
        files.save_figure(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes() == first  # no timestamps: byte-reproducible


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Agresti & Coull's worked example: 0 successes in 10 -> upper bound 0.2775.
    lo, hi = evaluation.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = evaluation.wilson_interval(9235, 10000)
    assert lo == pytest.approx(0.91813, abs=1e-4) and hi == pytest.approx(0.92857, abs=1e-4)
    # Asymmetric near 1, never beyond it.
    lo, hi = evaluation.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)


def test_report_carries_the_interval_into_the_metrics_file() -> None:
    y = np.arange(200) % 10
    pred = y.copy()
    pred[:20] = (pred[:20] + 1) % 10
    report = evaluation.classification_report(y, np.eye(10)[pred] * 5)
    assert report.accuracy == pytest.approx(0.9)
    lo, hi = report.accuracy_ci95
    assert lo < 0.9 < hi and (lo, hi) == evaluation.wilson_interval(180, 200)
    summary = report.summary()
    assert set(summary) == {"accuracy", "ci95", "macro_f1"}
    assert summary["ci95"] == pytest.approx((hi - lo) / 2, abs=1e-4)
    assert report.headline("val")["val_accuracy_ci95_low"] == lo


def test_mcnemar_uses_only_discordant_images() -> None:
    a = np.array([True] * 90 + [False] * 10)
    assert evaluation.mcnemar_p_value(a, a) == 1.0
    b = a.copy()
    b[90:] = True  # B fixes A's 10 errors and breaks nothing: 10 discordant, all one way
    assert evaluation.mcnemar_p_value(a, b) == pytest.approx(2 * 0.5**10)
    assert evaluation.mcnemar_p_value(b, a) == pytest.approx(2 * 0.5**10)
    c = a.copy()
    c[90:95] = True
    c[:5] = False  # 5 fixed, 5 broken: no evidence either way
    assert evaluation.mcnemar_p_value(a, c) == 1.0
    with pytest.raises(ValueError, match="same images"):
        evaluation.mcnemar_p_value(a, a[:50])


def test_plot_tables_keep_class_order_and_drop_empty_bins() -> None:
    rows = evaluation.prediction_rows(np.array([9, 0]), np.array([0, 9]))
    assert rows == [
        {"actual": "9 Ankle boot", "predicted": "0 T-shirt/top"},
        {"actual": "0 T-shirt/top", "predicted": "9 Ankle boot"},
    ]
    labels = [class_label(i) for i in range(10)]
    assert labels == sorted(labels)  # alphabetical sorting (vega) == dataset order
    _, table = evaluation.expected_calibration_error(
        np.array([0.95, 0.97, 0.55]), np.array([True, True, False])
    )
    kept = evaluation.reliability_rows(table)
    assert [r["count"] for r in kept] == [1, 2] and all(r["count"] for r in kept)
