"""End to end with real git, DVC and MLflow on the real-data fixture.

A project is driven like a user would: `dvc repro`, `dvc exp run -S`, a second `dvc repro`,
forced reruns, and (slow) the experiment queue. Each prepared state (after the first
`dvc repro`; after one `dvc exp run`) is built once per module and every test gets its own copy
of it, so any test can run alone, in any order, and may change its project freely.
Assertions cover the DVC outputs, the MLflow run tree (one pipeline run per invocation, one child
per executed stage), lineage by content hash through cached stages, and byte-reproducibility.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from deep_repro import config, tracking
from deep_repro.pipeline import STAGES

from .helpers import VENV_BIN, copy_project, make_project, project_env, run

# The stages that record an MLflow stage run (`validate` records none: nothing to track).
TRACKED = {name for name, spec in STAGES.items() if spec.tracked}


def dvc(project: Path, *args: str, check: bool = True) -> Any:
    return run(["dvc", *args], project, project_env(project), check=check)


def client_for(project: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("fashion-mnist")
    assert exp is not None
    return client, exp.experiment_id


def runs_of(client: MlflowClient, exp_id: str, kind: str) -> list[Any]:
    return client.search_runs(
        [exp_id],
        f"tags.`{tracking.TAG_KIND}` = '{kind}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )


def children(client: MlflowClient, exp_id: str, parent: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)
    return {r.data.tags[tracking.TAG_STAGE]: r for r in runs}


def assert_links_resolve(client: MlflowClient, run: Any) -> None:
    """Every input hash of a stage run points at a run that wrote exactly those bytes."""
    tags = run.data.tags
    inputs = {
        k[len(tracking.IN_PREFIX) :]: v for k, v in tags.items() if k.startswith(tracking.IN_PREFIX)
    }
    assert set(inputs) == set(STAGES[tags[tracking.TAG_STAGE]].deps)
    for path, md5 in inputs.items():
        producer = client.get_run(tags[tracking.UPSTREAM_PREFIX + path])
        assert producer.data.tags[tracking.OUT_PREFIX + path] == md5


@pytest.fixture(scope="module")
def repro_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh project after one `dvc repro` (do not modify: tests use `first_repro`)."""
    # The test project trains the (fast) logistic regression by default, so that
    # `dvc exp run -S model.C=...` works there as `-S model.lr=...` does on the real default.
    project = make_project(
        tmp_path_factory.mktemp("repro") / "project",
        edits={
            "conf/config.yaml": [("  - model: cnn", "  - model: logreg")],
            "conf/model/logreg.yaml": [("max_iter: 1000", "max_iter: 40")],
        },
    )
    dvc(project, "repro")
    return project


@pytest.fixture(scope="module")
def experiment_state(repro_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`repro_state` plus `dvc exp run -S model.C=0.5 -n c-half` (do not modify)."""
    project = copy_project(repro_state, tmp_path_factory.mktemp("experiment") / "project")
    dvc(project, "exp", "run", "-S", "model.C=0.5", "-n", "c-half")
    return project


@pytest.fixture
def first_repro(repro_state: Path, tmp_path: Path) -> Path:
    """This test's own copy of a project after exactly one `dvc repro`."""
    return copy_project(repro_state, tmp_path / "project")


@pytest.fixture
def experiment(experiment_state: Path, tmp_path: Path) -> Path:
    """This test's own copy of a project after one `dvc repro` and one `dvc exp run`."""
    return copy_project(experiment_state, tmp_path / "project")


# A whole new architecture, written the way docs/how-to/add-model.md says: its schema and builder
# appended to models/architectures.py; its values and search space in conf/.
TINY_ARCHITECTURE = """

class TinyConfig(TorchModelConfig):
    name: Literal["tiny"]
    hidden: Annotated[int, Field(ge=1)]

    def footprint(self) -> tuple[int, int]:
        return _linear(28 * 28, self.hidden) + _linear(self.hidden, NUM_CLASSES), 2 * self.hidden


@register(TinyConfig, trainer="torch")
def tiny(cfg: TinyConfig) -> nn.Sequential:
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, cfg.hidden), nn.ReLU(),
                         nn.Linear(cfg.hidden, NUM_CLASSES))
"""


def test_adding_a_model_touches_three_files_and_reruns_no_data_stage(first_repro: Path) -> None:
    """Issue 21: an architecture is one Python file's entry plus its two conf/ files, and the
    data stages neither import nor validate model code, so DVC reruns none of them (validate is
    listed because it always runs)."""
    root = first_repro

    def dirty() -> set[str]:
        out = run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout
        return {line[3:] for line in out.splitlines()}

    before = dirty()  # the outputs of the repro (this copy commits none of them)
    architectures = root / "src/deep_repro/models/architectures.py"
    architectures.write_text(architectures.read_text() + TINY_ARCHITECTURE)
    (root / "conf/model/tiny.yaml").write_text("name: tiny\nlr: 0.01\ndropout: 0.0\nhidden: 16\n")
    (root / "conf/search/tiny.yaml").write_text(
        "params:\n  model.hidden: {type: int, low: 8, high: 64, log: true}\n"
    )
    assert sorted(dirty() - before) == [
        "conf/model/tiny.yaml",
        "conf/search/tiny.yaml",
        "src/deep_repro/models/architectures.py",
    ]
    status = dvc(root, "status").stdout
    changed = {line[:-1] for line in status.splitlines() if line and not line[0].isspace()}
    assert changed == {"validate", "train", "postprocess", "evaluate"}, status
    # The new model is a choice the project's own code (scripts/ imports the copy's src/)
    # composes and validates, like the five registered before it.
    python = str(VENV_BIN / "python")
    run([python, "scripts/compose_params.py", "model=tiny"], root, project_env(root))
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["name"] == "tiny"
    run([python, "scripts/compose_params.py", "--check"], root, project_env(root))


def test_repro_produces_outputs_and_metrics(first_repro: Path) -> None:
    root = first_repro
    for stage in STAGES.values():
        for out in stage.outs:
            assert (root / out).is_file(), out
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    assert 0.6 < metrics["test"]["accuracy"] <= 1
    assert set(metrics["test"]) == {"accuracy", "ci95", "macro_f1"}  # the rest: details.json
    details = json.loads((root / "reports/eval/details.json").read_text())
    assert {"accuracy", "macro_f1", "top2_accuracy", "ece"} <= set(details["test"])
    # Test-time augmentation decided on validation (the default `auto`): the baked-in program
    # is the better of with/without the flip on val, and the report shows the evidence.
    pp = json.loads((root / "reports/postprocess.json").read_text())
    assert pp["tta_rule"] == "auto"
    candidates = {"none": pp["val_accuracy_without_tta"], "hflip": pp["val_accuracy_with_hflip"]}
    assert pp["val_accuracy_trained"] == candidates[pp["tta"]] == max(candidates.values())
    # The postprocess stage left predict's verified fast-start copy of the very same program.
    program_sha = hashlib.sha256((root / "models/inference.pt2").read_bytes()).hexdigest()
    assert (root / ".cache/programs" / program_sha / "graph.json").is_file()
    confusion = (root / "reports/eval/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 501
    shown = dvc(root, "metrics", "show", "--json").stdout
    assert "test" in shown
    # `dvc plots show` can draw the training curves (x: step) and the confusion matrix.
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)
    names = json.dumps(plots)
    assert "Loss per epoch" in names and "reports/eval/confusion.csv" in names


def test_one_pipeline_run_with_seven_linked_stage_runs(first_repro: Path) -> None:
    client, exp_id = client_for(first_repro)
    pipelines = runs_of(client, exp_id, "pipeline")
    assert len(pipelines) == 1
    parent = pipelines[0]
    stages = children(client, exp_id, parent.info.run_id)
    assert set(stages) == TRACKED
    for name, stage_run in stages.items():
        assert stage_run.info.status == "FINISHED", name
        tags = stage_run.data.tags
        assert tags["deep_repro.git.commit"] != "unknown"
        assert tags["deep_repro.uv_lock_sha256"] != "missing"
        assert tags["deep_repro.version.torch"] and tags["deep_repro.hostname"]
        assert tags["deep_repro.dvc_stage"] == name and tags["deep_repro.seed"] == "42"
        assert_links_resolve(client, stage_run)
    # The pipeline run is the comparison row: the config it used + headline metrics (a logreg
    # has no epochs or optimizer; tune.* configures `deep-repro tune` only).
    assert parent.data.params["model.name"] == "logreg"
    assert "data.subset" in parent.data.params and "train.num_threads" in parent.data.params
    assert not [
        k for k in parent.data.params if k.startswith(("train.epochs", "optimizer.", "tune."))
    ]
    assert parent.data.tags["mlflow.source.name"] == "dvc repro"
    assert stages["train"].data.tags["mlflow.source.name"] == "stages/train.py"
    # The thread count in force (what `num_threads: auto` would resolve to) is on the run.
    assert stages["train"].data.tags["num_threads"] == parent.data.params["train.num_threads"]
    parent = client.get_run(parent.info.run_id)
    assert {"val_accuracy", "test_accuracy", "test_macro_f1"} <= set(parent.data.metrics)
    # Datasets logged with content digests.
    train_inputs = client.get_run(stages["train"].info.run_id).inputs.dataset_inputs
    assert {d.dataset.name for d in train_inputs} == {"fashion-mnist-train", "fashion-mnist-val"}
    # The model was registered and judged (the fixture logreg is below the 0.842 baseline).
    version = client.get_model_version("fashion-mnist-classifier", "1")
    assert version.tags["validation_status"] == "rejected"
    assert "does not beat evaluate.baseline" in version.tags["validation_reason"]


def test_a_registered_version_says_who_registered_it(first_repro: Path) -> None:
    # MLflow 3.17's registry UI leaves "Created by" empty (create_model_version takes no user):
    # a tag and the description say who, and from which run (issue 21).
    client, _ = client_for(first_repro)
    (version,) = client.search_model_versions("name = 'fashion-mnist-classifier'")
    producer = client.get_run(version.run_id).data.tags
    assert producer["deep_repro.stage"] == "postprocess"
    assert version.tags["created_by"] == producer["deep_repro.user"]
    assert version.description == (
        f"Registered by {producer['deep_repro.user']} from the postprocess stage run "
        f"{version.run_id}."
    )


def test_second_repro_runs_nothing(first_repro: Path) -> None:
    client, exp_id = client_for(first_repro)
    before = len(client.search_runs([exp_id], max_results=1000))
    lock = (first_repro / "dvc.lock").read_bytes()
    out = dvc(first_repro, "repro").stdout
    # Only `validate` (always_changed: it checks this machine; records no MLflow run), whose
    # constant output reruns nothing after it.
    assert re.findall(r"Running stage '(\w+)'", out) == ["validate"], out
    assert len(client.search_runs([exp_id], max_results=1000)) == before
    assert (first_repro / "dvc.lock").read_bytes() == lock


def test_exp_run_reruns_only_downstream_and_keeps_lineage(experiment: Path) -> None:
    client, exp_id = client_for(experiment)
    pipelines = runs_of(client, exp_id, "pipeline")
    assert len(pipelines) == 2
    second = pipelines[1]
    assert second.data.tags["deep_repro.dvc_exp_name"] == "c-half"
    stages = children(client, exp_id, second.info.run_id)
    assert set(stages) == {"train", "postprocess", "evaluate"}
    first_download = children(client, exp_id, pipelines[0].info.run_id)["download"]
    chain = tracking.lineage_chain(client, stages["evaluate"].info.run_id)
    names = [r.data.tags[tracking.TAG_STAGE] for r in chain]
    # Every tracked stage but `analyze`, a report beside the chain that feeds no other stage.
    assert names[0] == "evaluate" and set(names) == TRACKED - {"analyze"}
    assert first_download.info.run_id in {r.info.run_id for r in chain}
    for stage_run in stages.values():
        assert_links_resolve(client, stage_run)
    shown = dvc(experiment, "exp", "show", "--json").stdout
    assert "c-half" in shown and "test" in shown


@pytest.mark.slow
def test_forced_retrain_of_a_torch_model_is_byte_identical(experiment: Path) -> None:
    # Same config + seed + machine -> the same checkpoint and inference model, byte for byte:
    # two forced reruns leave dvc.lock (md5 of every output) unchanged.
    params = config.compose(
        ["model=mlp", "model.hidden_sizes=[32]", "train.epochs=2"], experiment / "conf"
    )
    (experiment / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lock = experiment / "dvc.lock"
    dvc(experiment, "repro", "postprocess")
    before = lock.read_text()
    dvc(experiment, "repro", "-f", "-s", "train")
    dvc(experiment, "repro", "-f", "-s", "postprocess")
    assert lock.read_text() == before
    dvc(experiment, "exp", "apply", "c-half")  # back to the logreg experiment's workspace


@pytest.mark.slow
def test_champion_moves_only_for_a_better_validated_model(experiment: Path) -> None:
    client, _ = client_for(experiment)
    dvc(experiment, "exp", "run", "-S", "evaluate.baseline=0.5", "-n", "low-bar")
    champion = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
    assert champion.tags["validation_status"] == "validated"
    # Re-evaluating the same model (cached upstream) keeps it champion; nothing new registered.
    dvc(experiment, "exp", "run", "-S", "evaluate.baseline=0.55", "-n", "same-model")
    again = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
    assert again.version == champion.version


@pytest.mark.slow
def test_another_seed_keeps_the_split_and_is_paired_with_the_champion(experiment: Path) -> None:
    client, exp_id = client_for(experiment)
    tiny = ["-S", "model=mlp", "-S", "model.hidden_sizes=[32]", "-S", "train.epochs=2"]
    dvc(experiment, "exp", "run", *tiny, "-S", "evaluate.baseline=0.5", "-n", "seed-42")
    first = runs_of(client, exp_id, "pipeline")[-1]
    assert first.data.tags["gate_decision"] == "first"  # no validated champion before it
    dvc(experiment, "exp", "run", *tiny, "-S", "evaluate.baseline=0.5", "-S", "seed=7")
    latest = runs_of(client, exp_id, "pipeline")[-1]
    # `seed` retrains; the validation images (split.seed) stay, so the split is not rerun...
    assert set(children(client, exp_id, latest.info.run_id)) == {"train", "postprocess", "evaluate"}
    # ...and the gate pairs the new version with the champion image by image: the decision,
    # its p-value and both validation accuracies are on the pipeline run.
    metrics, tags = latest.data.metrics, latest.data.tags
    assert tags["gate_decision"] in ("kept", "promoted"), tags["validation_reason"]
    assert 0.0 < metrics["gate_p_value"] <= 1.0
    assert metrics["gate_champion_val_accuracy"] == first.data.metrics["val_accuracy"]
    assert f"McNemar p = {metrics['gate_p_value']:.3g}" in tags["validation_reason"]
    champion = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
    promoted = tags["gate_decision"] == "promoted"
    assert (
        champion.version == tags["model_version"]
        if promoted
        else champion.version != tags["model_version"]
    )
    # The leaderboard groups the two seeds of this config: mean ± std across seeds.
    board = run(["deep-repro", "leaderboard", "--by-seed"], experiment, project_env(experiment))
    row = next(line for line in board.stdout.splitlines() if "7,42" in line)
    assert re.search(r"0\.\d{4} ± 0\.\d{4}\s+0\.\d{4} ± 0\.\d{4}\s+2\s+7,42\s+mlp", row), row


@pytest.mark.slow
def test_hydra_experiment_config_runs_through_dvc(experiment: Path) -> None:
    # What `deep-repro tune` writes (conf/experiment/tuned_<model>.yaml) must be runnable as
    # `dvc exp run -S +experiment=...`, DVC composing it into params.yaml.
    (experiment / "conf/experiment/tiny.yaml").write_text("# @package _global_\nmodel:\n  C: 0.3\n")
    run(["git", "add", "conf/experiment/tiny.yaml"], experiment, project_env(experiment))
    run(["git", "commit", "-qm", "tiny experiment"], experiment, project_env(experiment))
    dvc(experiment, "exp", "run", "-S", "+experiment=tiny", "-n", "from-file")
    client, exp_id = client_for(experiment)
    latest = runs_of(client, exp_id, "pipeline")[-1]
    assert latest.data.tags["deep_repro.dvc_exp_name"] == "from-file"
    assert latest.data.params["model.C"] == "0.3"


def test_lineage_and_leaderboard_commands(experiment: Path) -> None:
    env = project_env(experiment)
    out = run(
        ["deep-repro", "lineage", "models:/fashion-mnist-classifier/1"], experiment, env
    ).stdout
    for stage in ("postprocess", "train", "split", "preprocess", "download"):
        assert f"[{stage}]" in out
    assert "reproduce: uv run deep-repro reproduce " in out and "md5" in out
    board = run(["deep-repro", "leaderboard"], experiment, env).stdout
    lines = board.splitlines()
    # Ranked by validation accuracy, each with its 95% interval; test is shown, never ranks.
    assert lines[0].split()[:4] == ["rank", "val_acc", "(ranks)", "test_acc"]
    assert len(lines) >= 4 and "logreg" in lines[2]
    assert re.search(r"^1\s+0\.\d{4} ± 0\.\d{4}\s+0\.\d{4} ± 0\.\d{4}\s", lines[2])


def test_stage_fails_fast_when_store_is_unreachable(experiment: Path) -> None:
    env = project_env(experiment) | {"MLFLOW_TRACKING_URI": "http://user:pw@127.0.0.1:9"}
    start = time.monotonic()
    proc = run(["python", "stages/evaluate.py"], experiment, env, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tracking store http://127.0.0.1:9 unreachable")
    assert "pw" not in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_queued_experiments_each_get_their_own_pipeline_run(experiment: Path) -> None:
    client, exp_id = client_for(experiment)
    before = {r.info.run_id for r in runs_of(client, exp_id, "pipeline")}
    dvc(experiment, "exp", "run", "--queue", "-S", "model.C=0.25", "-n", "q-one")
    dvc(experiment, "exp", "run", "--queue", "-S", "model.C=2.0", "-n", "q-two")
    # The queue's worker daemons inherit the starter's stdout: a pipe would keep
    # `dvc queue start` from returning until they exit, so they get a file instead.
    log_file = experiment.parent / "queue.log"
    with log_file.open("w") as sink:
        subprocess.run(
            ["dvc", "queue", "start", "-j", "2"],
            cwd=experiment,
            env=project_env(experiment),
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=True,
        )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = dvc(experiment, "queue", "status").stdout
            if "Running" not in status and "Queued" not in status:
                break
            time.sleep(5)
    finally:
        with log_file.open("a") as sink:
            subprocess.run(
                ["dvc", "queue", "stop"],
                cwd=experiment,
                env=project_env(experiment),
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
    assert "Failed" not in status, status
    for name in ("q-one", "q-two"):
        logs = dvc(experiment, "queue", "logs", name, check=False).stdout
        assert "database is locked" not in logs
    new = [r for r in runs_of(client, exp_id, "pipeline") if r.info.run_id not in before]
    assert sorted(r.data.tags.get("deep_repro.dvc_exp_name") for r in new) == ["q-one", "q-two"]
    for parent in new:
        stages = children(client, exp_id, parent.info.run_id)
        assert set(stages) == {"train", "postprocess", "evaluate"}
        for run_ in stages.values():
            assert run_.info.status == "FINISHED"
            assert_links_resolve(client, run_)
            # Artifacts land in the workspace's store, not in the vanished temp copy.
            assert str(experiment) in run_.info.artifact_uri
