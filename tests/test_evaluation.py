"""Metrics on hand-checkable inputs, and figures a person can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deep_repro import evaluation


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
    assert 0 <= report.ece <= 1


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
    evaluation.write_csv(tmp_path / "per_class.csv", evaluation.per_class_rows(report))
    lines = (tmp_path / "per_class.csv").read_text().splitlines()
    assert lines[0] == "class,precision,recall,f1,support" and len(lines) == 11
    rows = evaluation.prediction_rows(y, logits.argmax(1))
    assert set(rows[0]) == {"actual", "predicted"}
    images = rng.integers(0, 255, (200, 28, 28), dtype=np.uint8)
    _, bins = evaluation.expected_calibration_error(evaluation.softmax(logits).max(1),
                                                    logits.argmax(1) == y)
    for name, fig in {"cm.png": evaluation.confusion_figure(report.confusion, "t"),
                      "mis.png": evaluation.misclassified_figure(images, y, logits),
                      "rel.png": evaluation.reliability_figure(bins, report.ece)}.items():
        evaluation.save_figure(fig, tmp_path / name)
        first = (tmp_path / name).read_bytes()
        assert first[:8] == b"\x89PNG\r\n\x1a\n"
        evaluation.save_figure(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes() == first  # no timestamps: byte-reproducible
