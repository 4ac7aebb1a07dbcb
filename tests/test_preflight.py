"""The validate stage's checks of this machine and this data (deep_repro.preflight), and the
removal of a credential that `dvc exp run -S` wrote into params.yaml (deep_repro.config.urls).
End to end through `dvc exp run` / `dvc repro`: tests/test_faults.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deep_repro import config, machine, preflight
from deep_repro.config import urls
from deep_repro.errors import ConfigError
from deep_repro.models.registry import MODELS, build_model, count_parameters

from .helpers import FIXTURE, REPO, fixture_overrides, project_env, run

SECRET = "-".join(("S3CRET", "x9"))  # joined at run time: test projects copy this file into git


def _check(*overrides: str, root: Path) -> None:
    """deep_repro.preflight itself, in-process."""
    preflight.check(config.validate(config.compose(list(overrides), REPO / "conf")), root)


def validate_stage(root: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """Run the validate stage on the composition of conf/ with `overrides` in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    raw = config.compose(list(overrides), REPO / "conf")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return subprocess.run(
        [sys.executable, str(REPO / "stages/validate.py")],
        cwd=root,
        env=project_env(root),  # no MLFLOW_TRACKING_URI: tracking.uri is the one used
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # The published data: 6,000 training images of each class.
        (
            "data.subset=1000000",
            "data.subset = 1000000: expected at most 60000 (the number of training images)",
        ),
        (
            "split.val_size=0.0001",
            "split.val_size = 0.0001: expected a fraction that leaves every class at least 10 "
            "validation images (of 60000 images it holds out 1 of some class)",
        ),
        ("split.val_size=0.99999", "expected a fraction that leaves every class at least one "),
        ("model.hidden=1000000000", "config error: model = cnn with 1,163,000,092,906 parameters"),
        pytest.param(
            "train.device=cuda",
            "config error: train.device = 'cuda': expected a device this machine has",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA"),
        ),
    ],
)
def test_a_value_a_later_stage_would_fail_on_is_refused_by_validate(
    override: str, message: str, tmp_path: Path
) -> None:
    proc = validate_stage(tmp_path, override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert message in line
    assert not (tmp_path / "reports").exists()


def test_the_default_config_passes_validate(tmp_path: Path) -> None:
    proc = validate_stage(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "reports/validate.json").is_file()


def test_the_data_on_disk_sets_the_split_limits(tmp_path: Path) -> None:
    # The fixture: 2,000 training images (200 per class), named by its checksums.
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    shutil.copy2(FIXTURE / "train-labels-idx1-ubyte.gz", raw)
    base = fixture_overrides()
    with pytest.raises(ConfigError, match=r"data\.subset = 5000: expected at most 2000 "):
        _check(*base, "data.subset=5000", root=tmp_path)
    with pytest.raises(ConfigError, match=r"split\.val_size = 0\.1 \(data\.subset = 500\)"):
        _check(*base, "data.subset=500", root=tmp_path)  # 5 of a class in validation
    _check(*base, "data.subset=1000", root=tmp_path)  # 10 per class: enough
    _check(*base, "split.val_size=0.05", root=tmp_path)


def test_bf16_is_refused_on_a_cpu_that_only_emulates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # best_cpu trains in bf16: on a CPU without native bf16 that is 2.4-12x slower than fp32,
    # so validate refuses it before any work and names the override that fixes it.
    bf16 = ("train.device=cpu", "train.precision=bf16")
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    with pytest.raises(ConfigError) as refused:
        _check(*bf16, root=REPO)
    assert str(refused.value) == (
        "config error: train.precision = 'bf16' on a CPU without native bf16 (avx512_bf16, "
        "amx_bf16, bf16): expected a CPU that has it (emulated, bf16 trains 2.4-12x slower "
        "than fp32); use -S train.precision=fp32"
    )
    _check("train.device=cpu", "train.precision=fp32", root=REPO)  # the fix passes
    for answer in (True, None):  # native, or a torch too old to tell: no refusal
        monkeypatch.setattr(machine, "native_bf16", lambda answer=answer: answer)
        _check(*bf16, root=REPO)


def test_a_known_host_that_is_down_still_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on port 9: the stages spool to disk as before (tests/test_outage.py).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    preflight.check_tracking_host("http://127.0.0.1:9")
    preflight.check_tracking_host("http://localhost:9")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_parameter_estimate_is_torch_s_count(name: str) -> None:
    overrides = {
        "cnn": ["model.convs_per_block=2", "model.channels=[8,16,32]"],
        "resnet": ["model.blocks=[1,2,1]"],
    }.get(name, [])
    cfg = config.validate(config.compose([f"model={name}", *overrides], REPO / "conf"))
    assert cfg.model.footprint()[0] == count_parameters(build_model(cfg.model))


def test_the_memory_refusal_shows_the_estimate() -> None:
    cfg = config.validate(config.compose([], REPO / "conf"))
    params, needed = preflight.training_bytes(cfg)
    preflight.check_memory(cfg, available=needed)
    with pytest.raises(ConfigError) as info:
        preflight.check_memory(cfg, available=needed - 1)
    assert f"with {params:,} parameters needs about " in str(info.value)
    assert preflight.available_memory() > needed  # the default model fits any machine


# --------------------------------------------------------------------------- params.yaml
def _git_project(tmp_path: Path) -> Path:
    env = project_env(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.compose([], REPO / "conf")))
    run(["git", "init", "-q"], tmp_path, env)
    run(["git", "add", "params.yaml"], tmp_path, env)
    run(["git", "commit", "-qm", "params"], tmp_path, env)
    return tmp_path


def test_a_credential_leaves_params_yaml_as_committed(tmp_path: Path) -> None:
    project = _git_project(tmp_path)
    committed = (project / "params.yaml").read_bytes()
    params = project / "params.yaml"
    overrides = [f"data.mirrors=[http://u:{SECRET}@mirror.example/f]", "model.lr=0.1"]
    params.write_text(yaml.safe_dump(config.compose(overrides, REPO / "conf"), sort_keys=False))
    raw, found = urls.remove_credentials(params)
    assert found == [("data.mirrors[0]", f"http://u:{SECRET}@mirror.example/f")]
    assert raw["data"]["mirrors"] == [f"http://u:{SECRET}@mirror.example/f"]  # to validate
    restored = yaml.safe_load(params.read_text())
    assert SECRET not in params.read_text()
    assert restored["model"]["lr"] == 0.1  # the other overrides stay
    assert restored["data"] == yaml.safe_load(committed)["data"]
    # Only the refused key changed: the committed bytes, so `git status` is clean.
    params.write_text(
        yaml.safe_dump(config.compose([overrides[0]], REPO / "conf"), sort_keys=False)
    )
    urls.remove_credentials(params)
    assert params.read_bytes() == committed
    assert urls.remove_credentials(params) == (yaml.safe_load(committed), [])


def test_a_credential_without_a_commit_is_redacted_and_a_new_key_dropped(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    raw = config.compose([f"tracking.uri='https://h.example/?token={SECRET}'"], REPO / "conf")
    params.write_text(yaml.safe_dump(raw))
    urls.remove_credentials(params)  # not a git repository
    assert yaml.safe_load(params.read_text())["tracking"]["uri"] == "https://h.example/?token=***"
    project = _git_project(tmp_path / "git")
    raw = config.compose([f"+extra=https://{SECRET}@h.example"], REPO / "conf")
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    urls.remove_credentials(project / "params.yaml")
    assert "extra" not in yaml.safe_load((project / "params.yaml").read_text())


def test_the_validate_stage_removes_the_credential_and_says_one_line(tmp_path: Path) -> None:
    project = _git_project(tmp_path)
    committed = (project / "params.yaml").read_bytes()
    raw = config.compose([f"tracking.uri=http://ana:{SECRET}@mlflow.example"], REPO / "conf")
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        ["python", str(REPO / "stages/validate.py")],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config error: tracking.uri = 'http://***@mlflow.example': expected a URL "
        "without credentials (a password would be stored in params.yaml, dvc.lock, git and "
        "MLflow): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
        "MLFLOW_TRACKING_TOKEN) instead"
    ]
    assert SECRET not in proc.stdout + proc.stderr
    assert (project / "params.yaml").read_bytes() == committed
    assert not (project / "reports").exists()


@pytest.mark.parametrize(
    "params",
    [
        # a string where a list belongs: the type error must not print the token either
        {"data": {"mirrors": f"https://b.example/f?token={SECRET}"}},
        {"tracking": {"uri": f"https://mlflow.example/?pass%77ord={SECRET}"}},
        {"data": {"mirrors": [f"u:{SECRET}@b.example/f"]}},
    ],
)
def test_no_refusal_of_the_validate_stage_prints_the_secret(
    tmp_path: Path, params: dict[str, dict[str, object]]
) -> None:
    """Review findings: the validate stage re-validated the raw mapping, so another error on
    the same key (or an undecoded query name) printed the secret in the one-line refusal."""
    project = _git_project(tmp_path)
    committed = (project / "params.yaml").read_bytes()
    raw = config.compose([], REPO / "conf")
    for section, values in params.items():
        raw[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        ["python", str(REPO / "stages/validate.py")],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert SECRET not in proc.stdout + proc.stderr
    assert (project / "params.yaml").read_bytes() == committed


def test_a_tracking_host_that_does_not_resolve_is_refused_and_a_silent_resolver_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resolver is the internet here, so it is faked (a real lookup of a `.invalid` name
    gives EAI_NONAME on a machine with DNS and EAI_AGAIN on one without: not a test input)."""
    import socket
    import time

    def no_such_host(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(ConfigError, match="expected a host that exists"):
        preflight.check_tracking_host("http://mlfow.example:5000")

    def offline(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    preflight.check_tracking_host("http://mlflow.example:5000")  # spools, as before

    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(3)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    monkeypatch.setattr(preflight, "RESOLVE_TIMEOUT_S", 0.2)
    start = time.monotonic()
    preflight.check_tracking_host("http://mlflow.example:5000")
    assert time.monotonic() - start < 5


def test_the_memory_limit_is_read_from_this_process_s_nested_cgroup(tmp_path: Path) -> None:
    """Review finding: only the root cgroup's limit was read; a SLURM job's is nested."""
    root = tmp_path / "cgroup"
    job = root / "system.slice" / "slurmstepd.scope" / "job_7"
    job.mkdir(parents=True)
    membership = tmp_path / "membership"
    membership.write_text("0::/system.slice/slurmstepd.scope/job_7\n")
    dirs = preflight._cgroup_v2_dirs(root, membership)
    assert dirs == [job, job.parent, job.parent.parent, root]
    (job / "memory.stat").write_text("anon 10\ninactive_file 4096\nactive_file 1\n")
    assert preflight._reclaimable(job) == 4096
    assert preflight._reclaimable(root) == 0


# --------------------------------------------------------------------------- conf/ -> params.yaml
def _conf_project(root: Path) -> Path:
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_an_edit_of_conf_that_params_yaml_does_not_reflect_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21 §4: `dvc repro` after editing conf/ said "up to date" and trained the old config."""
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    root = _conf_project(tmp_path)
    preflight.check_composed(root)  # the first validate of a checkout records what it sees
    assert (root / preflight.COMPOSE_STATE).is_file()
    _edit(root / "conf/config.yaml", "  epochs: 15", "  epochs: 3")
    with pytest.raises(ConfigError) as err:
        preflight.check_composed(root)
    assert "\n" not in str(err.value)
    assert "conf/config.yaml changed but params.yaml was not recomposed" in str(err.value)
    assert "make params" in str(err.value)
    # `dvc exp run` composes params.yaml itself (from conf/ and its -S overrides): not stale.
    monkeypatch.setenv("DVC_EXP_NAME", "quiet-lynx")
    preflight.check_composed(root)
    monkeypatch.delenv("DVC_EXP_NAME")
    # Recomposed: fine, and remembered.
    composed = config.compose(None, root / "conf")
    (root / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
    preflight.check_composed(root)
    preflight.check_composed(root)
    # A comment in conf/ changes no composition: not stale.
    _edit(root / "conf/config.yaml", "  epochs: 3", "  epochs: 3  # shorter")
    preflight.check_composed(root)
    # params.yaml edited by hand (conf/ unchanged): the user's choice, not stale.
    _edit(root / "params.yaml", "epochs: 3", "epochs: 4")
    preflight.check_composed(root)


def test_a_fresh_clone_with_an_uncomposed_conf_edit_is_refused(tmp_path: Path) -> None:
    """No record yet (a fresh clone): git says conf/ changed and params.yaml did not."""
    root = _conf_project(tmp_path)
    env = project_env(root)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "clone"], root, env)
    _edit(root / "conf/config.yaml", "  epochs: 15", "  epochs: 3")
    with pytest.raises(ConfigError, match=r"^config error: conf/config.yaml changed but"):
        preflight.check_composed(root)
