"""Tables people can read: `dvc metrics show` and `dvc exp show` on a real project, and the
plots page that `dvc plots show` writes.

The project is the fixture project of tests/test_pipeline.py after one `dvc repro` (logistic
regression), driven with the real DVC CLI at a terminal width of 120 columns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .helpers import make_project, project_env, run

WIDTH = 120


def dvc(project: Path, *args: str) -> str:
    env = {**project_env(project), "COLUMNS": str(WIDTH), "LINES": "50"}
    return run(["dvc", *args], project, env).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(
        tmp_path_factory.mktemp("tables") / "project",
        edits={
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 40")],
        },
    )
    dvc(root, "repro")
    run(["git", "add", "-A"], root, project_env(root))
    run(["git", "commit", "-qm", "first repro"], root, project_env(root))
    return root


def widest(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


@pytest.mark.slow
def test_metrics_files_hold_only_the_summary(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    for part in metrics.values():
        assert set(part) == {"accuracy", "ci95", "macro_f1"}
    details = json.loads((project / "reports/eval/details.json").read_text())
    assert {"top2_accuracy", "ece", "accuracy_ci95_low"} <= set(details["test"])
    rows = (project / "reports/eval/reliability.csv").read_text().splitlines()
    assert all(",0," not in row.split("count", 1)[-1] for row in rows[1:])  # no empty bins


@pytest.mark.slow
def test_metrics_and_exp_show_fit_120_columns(project: Path) -> None:
    shown = dvc(project, "metrics", "show")
    assert widest(shown) <= WIDTH, shown
    for column in ("test.accuracy", "test.macro_f1", "val.accuracy", "val.macro_f1"):
        assert column in shown
    assert "reports/train/metrics.json" not in shown and "postprocess" not in shown
    # `--only-changed` (the README's advice) needs something that changed: one experiment.
    dvc(project, "exp", "run", "-S", "model.C=0.5", "-n", "c-half")
    table = dvc(project, "exp", "show", "--only-changed", "--no-pager")
    assert widest(table) <= WIDTH, table
    header = " ".join(table.splitlines()[:4])
    for column in ("test.accuracy", "test.macro_f1", "val.accuracy", "val.macro_f1"):
        assert column in header or column.replace("test.", "").replace("val.", "") in header


@pytest.mark.slow
def test_exp_diff_still_shows_metric_differences(project: Path, tmp_path: Path) -> None:
    dvc(project, "exp", "run", "-S", "model.C=0.05", "-n", "small-c")
    diff = dvc(project, "exp", "diff", "HEAD", "small-c")
    assert re.search(r"reports/metrics\.json\s+test\.accuracy", diff), diff


@pytest.mark.slow
def test_plots_page_loads_no_script_from_the_network(project: Path) -> None:
    """`.dvc/config` plots.html_template inlines vega: offline the charts still render."""
    dvc(project, "plots", "show")
    page = (project / "dvc_plots/index.html").read_text()
    assert "vegaEmbed(" in page and "vega-lite" in page
    sources = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", page, flags=re.I)
    assert not [s for s in sources if s.lower().startswith(("http:", "https:", "//"))], sources
    status = run(["git", "status", "--porcelain"], project, project_env(project)).stdout
    assert "dvc_plots" not in status  # generated output, git-ignored
