"""The data report (deep_repro.data.analysis, stage `analyze`) on the real fixture images: its
checks, counts checked against independent computations, the duplicate search, one-line errors,
byte-identical reruns, and one run of the stage through DVC and MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from deep_repro import data, tracking
from deep_repro.data import analysis as data_analysis
from deep_repro.errors import DataError
from deep_repro.pipeline import SPLIT_TEST, SPLIT_TRAIN_VAL, STAGES

from .helpers import make_project, project_env, run


def write_splits(root: Path, splits: data.Splits, **replace: np.ndarray) -> Path:
    """The split files as the split stage writes them, with some arrays replaced."""
    arrays = {
        "x_train": splits.x_train,
        "y_train": splits.y_train,
        "x_val": splits.x_val,
        "y_val": splits.y_val,
        "x_test": splits.x_test,
        "y_test": splits.y_test,
    } | replace
    data.save_arrays(root / SPLIT_TRAIN_VAL, **{k: arrays[k] for k in list(arrays)[:4]})
    data.save_arrays(root / SPLIT_TEST, x_test=arrays["x_test"], y_test=arrays["y_test"])
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_report_counts_match_independent_computations(splits: data.Splits, tmp_path: Path) -> None:
    root = write_splits(tmp_path, splits)
    report = data_analysis.analyze(data_analysis.load_parts(root), 10.0, 4)
    files = data_analysis.write_report(report, root)
    assert all((root / f).is_file() for f in files) and set(files) == set(STAGES["analyze"].outs)
    summary = json.loads((root / "reports/data/summary.json").read_text())
    sizes = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}
    assert summary["sizes"] == sizes == {"train": 1800, "val": 200, "test": 500}
    for name, labels in (("train", splits.y_train), ("val", splits.y_val), ("test", splits.y_test)):
        counts = summary["class_counts"][name]
        assert list(counts) == [f"{i} {n}" for i, n in enumerate(data.CLASS_NAMES)]
        assert list(counts.values()) == [int((labels == c).sum()) for c in range(10)]
        assert sum(counts.values()) == sizes[name]
        checked = summary["checks"]["splits"][name]
        assert checked["shape"] == [sizes[name], 28, 28] and checked["dtype"] == "uint8"
        assert checked["labels"] == list(range(10))
        assert 0 <= checked["pixel_range"][0] <= checked["pixel_range"][1] <= 255
    assert len(summary["checks"]["passed"]) == len(data_analysis.CHECKS)
    balance = rows(root / "reports/data/class_balance.csv")
    labels = [f"{i} {n}" for i, n in enumerate(data.CLASS_NAMES)]
    for name, counts in summary["class_counts"].items():
        mine = [r for r in balance if r["split"] == name]
        assert [r["class"] for r in mine] == labels
        assert [int(r["count"]) for r in mine] == list(counts.values())
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1, abs=1e-5)
    hist = rows(root / "reports/data/intensity_hist.csv")
    assert [int(r["intensity"]) for r in hist] == list(range(0, 256, 8))
    nonzero = splits.x_test[splits.x_test > 0]
    expected = np.histogram(nonzero, bins=np.arange(0, 257, 8))[0] / nonzero.size
    assert summary["background_share"]["test"] == pytest.approx(
        1 - nonzero.size / splits.x_test.size, abs=1e-6
    )
    assert [float(r["test"]) for r in hist] == pytest.approx(expected, abs=1e-6)
    assert [m for m in report.means["val"][3].ravel()[:5]] == pytest.approx(
        splits.x_val[splits.y_val == 3].mean(axis=0).ravel()[:5]
    )


def test_exact_and_near_duplicates_are_found_and_others_are_not(
    splits: data.Splits, tmp_path: Path
) -> None:
    x_test, rng = splits.x_test.copy(), np.random.default_rng(0)
    x_test[7] = splits.x_train[123]  # exact copy
    noise = rng.integers(-3, 4, size=(28, 28))
    x_test[11] = np.clip(splits.x_val[45].astype(int) + noise, 0, 255).astype(np.uint8)
    # A different image with the same brightness (passes the brightness band): upside down.
    x_test[13] = splits.x_train[200][::-1]
    before = data_analysis.analyze(data_analysis.load_parts(write_splits(tmp_path, splits)), 3, 8)
    root = write_splits(tmp_path, splits, x_test=x_test)
    report = data_analysis.analyze(data_analysis.load_parts(root), 3.0, 8)
    dup = report.summary["duplicates"]
    assert dup["n_exact"] == before.summary["duplicates"]["n_exact"] + 1
    found = {(e["test_index"], e["split"], e["index"]): e["rms"] for e in dup["examples"]}
    assert found[(7, "train", 123)] == 0
    rms = np.sqrt(((x_test[11].astype(int) - splits.x_val[45].astype(int)) ** 2).mean())
    assert found[(11, "val", 45)] == pytest.approx(rms, abs=1e-4) and 0 < rms <= 3
    assert dup["n_near"] == before.summary["duplicates"]["n_near"] + 2
    assert dup["examples"][0]["rms"] == 0  # sorted by distance
    assert 13 not in {e["test_index"] for e in dup["examples"]}
    flipped = data_analysis.find_duplicates(splits.x_train[200:201], x_test[13:14], 10.0)
    assert len(flipped.test) == 0 and flipped.n_exact == 0


def test_pooled_search_equals_brute_force(splits: data.Splits) -> None:
    # The candidate filters (brightness band, pooled distance) are lower bounds: the result must
    # equal an exhaustive full-resolution search.
    ref, test, threshold = splits.x_train[:600], splits.x_test[:200], 40.0
    found = data_analysis.find_duplicates(ref, test, threshold)
    ref32 = ref.reshape(600, -1).astype(np.int32)
    rms = np.stack([np.sqrt(((t.ravel() - ref32) ** 2).mean(1)) for t in test.astype(np.int32)])
    nearest = rms.argmin(axis=1)  # lowest index among ties, as the search breaks them
    within = np.flatnonzero(rms[np.arange(200), nearest] <= threshold)
    assert len(within) > 10  # the threshold is loose enough that the comparison means something
    assert dict(zip(found.test.tolist(), found.reference.tolist(), strict=True)) == {
        int(i): int(nearest[i]) for i in within
    }
    assert found.rms == pytest.approx(np.sort(rms[within, nearest[within]]))


@pytest.mark.parametrize(
    ("key", "bad", "message"),
    [
        (
            "y_val",
            "label12",
            r"^data/split/train_val\.npz: y_val holds label 12, expected labels 0\.\.9$",
        ),
        (
            "x_test",
            "shape",
            r"^data/split/test\.npz: x_test has shape \(500, 14, 56\), expected \(n, 28, 28\)",
        ),
        ("x_train", "float", r"^data/split/train_val\.npz: x_train has dtype float32, expected"),
        ("y_test", "missing", r"^data/split/test\.npz: y_test has no image of class \[9\]"),
    ],
)
def test_a_failed_check_is_one_line_naming_file_and_expectation(
    splits: data.Splits, tmp_path: Path, key: str, bad: str, message: str
) -> None:
    array = getattr(splits, key).copy()
    if bad == "label12":
        array[3] = 12
    elif bad == "shape":
        array = array.reshape(len(array), 14, 56)
    elif bad == "float":
        array = array.astype(np.float32)
    else:
        array[array == 9] = 8
    root = write_splits(tmp_path, splits, **{key: array})
    with pytest.raises(DataError, match=message) as info:
        data_analysis.load_parts(root)
    assert "\n" not in str(info.value)


def test_rerun_writes_byte_identical_files(splits: data.Splits, tmp_path: Path) -> None:
    contents = []
    for attempt in ("a", "b"):
        root = write_splits(tmp_path / attempt, splits)
        report = data_analysis.analyze(data_analysis.load_parts(root), 10.0, 12)
        files = data_analysis.write_report(report, root)
        contents.append({f: (root / f).read_bytes() for f in files})
    assert contents[0] == contents[1]


@pytest.mark.slow  # four upstream stages first: about a minute, two on a busy machine
def test_stage_runs_through_dvc_beside_train_and_logs_to_mlflow(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    env = project_env(project)
    out = run(["dvc", "repro", "analyze"], project, env).stdout
    assert "Running stage 'analyze'" in out and "Running stage 'train'" not in out
    summary = json.loads((project / "reports/data/summary.json").read_text())
    assert summary["sizes"] == {"train": 1800, "val": 200, "test": 500}
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fashion-mnist")
    assert exp is not None
    query = f"tags.`{tracking.TAG_STAGE}` = 'analyze'"
    (stage_run,) = client.search_runs([exp.experiment_id], query)
    metrics = stage_run.data.metrics
    assert metrics["n_exact_duplicates"] == summary["duplicates"]["n_exact"]
    assert metrics["n_near_duplicates"] == summary["duplicates"]["n_near"]
    assert metrics["train_size"] == 1800 and metrics["test_size"] == 500
    logged = {a.path for a in client.list_artifacts(stage_run.info.run_id, "data_report")}
    assert logged == {f"data_report/{Path(f).name}" for f in data_analysis.REPORT_FILES}
    # The plots are drawable, and the report adds no DVC metric.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project, env).stdout)
    assert "Class balance per split" in json.dumps(plots)
    assert "reports/data" not in run(["dvc", "metrics", "show"], project, env).stdout
    assert "analyze" not in run(["dvc", "status", "analyze"], project, env).stdout
