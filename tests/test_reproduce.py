"""`deep-repro reproduce` (issue 23): a recorded result rerun in a clean clone, and a verdict.

Real git (a bare remote the author pushes to), DVC (`dvc repro` in the author's checkout and in
the clone) and MLflow (the author's sqlite store). One author pipeline (fixture data, 1 epoch)
serves every test; each test that alters the store works on its own copy. The clones share one
cache (`DEEP_REPRO_CACHE`), so the environment of the commit's uv.lock is built once.

The fast tests check the verdict rules and the record file's schema without running anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from deep_repro.evaluation.predictions import Predictions, SplitPredictions
from deep_repro.reproduction import record as records
from deep_repro.reproduction import verdict as v
from tests.helpers import FIXTURE, VENV_BIN, copy_project, make_project, project_env, run

# --------------------------------------------------------------------------- verdict rules (fast)


def _record(stages: tuple[str, ...] = ("split", "train", "evaluate")) -> records.Record:
    return records.Record(
        ref="r",
        run_id="r",
        experiment="e",
        commit="0" * 40,
        remote="/x.git",
        dirty=False,
        uv_lock_sha256="u",
        params={},
        stages=[
            records.StageRecord(
                stage=s,
                run_id=s,
                lock=records.LockEntry(cmd=s, deps=[], params={}, outs=[]),
                metrics={},
                platform={},
            )
            for s in stages
        ],
    )


def _result(stage: str, equal: bool, platform: list[str] | None = None) -> v.StageResult:
    out = {"path": f"{stage}.out", "recorded": "a", "reproduced": "a" if equal else "b"}
    return v.StageResult(stage, 1.0, [{**out, "equal": equal}], None, platform or [])


def _predictions(predicted: np.ndarray, labels: np.ndarray) -> Predictions:
    return Predictions(
        {
            "val": SplitPredictions("img-val", labels, predicted),
            "test": SplitPredictions("img-test", labels, predicted),
        }
    )


LABELS = np.arange(1000) % 10
AVX = ["CPU kernels torch dispatches to AVX512 vs AVX2"]


def test_every_md5_equal_is_bit_identical() -> None:
    results = [_result(s, True) for s in ("split", "train", "evaluate")]
    got = v.decide(_record(), results, None, None, v.Thresholds())
    assert (got.verdict, got.exit_code) == (v.BIT_IDENTICAL, 0)


def test_a_data_stage_must_be_bit_identical_even_on_another_platform() -> None:
    got = v.decide(_record(), [_result("split", False, AVX)], None, None, v.Thresholds())
    assert (got.verdict, got.first_difference, got.exit_code) == (v.NOT_REPRODUCED, "split", 3)
    assert not v.may_continue(_result("split", False, AVX))


def test_train_bytes_differ_on_the_same_platform_is_not_reproduced() -> None:
    results = [_result("split", True), _result("train", False)]
    got = v.decide(_record(), results, None, None, v.Thresholds())
    assert (got.verdict, got.first_difference) == (v.NOT_REPRODUCED, "train")
    assert "same platform" in got.reason


def test_another_platform_needs_all_three_checks() -> None:
    """Agreement, accuracy margin and McNemar: each failing alone refuses equivalence."""
    results = [_result("split", True), _result("train", False, AVX), _result("evaluate", False)]
    rec = _predictions(LABELS.copy(), LABELS)
    near = LABELS.copy()
    near[:4] = (near[:4] + 1) % 10  # 4 of 1000 images change: 99.6% agree, -0.4 points
    got = v.decide(_record(), results, _predictions(near, LABELS), rec, v.Thresholds())
    assert (got.verdict, got.exit_code, got.first_difference) == (v.EQUIVALENT, 0, "train")
    assert got.explanation == [f"train: {AVX[0]}"]
    assert got.statistics["val"]["agreement"] == pytest.approx(0.996)

    far = LABELS.copy()
    far[:30] = (far[:30] + 1) % 10  # 97% agree, 3 points worse, McNemar p ~ 1e-9
    got = v.decide(_record(), results, _predictions(far, LABELS), rec, v.Thresholds())
    assert got.verdict == v.NOT_REPRODUCED
    assert "agreement 0.9700 < 0.98" in got.reason and "McNemar" in got.reason
    # The same predictions pass a looser agreement but still fail on accuracy and McNemar.
    loose = v.Thresholds(min_agreement=0.9)
    got = v.decide(_record(), results, _predictions(far, LABELS), rec, loose)
    assert got.verdict == v.NOT_REPRODUCED and "agreement" not in got.reason

    # Swapped errors: accuracy identical, McNemar p = 1, but only 94% agreement.
    swapped, base = LABELS.copy(), LABELS.copy()
    swapped[:30] = (swapped[:30] + 1) % 10
    base[30:60] = (base[30:60] + 1) % 10
    got = v.decide(
        _record(),
        results,
        _predictions(swapped, LABELS),
        _predictions(base, LABELS),
        v.Thresholds(),
    )
    assert got.verdict == v.NOT_REPRODUCED and got.statistics["val"]["mcnemar_p"] == 1.0
    assert got.reason.endswith("test: agreement 0.9400 < 0.98; val: agreement 0.9400 < 0.98")


def test_no_recorded_predictions_cannot_be_equivalent() -> None:
    results = [_result("train", False, AVX), _result("evaluate", False)]
    got = v.decide(_record(("train", "evaluate")), results, None, None, v.Thresholds())
    assert got.verdict == v.NOT_REPRODUCED and "no recorded per-image predictions" in got.reason


def test_a_record_file_is_checked_field_by_field(tmp_path: Path) -> None:
    good = _record()
    good.save(tmp_path / "r.json")
    assert records.load(tmp_path / "r.json") == good
    body = json.loads(good.to_bytes())
    body["stages"][0]["lock"]["outs"] = [{"path": "x", "md5": "not-an-md5"}]
    (tmp_path / "bad.json").write_text(json.dumps(body))
    with pytest.raises(records.DeepReproError, match=r"bad.json: record field stages.0.lock"):
        records.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(records.DeepReproError, match="not a record file"):
        records.load(tmp_path / "other.json")


# --------------------------------------------------------------------------- real reruns (slow)

# Scales every training loss by 1 + 2^-20 in the train stage only: the float sums of training
# change in their last bits, the predictions (almost) not. Injected from outside the project
# (Python imports `sitecustomize` from PYTHONPATH at start-up), the way a different CPU's
# kernels would change them.
PERTURB = """
import sys
if sys.argv and sys.argv[0].endswith("stages/train.py"):
    import torch
    _backward = torch.Tensor.backward
    def _perturbed(self, *args, **kwargs):
        return _backward(self * (1 + 2 ** -20), *args, **kwargs)
    torch.Tensor.backward = _perturbed
"""


def _env(project: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = project_env(project)
    env["DEEP_REPRO_CACHE"] = str(cache)
    env.update(extra)
    return env


def _store(project: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _stage_run(client: MlflowClient, stage: str) -> Any:
    (found,) = client.search_runs(
        [client.get_experiment_by_name("fashion-mnist").experiment_id],
        filter_string=f"tags.`deep_repro.stage` = '{stage}'",
    )
    return found


def _reproduce(
    cwd: Path, env: dict[str, str], *args: str, uri: str | None = None
) -> tuple[int, str, dict[str, Any]]:
    if uri:
        env = {**env, "MLFLOW_TRACKING_URI": uri}
    out = cwd / "report"
    done = run(
        [str(VENV_BIN / "deep-repro"), "reproduce", *args, "--out", str(out)],
        cwd,
        env,
        check=False,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return done.returncode, done.stdout + done.stderr, report


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory, env_cache: Path) -> dict[str, Path]:
    """An author's checkout after one pushed commit and one `dvc repro` (1 epoch, fixture data),
    the bare remote, and the cache every reproduction shares (the session's: one venv)."""
    base = tmp_path_factory.mktemp("reproduce")
    remote = base / "remote.git"
    run(["git", "init", "--bare", "-q", str(remote)], base)
    # The author's data mirror: a directory a reviewer's machine may not have.
    mirror = shutil.copytree(FIXTURE, base / "mirror")
    project = make_project(
        base / "author", edits={"conf/config.yaml": [("  epochs: 15", "  epochs: 1")]}
    )
    env = project_env(project)
    for name in ("conf/config.yaml", "params.yaml"):
        text = (project / name).read_text()
        (project / name).write_text(text.replace(FIXTURE.as_uri(), mirror.as_uri()))
    # ... and the DVC remote the project names (committed in .dvc/config), which it pushes to.
    run(["dvc", "remote", "add", "-d", "store", str(base / "dvc-store")], project, env)
    run(["git", "commit", "-qam", "data: the author's mirror and DVC remote"], project, env)
    run(["git", "remote", "add", "origin", str(remote)], project, env)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], project, env)
    run(["dvc", "repro"], project, env)
    run(["dvc", "push", "-q"], project, env)
    return {
        "project": project,
        "remote": remote,
        "cache": env_cache,
        "base": base,
        "mirror": mirror,
    }


@pytest.fixture
def copied(author: dict[str, Path], tmp_path: Path) -> tuple[Path, MlflowClient, str]:
    """This test's own copy of the author's checkout and store, free to alter."""
    project = copy_project(author["project"], tmp_path / "author")
    return (project, *_store(project))


def _alter_artifact(client: MlflowClient, run_id: str, name: str, edit: Any) -> None:
    """Rewrite a logged artifact in place in the (local) artifact store."""
    root = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    path = root / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.slow
def test_a_record_file_is_reproduced_bit_identical_without_the_authors_store(
    author: dict[str, Path], tmp_path: Path
) -> None:
    """A reviewer has git, the DVC remote and the record file: no access to the author's
    MLflow, nor to the author's data mirror (the raw files come from the DVC remote, by the
    recorded md5). The reproduction writes nothing to the author's store."""
    project = author["project"]
    client, _ = _store(project)
    evaluate = _stage_run(client, "evaluate")
    before = (
        len(client.search_runs([evaluate.info.experiment_id])),
        client.search_model_versions(""),
    )
    record = tmp_path / "record.json"
    run(
        [str(VENV_BIN / "deep-repro"), "lineage", evaluate.info.run_id, "--export", str(record)],
        project,
        project_env(project),
    )
    reviewer = tmp_path / "reviewer"
    env = _env(project, author["cache"])
    run(["git", "clone", "-q", str(author["remote"]), str(reviewer)], tmp_path, env)
    hidden = author["mirror"].rename(author["base"] / "mirror-hidden")
    try:
        code, out, report = _reproduce(reviewer, env, "--record", str(record))
    finally:
        hidden.rename(author["mirror"])
    assert code == 0, out
    assert report["reproduction"]["data_source"] == "DVC remote"
    assert "bit-identical: all 6 stages: every output md5 as recorded" in out, out
    assert [s["stage"] for s in report["stages"]] == [
        "download", "preprocess", "split", "train", "postprocess", "evaluate"
    ]  # fmt: skip
    assert "dvc pull download  # no recorded mirror reachable" in report["reproduction"]["commands"]
    assert all(o["equal"] for s in report["stages"] for o in s["outputs"])
    assert report["statistics"]["test"]["agreement"] == 1.0
    # No side effect on the original: no run, no model version, no alias moved.
    after = (
        len(client.search_runs([evaluate.info.experiment_id])),
        client.search_model_versions(""),
    )
    assert [before[0], len(before[1])] == [after[0], len(after[1])]
    # The reproduction run went to the reviewer's own store, linked to the original.
    mine, _ = _store(reviewer)
    (rep,) = mine.search_runs([mine.get_experiment_by_name("reproductions").experiment_id])
    assert rep.data.tags["deep_repro.reproduces"] == evaluate.info.run_id
    assert rep.data.tags["deep_repro.verdict"] == "bit-identical"
    assert rep.data.tags["deep_repro.recorded_platform.cpu_capability"]
    assert not list((author["cache"] / "workspaces").iterdir())  # the clone is removed


@pytest.mark.slow
def test_an_altered_output_md5_is_not_reproduced_and_names_the_stage(
    author: dict[str, Path], copied: tuple[Path, MlflowClient, str], tmp_path: Path
) -> None:
    """The split run's recorded md5 of data/split/test.npz altered (tag and lock entry): the
    rerun stops at split (a data stage: nothing later can repair it), exit 3."""
    project, client, uri = copied
    split = _stage_run(client, "split")
    fake = "0" * 32
    client.set_tag(split.info.run_id, "deep_repro.out.data/split/test.npz", fake)

    def edit(lock: dict[str, Any]) -> dict[str, Any]:
        for out in lock["outs"]:
            if out["path"] == "data/split/test.npz":
                out["md5"] = fake
        return lock

    _alter_artifact(client, split.info.run_id, "dvc_lock_entry.json", edit)
    code, out, report = _reproduce(
        tmp_path, _env(project, author["cache"]), split.info.run_id, uri=uri
    )
    assert code == 3, out
    assert report["verdict"] == "not reproduced" and report["first_difference"] == "split"
    assert "split: 1 of 2 outputs differ (data/split/test.npz)" in report["reason"]
    assert [s["stage"] for s in report["stages"]] == ["download", "preprocess", "split"]
    # Only one of the two records altered: refused as inconsistent (exit 2), nothing run.
    client.set_tag(split.info.run_id, "deep_repro.out.data/split/test.npz", "1" * 32)
    code, out, _ = _reproduce(tmp_path, _env(project, author["cache"]), split.info.run_id, uri=uri)
    assert code == 2 and "disagree: the record was altered" in out, out


@pytest.mark.slow
def test_a_perturbed_train_on_another_platform_is_equivalent_and_on_this_one_is_not(
    author: dict[str, Path], copied: tuple[Path, MlflowClient, str], tmp_path: Path
) -> None:
    project, client, uri = copied
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(PERTURB)
    env = _env(project, author["cache"], PYTHONPATH=str(inject))
    evaluate = _stage_run(client, "evaluate")

    # The same platform: different checkpoint bytes are not explained by anything.
    code, out, report = _reproduce(tmp_path, env, evaluate.info.run_id, uri=uri)
    assert code == 3, out
    assert report["first_difference"] == "train" and "same platform" in report["reason"]
    assert [s["stage"] for s in report["stages"]][-1] == "train"  # decided: no further stage

    # The train run recorded on an AVX-512 machine: the same perturbation is now explained.
    train = _stage_run(client, "train")
    here = train.data.tags["deep_repro.platform.cpu_capability"]
    client.set_tag(train.info.run_id, "deep_repro.platform.cpu_capability", "AVX512_TEST")
    code, out, report = _reproduce(tmp_path, env, evaluate.info.run_id, uri=uri)
    assert code == 0, out
    assert report["verdict"] == "statistically equivalent", report["reason"]
    assert report["first_difference"] == "train"
    assert report["explanation"] == [
        f"train: CPU kernels torch dispatches to AVX512_TEST vs {here}"
    ]
    for split in ("val", "test"):
        stats = report["statistics"][split]
        assert stats["agreement"] >= 0.98 and stats["mcnemar_p"] >= 0.05
    assert "explained by train: CPU kernels" in out
    train_outputs = next(s for s in report["stages"] if s["stage"] == "train")["outputs"]
    assert not next(o for o in train_outputs if o["path"] == "models/checkpoint.pt")["equal"]
    (rep,) = client.search_runs(
        [client.get_experiment_by_name("reproductions").experiment_id],
        filter_string="tags.`deep_repro.verdict` = 'statistically equivalent'",
    )
    assert rep.data.tags["deep_repro.first_difference"] == "train"
    assert rep.data.metrics["val_agreement"] >= 0.98


@pytest.mark.slow
def test_a_dirty_run_and_an_unpushed_commit_are_refused_in_one_line(
    author: dict[str, Path], copied: tuple[Path, MlflowClient, str], tmp_path: Path
) -> None:
    project, client, uri = copied
    train = _stage_run(client, "train")
    env = _env(project, author["cache"])

    # Data at no reachable mirror and not in the DVC remote (an empty one given instead of
    # the commit's): refused before any stage runs.
    empty = tmp_path / "empty-dvc-remote"
    empty.mkdir()
    hidden = author["mirror"].rename(author["base"] / "mirror-hidden")
    try:
        code, out, _ = _reproduce(
            tmp_path, env, train.info.run_id, "--dvc-remote", str(empty), uri=uri
        )
    finally:
        hidden.rename(author["mirror"])
    assert code == 2, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert f"the raw data is at no reachable recorded mirror ({author['mirror'].as_uri()})" in line
    assert "[1/" not in out  # no stage ran

    client.set_tag(train.info.run_id, "deep_repro.git.dirty", "true")
    client.set_tag(train.info.run_id, "deep_repro.git.changed", "src/deep_repro/training/loop.py")
    code, out, _ = _reproduce(tmp_path, env, train.info.run_id, uri=uri)
    assert code == 2, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "uncommitted changes (src/deep_repro/training/loop.py)" in line
    client.set_tag(train.info.run_id, "deep_repro.git.dirty", "false")

    # A commit made (and the run recorded at it) but never pushed.
    (project / "NOTES.md").write_text("local only\n")
    run(["git", "add", "NOTES.md"], project, env)
    run(["git", "commit", "-qm", "local"], project, env)
    local = run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
    client.set_tag(train.info.run_id, "deep_repro.git.commit", local)
    client.set_tag(train.info.run_id, "deep_repro.dvc_exp_name", "keen-lamb")
    code, out, _ = _reproduce(tmp_path, env, train.info.run_id, uri=uri)
    assert code == 2, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert f"commit {local[:12]} is not in {author['remote']}" in line
    assert "`git push`" in line and "`dvc exp push origin keen-lamb`" in line
    assert not (tmp_path / "report").exists()
    shutil.rmtree(tmp_path / "author")
