"""Hyperparameter search: real Optuna studies (journal files), real MLflow (sqlite in a tmp dir),
real fixture images, a tiny MLP trained for two epochs per trial."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from deep_repro import config, data, tracking, tuning
from deep_repro.errors import ConfigError, DataError, DeepReproError
from deep_repro.files import file_digest

from .helpers import REPO, fixture_overrides

EXPERIMENT = "fashion-mnist"


# A tiny, fast space that still has every kind of parameter: a log-scale float, an architecture
# choice (lists), a config group and a parameter conditional on it.
def tuning_project(root: Path, splits: data.Splits) -> Path:
    """conf/ (no experiment files, the tiny MLP space), dvc.yaml and the split file at `root`."""
    shutil.copytree(REPO / "conf", root / "conf")
    experiments = root / "conf/experiment"
    experiments.mkdir(exist_ok=True)
    for old in experiments.glob("*.yaml"):
        old.unlink()
    (root / "conf/search/mlp.yaml").write_text(TINY_SPACE)
    (root / "dvc.yaml").write_text("stages: {}\n")
    data.save_arrays(
        root / tuning.SPLIT_FILE,
        x_train=splits.x_train,
        y_train=splits.y_train,
        x_val=splits.x_val,
        y_val=splits.y_val,
    )
    return root


TINY_SPACE = """\
params:
  model.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  model.hidden_sizes: {type: categorical, choices: [[32], [48, 32]]}
  optimizer: {type: categorical, choices: [adamw, sgd]}
  optimizer.momentum: {type: float, low: 0.8, high: 0.95, when: {optimizer: sgd}}
"""
BASE = ["model=mlp", "train.batch_size=64", "train.num_threads=1", "tune.epochs=2"]


@pytest.fixture
def project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, splits: data.Splits, tracking_env: str
) -> Path:
    """A minimal project: conf/ (with the tiny MLP space), dvc.yaml, and the DVC split file."""
    root = tuning_project(tmp_path / "project", splits)
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return root


def journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def load_study(
    root: Path, name: str = "tune-mlp", storage: str = "optuna/journal.log"
) -> optuna.Study:
    """A study from a journal file (relative to the project) or an Optuna database URL."""
    return optuna.load_study(
        study_name=name, storage=storage if "://" in storage else journal(root / storage)
    )


def runs(uri: str, kind: str) -> list[Any]:
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = '{kind}'",
        max_results=1000,
    )


def without_tune(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "tune"}


# --------------------------------------------------------------------------- the happy path
def test_study_tracks_exports_and_resumes(project: Path, tracking_env: str) -> None:
    # Base overrides as a user would pass them: the fixture data settings end up in the
    # experiment file too, and train.epochs (5) must not be confused with tune.epochs (2).
    base = [o for o in fixture_overrides() if not o.startswith(("train.epochs", "tune."))]
    base += [*BASE, "train.epochs=5"]
    md5 = file_digest(project / tuning.SPLIT_FILE)
    client, exp_id = tracking.connect(tracking_env, EXPERIMENT)
    # The split stage's run, as the pipeline would have recorded it: trials must link to it.
    producer = client.create_run(
        exp_id, tags={tracking.TAG_KIND: "stage", f"{tracking.OUT_PREFIX}{tuning.SPLIT_FILE}": md5}
    ).info.run_id

    result = tuning.run_study([*base, "tune.n_trials=3"])

    assert result.n_trials == 3 and result.states == {"COMPLETE": 3}
    study = load_study(project)
    assert len(study.trials) == 3 and study.best_trial.number == result.best_trial
    # ---- the experiment file: only differences, model pinned, no tune section
    exp_file = project / "conf/experiment/tuned_mlp.yaml"
    assert result.experiment_file == exp_file
    text = exp_file.read_text()
    assert text.startswith("# @package _global_\n")
    written = yaml.safe_load(text)
    assert written["defaults"][0] == {"override /model": "mlp"}
    assert "tune" not in written and "tracking" not in written
    assert "seed" not in written and "split" not in written  # unchanged keys are left out
    best = study.best_trial
    assert result.best_overrides == best.user_attrs[tuning.ATTR_OVERRIDES]
    best_cfg = config.compose([*base, *result.best_overrides])
    applied = config.compose(["+experiment=tuned_mlp"])
    assert without_tune(applied) == without_tune(best_cfg)
    assert applied["train"]["epochs"] == 5  # tune.epochs did not leak
    assert applied["model"]["hidden_sizes"] == result.best_params["model.hidden_sizes"]
    assert isinstance(result.best_params["model.hidden_sizes"], list)  # real value, not label
    config.validate(applied)
    # ---- MLflow: one study run, one child run per trial
    (study_run,) = runs(tracking_env, "study")
    assert study_run.info.run_id == result.study_run_id
    trials = runs(tracking_env, "trial")
    assert len(trials) == 3
    for run in trials:
        tags = run.data.tags
        assert tags[tracking.TAG_PARENT] == study_run.info.run_id
        assert tags[tuning.TAG_TRIAL_STATE] == "COMPLETE" and run.info.status == "FINISHED"
        assert tags[f"{tracking.IN_PREFIX}{tuning.SPLIT_FILE}"] == md5
        assert tags[f"{tracking.UPSTREAM_PREFIX}{tuning.SPLIT_FILE}"] == producer
        assert "model.lr" in run.data.params and run.data.params["tune.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2]
        number = int(tags[tuning.TAG_TRIAL_NUMBER])
        assert study.trials[number].user_attrs[tuning.ATTR_RUN] == run.info.run_id
    assert study_run.data.metrics["best_val_accuracy"] == pytest.approx(result.best_value)
    plots = {a.path for a in client.list_artifacts(result.study_run_id, "plots")}
    for name in ("optimization_history", "param_importances", "intermediate_values"):
        assert {f"plots/{name}.png", f"plots/{name}.html"} <= plots
    png = client.download_artifacts(
        result.study_run_id, "plots/optimization_history.png", str(project / "dl")
    )
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top = {a.path for a in client.list_artifacts(result.study_run_id)}
    assert {"trials.csv", "experiment", "search_space"} <= top

    # ---- resume: same study name, a bigger total budget adds exactly the difference
    again = tuning.run_study([*base, "tune.n_trials=5"])
    assert again.study_run_id == result.study_run_id
    study = load_study(project)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len(runs(tracking_env, "study")) == 1 and len(runs(tracking_env, "trial")) == 5
    # ... and a budget already spent, or a timeout already passed, starts nothing new
    assert tuning.run_study([*base, "tune.n_trials=2"]).n_trials == 5
    assert tuning.run_study([*base, "tune.n_trials=9", "tune.timeout=1e-9"]).n_trials == 5
    # A changed training setup would make old and new trials incomparable: refused.
    with pytest.raises(ConfigError, match=r"train.batch_size: 64 -> 32.*new tune.study_name"):
        tuning.run_study([*base, "train.batch_size=32", "tune.n_trials=6"])


def test_sequential_studies_with_the_same_seed_are_identical(project: Path) -> None:
    def trials(storage: str, seed: int) -> list[tuple[dict[str, Any], float | None]]:
        tuning.run_study(
            [
                *BASE,
                "tune.n_trials=3",
                f"tune.seed={seed}",
                f"tune.storage={storage}",
                "tune.study_name=repro",
            ]
        )
        return [(t.params, t.value) for t in load_study(project, "repro", storage).trials]

    # The same study in a journal file and in an RDB (sqlite) storage: same trials, same values.
    first = trials("optuna/a.log", 7)
    assert first == trials(f"sqlite:///{project}/optuna/b.db", 7)
    assert len({str(p) for p, _ in first}) == 3  # three different configurations
    assert [p for p, _ in trials("optuna/c.log", 8)] != [p for p, _ in first]


def test_pruned_and_failed_trials(project: Path, tracking_env: str) -> None:
    # lr 1e-7 cannot learn anything in two epochs (~5% val accuracy) while lr 0.05 reaches
    # ~60% after one: once one trial has finished, a 1e-7 trial is below the median at epoch 1.
    # lr 1e4 diverges: that trial fails (TrainingError) and the study goes on.
    (project / "conf/search/mlp.yaml").write_text(
        "params:\n  model.lr: {type: categorical, choices: [0.05, 1.0e-7, 1.0e+4]}\n"
        "pruners:\n  median: {n_startup_trials: 1, n_warmup_steps: 0}\n"
    )
    result = tuning.run_study(
        [
            *BASE,
            "optimizer=sgd",
            "tune.n_trials=5",
            "tune.sampler=random",
            "tune.pruner=median",
            "tune.seed=1",
        ]
    )
    study = load_study(project)
    states = [t.state.name for t in study.trials]
    lrs = [t.params["model.lr"] for t in study.trials]
    assert {"PRUNED", "FAIL", "COMPLETE"} <= set(states), (states, lrs)
    assert result.best_params["model.lr"] == 0.05
    for trial in study.trials:
        assert (trial.state.name == "FAIL") == (trial.params["model.lr"] == 1e4)
    client = MlflowClient(tracking_env)
    by_number = {int(r.data.tags[tuning.TAG_TRIAL_NUMBER]): r for r in runs(tracking_env, "trial")}
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags[tuning.TAG_TRIAL_STATE] == trial.state.name
        if trial.state.name == "PRUNED":
            assert trial.params["model.lr"] == 1e-7 and trial.last_step == 1
            assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1


def test_grid_sampler_enumerates_the_grid_once(project: Path) -> None:
    (project / "conf/search/mlp.yaml").write_text(
        "params:\n  model.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true,"
        " grid: [0.003, 0.01]}\n  optimizer: {type: categorical, choices: [adamw, sgd]}\n"
    )
    result = tuning.run_study([*BASE, "tune.n_trials=10", "tune.sampler=grid", "tune.pruner=none"])
    assert result.n_trials == 4  # the grid has 4 points: the study stops there
    points = {(t.params["model.lr"], t.params["optimizer"]) for t in load_study(project).trials}
    assert points == {(0.003, "adamw"), (0.003, "sgd"), (0.01, "adamw"), (0.01, "sgd")}


def test_logreg_study_reports_once_and_is_never_pruned(project: Path) -> None:
    (project / "conf/search/logreg.yaml").write_text(
        "params:\n  model.C: {type: float, low: 1.0e-2, high: 1.0, log: true}\n"
    )
    base = ["model=logreg", "model.max_iter=50", "train.num_threads=1"]
    result = tuning.run_study([*base, "tune.n_trials=2", "tune.pruner=hyperband"])
    trials = load_study(project, "tune-logreg").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(list(t.intermediate_values) == [1] for t in trials)  # one lbfgs fit, one report
    applied = config.compose(["+experiment=tuned_logreg"])
    assert applied["model"]["name"] == "logreg"
    assert without_tune(applied) == without_tune(config.compose([*base, *result.best_overrides]))


def test_a_trial_added_by_hand_is_never_adopted_as_the_best(
    project: Path, tracking_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: `study.add_trial(value=0.999)` (never trained) was exported as the winner.
    The winner is the best trial backed by its own finished trial run."""
    (project / "conf/search/logreg.yaml").write_text(
        "params:\n  model.C: {type: float, low: 1.0e-2, high: 1.0, log: true}\n"
    )
    base = ["model=logreg", "model.max_iter=50", "train.num_threads=1"]
    first = tuning.run_study([*base, "tune.n_trials=2"])
    study = load_study(project, "tune-logreg")
    forged = optuna.trial.create_trial(
        params={"model.C": 0.5},
        distributions={"model.C": optuna.distributions.FloatDistribution(1e-2, 1.0, log=True)},
        value=0.999,
        user_attrs={tuning.ATTR_OVERRIDES: ["model.C=0.5"]},
    )
    study.add_trial(forged)
    again = tuning.run_study([*base, "tune.n_trials=3"])  # the budget is spent: no new trial
    assert again.best_trial == first.best_trial and again.best_value == first.best_value
    assert "trial 2 is not adopted as the best: no trial run" in caplog.text
    study_run = MlflowClient(tracking_env).get_run(again.study_run_id)
    assert study_run.data.tags[f"{tracking.TAG_PREFIX}.unbacked_trials"] == "2"
    exported = yaml.safe_load((project / "conf/experiment/tuned_logreg.yaml").read_text())
    assert exported["model"]["C"] != 0.5


# --------------------------------------------------------------------------- trial runs
def test_trial_run_shares_the_stage_run_blocks(
    make_cfg: Any, tracking_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation refuses a credential in any URL (issue 20 §3); the logging layer scrubs one
    # anyway, as a second line of defence: give it a config that skipped validation.
    cfg = make_cfg("model=mlp")
    mirrors = ["https://user:s3cret@mirror.example/fm"]  # model_copy does not validate
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mirrors": mirrors})})
    client, exp_id = tracking.connect(tracking_env, EXPERIMENT)
    study_run = client.create_run(exp_id, tags={tracking.TAG_KIND: "study"}).info.run_id

    def open_trial(number: int) -> Any:
        return tracking.trial_run(
            client,
            exp_id,
            f"t-{number}",
            cfg,
            parent_id=study_run,
            tags={tuning.TAG_TRIAL_NUMBER: str(number)},
        )

    with open_trial(0) as run:
        run.log_metrics({"val_accuracy": 0.5}, step=1)
        run.state = "COMPLETE"
    with pytest.raises(optuna.TrialPruned), open_trial(1) as run:
        run.state = "PRUNED"
        raise optuna.TrialPruned("pruned at epoch 1")
    with pytest.raises(RuntimeError, match="boom"), open_trial(2) as run:
        run.fail_reason = "RuntimeError: boom"
        raise RuntimeError("boom")
    ended = {r.data.tags[tuning.TAG_TRIAL_NUMBER]: r for r in runs(tracking_env, "trial")}
    assert {k: (r.info.status, r.data.tags[tuning.TAG_TRIAL_STATE]) for k, r in ended.items()} == {
        "0": ("FINISHED", "COMPLETE"),
        "1": ("FINISHED", "PRUNED"),
        "2": ("FAILED", "FAIL"),
    }
    assert ended["2"].data.tags[tracking.TAG_FAIL_REASON] == "RuntimeError: boom"
    assert all(r.data.tags[tracking.TAG_PARENT] == study_run for r in ended.values())
    assert [m.step for m in client.get_metric_history(ended["0"].info.run_id, "val_accuracy")] == [
        1
    ]
    # The study run is the trials' parent, not theirs to close.
    assert client.get_run(study_run).info.status == "RUNNING"
    # One param helper for every kind of run: credentials never reach MLflow params (the
    # pipeline run used to log data.mirrors verbatim).
    monkeypatch.setenv("DEEP_REPRO_INVOCATION", "host:7:1.0")
    pipeline = tracking.get_or_create_pipeline_run(client, exp_id, tracking_env, cfg, {})
    for run_id in (ended["0"].info.run_id, pipeline):
        params = client.get_run(run_id).data.params
        assert params["data.mirrors"] == '["https://***@mirror.example/fm"]'
        assert params["model.name"] == "mlp"


# --------------------------------------------------------------------------- stale trials
def test_stale_running_trials_are_failed_and_retried(project: Path, tracking_env: str) -> None:
    (project / "optuna").mkdir()
    study = optuna.create_study(
        study_name="tune-mlp", storage=journal(project / "optuna/journal.log"), direction="maximize"
    )
    client, exp_id = tracking.connect(tracking_env, EXPERIMENT)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    # Trial 0: its worker on this host was killed (the pid no longer exists).
    killed = study.ask()
    lr = killed.suggest_float("model.lr", 1e-3, 1e-2, log=True)
    orphan_run = client.create_run(exp_id, tags={tracking.TAG_KIND: "trial"}).info.run_id
    killed.set_user_attr(
        tuning.ATTR_OWNER,
        {"host": socket.gethostname(), "pid": dead_pid, "started": time.time() - 100},
    )
    killed.set_user_attr(tuning.ATTR_RUN, orphan_run)
    # Trial 1: a worker on another host whose heartbeat stopped an hour ago.
    silent = study.ask()
    silent.set_user_attr(tuning.ATTR_OWNER, {"host": "elsewhere", "pid": 1, "started": 0})
    silent.set_user_attr(tuning.ATTR_HEARTBEAT, time.time() - 3600)
    # Trial 2: alive (this very process) — must be left alone.
    alive = study.ask()
    alive.set_user_attr(tuning.ATTR_OWNER, tuning.owner())

    result = tuning.run_study([*BASE, "tune.n_trials=4"])

    trials = load_study(project).trials
    assert [t.state.name for t in trials] == [
        "FAIL",
        "FAIL",
        "RUNNING",
        "COMPLETE",
        "COMPLETE",
        "COMPLETE",
    ]
    # The re-queued trials come first and keep the dead trials' parameters.
    assert trials[3].user_attrs[tuning.ATTR_RETRY_OF] == 0 and trials[3].params["model.lr"] == lr
    assert trials[3].system_attrs["failed_trial"] == 0
    assert trials[4].user_attrs[tuning.ATTR_RETRY_OF] == 1
    # Budget: 4 = the live trial + the two retries + one new trial (failed originals retried).
    assert result.n_trials == 6
    orphan = client.get_run(orphan_run)
    assert orphan.info.status == "FAILED" and orphan.data.tags[tuning.TAG_TRIAL_STATE] == "FAIL"
    retried = [
        r
        for r in runs(tracking_env, "trial")
        if tuning.TAG_TRIAL_NUMBER in r.data.tags and r.data.tags[tuning.TAG_TRIAL_NUMBER] == "3"
    ]
    assert retried[0].data.tags[f"{tracking.TAG_PREFIX}.retry_of"] == "0"
    study.tell(alive, state=optuna.trial.TrialState.FAIL)


@pytest.mark.slow
def test_trial_of_a_killed_worker_is_retried(project: Path, tracking_env: str) -> None:
    # Wide layers and 10 epochs: a trial takes seconds, time enough to kill its worker in it.
    base = [
        *BASE,
        "model.hidden_sizes=[1024,1024]",
        "tune.epochs=10",
        "tune.pruner=none",
        "tune.n_trials=1",
    ]
    tracking.connect(tracking_env, EXPERIMENT)
    worker = subprocess.Popen(
        [sys.executable, "-m", "deep_repro.cli", "tune", *base],
        cwd=project,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    running: list[optuna.trial.FrozenTrial] = []
    while not running and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.1)
        with contextlib.suppress(KeyError, FileNotFoundError):
            running = [
                t
                for t in load_study(project).trials
                if t.state.name == "RUNNING" and tuning.ATTR_RUN in t.user_attrs
            ]
    worker.kill()
    worker.wait()
    assert running, "the worker never started a trial"

    result = tuning.run_study(base)

    trials = load_study(project).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs[tuning.ATTR_RETRY_OF] == 0
    assert trials[1].params == trials[0].params
    assert result.best_trial == 1
    dead_run = MlflowClient(tracking_env).get_run(running[0].user_attrs[tuning.ATTR_RUN])
    assert dead_run.info.status == "FAILED"
    assert dead_run.data.tags[tuning.TAG_TRIAL_STATE] == "FAIL"


# --------------------------------------------------------------------------- parallel workers
@pytest.mark.slow
def test_two_worker_processes_share_one_study_and_budget(project: Path, tracking_env: str) -> None:
    tracking.connect(tracking_env, EXPERIMENT)  # create the sqlite store once, not in parallel
    cmd = [
        sys.executable,
        "-m",
        "deep_repro.cli",
        "tune",
        *BASE,
        "tune.n_trials=5",
        "tune.pruner=none",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_env}
    workers = [
        subprocess.Popen(
            cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, out in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, out[-4000:]

    trials = load_study(project).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # the total, not 5 per worker
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({str(t.params) for t in trials}) == 5  # no duplicated random start point
    (study_run,) = runs(tracking_env, "study")
    trial_runs = runs(tracking_env, "trial")
    assert len(trial_runs) == 5
    assert {r.data.tags[tracking.TAG_PARENT] for r in trial_runs} == {study_run.info.run_id}
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    assert (project / "conf/experiment/tuned_mlp.yaml").is_file()


# --------------------------------------------------------------------------- bad input
def _space(body: str) -> str:
    return "params:\n" + body


BAD_INPUTS = {
    "inverted range": (
        _space("  model.lr: {type: float, low: 0.01, high: 0.001}\n"),
        [],
        ConfigError,
        "model.lr: empty or inverted range: low = 0.01 >= high",
    ),
    "empty range": (
        _space("  model.lr: {type: float, low: 0.01, high: 0.01}\n"),
        [],
        ConfigError,
        "model.lr: empty or inverted range",
    ),
    "log from zero": (
        _space("  model.dropout: {type: float, low: 0.0, high: 0.5, log: true}\n"),
        [],
        ConfigError,
        "model.dropout: log scale needs low > 0",
    ),
    "unknown type": (
        _space("  model.lr: {type: normal, low: 0.1, high: 1}\n"),
        [],
        ConfigError,
        "model.lr: unknown type 'normal'",
    ),
    "unknown key": (
        _space("  model.depth: {type: int, low: 1, high: 4}\n"),
        [],
        ConfigError,
        "unknown key model.depth: not in the composed config",
    ),
    "key of another model": (
        _space("  model.channels: {type: categorical, choices: [[8]]}\n"),
        [],
        ConfigError,
        "unknown key model.channels",
    ),
    "empty choices": (
        _space("  model.activation: {type: categorical, choices: []}\n"),
        [],
        ConfigError,
        "model.activation: choices must be a non-empty list",
    ),
    "unknown group option": (
        _space("  optimizer: {type: categorical, choices: [adamw, lion]}\n"),
        [],
        ConfigError,
        "optimizer: unknown option(s) ['lion']",
    ),
    "outside the schema": (
        _space("  model.dropout: {type: float, low: 0.0, high: 1.0}\n"),
        [],
        ConfigError,
        "model.dropout = 1.0 gives an invalid config",
    ),
    "tune key": (
        _space("  tune.epochs: {type: int, low: 1, high: 3}\n"),
        [],
        ConfigError,
        "tune.epochs cannot be searched",
    ),
    "no params": ("params: {}\n", [], ConfigError, "non-empty `params:`"),
    "unknown field": (
        _space("  model.lr: {type: float, low: 0.001, high: 0.1, lg: true}\n"),
        [],
        ConfigError,
        "model.lr: unknown field(s) lg",
    ),
    "unknown pruner argument": (
        TINY_SPACE + "pruners:\n  median: {patience: 3}\n",
        [],
        ConfigError,
        "pruners.median: unknown argument(s) patience",
    ),
    "grid without points": (
        TINY_SPACE,
        ["tune.sampler=grid"],
        ConfigError,
        "model.lr: tune.sampler=grid needs `grid: [values]` or `step`",
    ),
    "missing search space": (
        None,
        ["model=resnet"],
        ConfigError,
        "search space conf/search/resnet.yaml not found",
    ),
    "unreachable storage": (
        TINY_SPACE,
        ["tune.storage=postgresql://nobody@127.0.0.1:1/x"],
        DeepReproError,
        "tune.storage postgresql://***@127.0.0.1:1/x is unreachable or unusable",
    ),
    "zero trials": (TINY_SPACE, ["tune.n_trials=0"], ConfigError, "tune.n_trials = 0"),
    "unknown sampler": (TINY_SPACE, ["tune.sampler=annealing"], ConfigError, "tune.sampler"),
    "unknown pruner": (TINY_SPACE, ["tune.pruner=patient"], ConfigError, "tune.pruner"),
    "unknown override": (TINY_SPACE, ["model=transformer"], ConfigError, "cannot compose"),
    "no split file": (TINY_SPACE, ["+delete_split"], DataError, "uv run dvc repro split"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_before_any_trial(
    project: Path, tracking_env: str, case: str
) -> None:
    space, extra, error, message = BAD_INPUTS[case]
    if space is not None:
        (project / "conf/search/mlp.yaml").write_text(space)
    (project / "conf/search/resnet.yaml").unlink()
    if "+delete_split" in extra:
        (project / tuning.SPLIT_FILE).unlink()
        extra = []
    base = [
        o
        for o in BASE
        if not (o.startswith("model=") and any(e.startswith("model=") for e in extra))
    ]
    with pytest.raises(error) as info:
        tuning.run_study([*base, "tune.n_trials=2", *extra])
    text = str(info.value)
    assert message in text
    assert "\n" not in text and len(text) < 600
    journal_file = project / "optuna/journal.log"
    assert not journal_file.exists() or not optuna.get_all_study_names(journal(journal_file))
    assert runs(tracking_env, "trial") == [] and runs(tracking_env, "study") == []


def test_cli_reports_bad_input_as_one_line(project: Path) -> None:
    (project / "conf/search/mlp.yaml").write_text(BAD_INPUTS["inverted range"][0])
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "deep-repro"), "tune", *BASE],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: search space conf/search/mlp.yaml: model.lr")
    )


# --------------------------------------------------------------------------- the shipped spaces
@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn", "resnet"])
def test_shipped_search_spaces_are_valid(model: str) -> None:
    conf = REPO / "conf"
    groups = tuning.config_groups(conf)
    space = tuning.load_search_space(conf / "search" / f"{model}.yaml", groups)
    checked, when_base = tuning.check_search_space(space, [f"model={model}"], conf, n_train=54_000)
    # Nothing is fixed on the command line, so nothing may be dropped from the search.
    assert [p.key for p in checked.params] == [p.key for p in space.params] != []
    base = config.flatten(config.compose([f"model={model}"], conf))
    assert base["model.name"] == model
    for p in checked.params:
        if p.group:
            assert p.key in groups and set(p.choices) <= set(groups[p.key]), p.key
            continue
        # A real key of this model's config (in the group option its `when` selects).
        context = [f"{k}={v[0]}" for k, v in p.when if k in groups]
        assert p.key in config.flatten(config.compose([f"model={model}", *context], conf)), p.key
        if p.type != "categorical":
            assert p.low is not None and p.high is not None and p.low < p.high, p.key
            assert not p.log or p.low > 0, p.key
    for sampler in ("tpe", "random"):
        tuning.make_sampler(sampler, 0, checked)
    tuning.make_pruner("median", 8, checked)
    tuning.make_pruner("hyperband", 8, checked)
    # Points sampled as a trial samples them compose into valid configs holding those values.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        trial = study.ask()
        context, values = dict(when_base), {}
        for p in checked.params:
            if p.active(context):
                values[p.key] = context[p.key] = p.suggest(trial)
        overrides = [checked.param(k).override(v) for k, v in values.items()]  # type: ignore
        cfg = config.validate(config.compose([f"model={model}", *overrides], conf))
        flat = config.flatten(config.to_dict(cfg))
        for key, value in values.items():
            assert flat[f"{key}.name" if key in groups else key] == value, (key, overrides)


def test_experiment_file_never_holds_credentials(project: Path) -> None:
    overrides = [
        "model=cnn",
        "model.channels=[16,32]",
        "optimizer=sgd",
        "data.mirrors=[https://user:s3cret@mirror.example/fm]",
    ]
    path = tuning.write_experiment(overrides, "cnn", project / "conf", ["header"])
    text = path.read_text()
    assert "s3cret" not in text and "https://***@mirror.example/fm" in text
    written = yaml.safe_load(text)
    assert written["defaults"] == [{"override /model": "cnn"}, {"override /optimizer": "sgd"}]
    assert written["model"] == {"channels": [16, 32]}


def test_grid_of_list_choices_uses_json_labels() -> None:
    param = tuning.Param("model.channels", "categorical", choices=([16, 32], [32, 64]))
    assert param.labels == ("[16, 32]", "[32, 64]")
    assert param.decode("[32, 64]") == [32, 64]
    assert param.override([32, 64]) == "++model.channels=[32,64]"
    assert (
        tuning.Param("model.activation", "categorical", choices=("gelu",)).override("gelu")
        == "++model.activation='gelu'"
    )
    assert (
        tuning.Param("optimizer", "categorical", group=True, choices=("sgd",)).override("sgd")
        == "optimizer=sgd"
    )
    stepped = tuning.Param("model.dropout", "float", low=0.0, high=0.3, step=0.1)
    assert stepped.grid_points() == [0.0, 0.1, 0.2, 0.3]
