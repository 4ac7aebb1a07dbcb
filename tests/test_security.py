"""Security regressions: crafted model archives and checkpoints never run code, bad input is
refused per file or per request, provenance tags carry no local paths or secrets, Ctrl-C is
one line. All against real components (a model trained on the fixture, real git, MLflow, Pillow,
the MLflow scoring server's request handler, real signals)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deep_repro import cli, config, data, inference, tracking, training
from deep_repro.errors import DataError
from deep_repro.files import atomic_path
from deep_repro.inference import safe_archive

Make = Callable[..., config.Config]
REPO = Path(__file__).resolve().parents[1]


class RunsCommand:
    """Pickles as a call to `os.system(command)`: what an attacker puts in a `.pt2`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _evil_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(RunsCommand(f"touch '{marker}'"), buffer)
    return buffer.getvalue()


_MODEL_CACHE: dict[str, bytes] = {}


@pytest.fixture
def real_model(make_cfg: Make, splits: data.Splits, tmp_path: Path) -> Path:
    """models/inference.pt2 of a logistic regression trained on the fixture (trained once)."""
    if "pt2" not in _MODEL_CACHE:
        cfg = make_cfg("model=logreg", "model.max_iter=60")
        net = training.train_model(
            cfg, splits.x_train, splits.y_train, splits.x_val, splits.y_val
        ).model
        target = tmp_path / "build/inference.pt2"
        with atomic_path(target) as tmp:
            inference.export(
                inference.build_inference_module(net), torch.from_numpy(splits.x_val[:2]), tmp
            )
        _MODEL_CACHE["pt2"] = target.read_bytes()
    path = tmp_path / "models/inference.pt2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_MODEL_CACHE["pt2"])
    return path


def _rewrite(src: Path, dest: Path, edit: Callable[[dict[str, bytes], str], None]) -> Path:
    """Copy a .pt2 zip archive, letting `edit(members, root)` change its members."""
    with zipfile.ZipFile(src) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    root = next(iter(members)).split("/", 1)[0]
    edit(members, root)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return dest


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    """The attack from the issue: `use_pickle: true` on one weight, its file a pickle."""

    def edit(members: dict[str, bytes], root: str) -> None:
        name = f"{root}/data/weights/model_weights_config.json"
        cfg = json.loads(members[name])
        fqn = next(iter(cfg["config"]))
        cfg["config"][fqn]["use_pickle"] = True
        members[name] = json.dumps(cfg).encode()
        members[f"{root}/data/weights/{cfg['config'][fqn]['path_name']}"] = _evil_pickle(marker)

    return edit


@pytest.fixture
def evil(real_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    return _rewrite(real_model, tmp_path / "evil.pt2", _pickled_weight(marker)), marker


@pytest.fixture
def images(splits: data.Splits, tmp_path: Path) -> dict[str, Path]:
    trouser = int(np.flatnonzero(splits.y_test == 1)[0])
    paths = {
        "raw": tmp_path / "raw.png",
        "raw16": tmp_path / "raw16.png",
        "bomb": tmp_path / "bomb.png",
    }
    Image.fromarray(splits.x_test[trouser]).save(paths["raw"])
    # The same real image as a 16-bit grayscale PNG (v * 257 maps 0..255 onto 0..65535).
    Image.fromarray(splits.x_test[trouser].astype(np.uint16) * 257).save(paths["raw16"])
    paths["bomb"].write_bytes(_bomb_png(30000, 30000))
    return paths


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height black pixels (~109 KB for 30000^2)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- 1. crafted .pt2
def test_the_crafted_archive_really_runs_code_in_torch(evil: tuple[Path, Path]) -> None:
    """The attack is real: plain `torch.export.load` executes the command."""
    path, marker = evil
    with pytest.raises(Exception):  # noqa: B017 - loading fails only *after* the command ran
        torch.export.load(str(path)).module()
    assert marker.exists()


def test_loader_refuses_crafted_archive_with_one_line(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    with pytest.raises(DataError) as info:
        inference.load_inference_model(path)
    message = str(info.value)
    assert str(path) in message and "use_pickle" in message and "\n" not in message
    assert not marker.exists()


def test_loader_accepts_every_real_model_type(real_model: Path) -> None:
    model = inference.load_inference_model(real_model)
    assert inference.predict_logits(model, np.zeros((2, 28, 28), np.uint8)).shape == (2, 10)


def _edit_json(rel: str, change: Callable[[dict], None]) -> Callable[[dict[str, bytes], str], None]:
    def edit(members: dict[str, bytes], root: str) -> None:
        doc = json.loads(members[f"{root}/{rel}"])
        change(doc)
        members[f"{root}/{rel}"] = json.dumps(doc).encode()

    return edit


def _add(rel: str, blob: bytes) -> Callable[[dict[str, bytes], str], None]:
    def edit(members: dict[str, bytes], root: str) -> None:
        members[f"{root}/{rel}"] = blob

    return edit


def _first_target(doc: dict, value: str) -> None:
    doc["graph_module"]["graph"]["nodes"][0]["target"] = value


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("pickle_member", "unexpected archive member data.pkl"),
        ("legacy_weights", "unexpected archive member data/weights/model.pt"),
        ("custom_obj_constant", "unexpected archive member data/constants/custom_obj_0"),
        ("pickled_sample_inputs", "sample inputs references posix.system"),
        ("graph_target", "model graph calls 'torch.os.system'"),
        ("guards_code", "guard code"),
        ("sympy_eval", "shape expression uses '__import__'"),
    ],
)
def test_every_pickle_or_code_path_is_refused(
    real_model: Path, tmp_path: Path, case: str, expected: str
) -> None:
    marker = tmp_path / "pwned"
    evil_pickle = _evil_pickle(marker)
    sample_zip = io.BytesIO()
    with zipfile.ZipFile(sample_zip, "w") as archive:  # a torch.save archive, evil data.pkl
        archive.writestr(
            "archive/data.pkl", zipfile.ZipFile(io.BytesIO(evil_pickle)).read("archive/data.pkl")
        )
    edits = {
        "pickle_member": _add("data.pkl", evil_pickle),
        "legacy_weights": _add("data/weights/model.pt", evil_pickle),
        "custom_obj_constant": lambda m, r: (
            _edit_json(
                "data/constants/model_constants_config.json",
                lambda d: d["config"].update(
                    {
                        "obj": {
                            "path_name": "custom_obj_0",
                            "is_param": False,
                            "use_pickle": False,
                            "tensor_meta": None,
                        }
                    }
                ),
            )(m, r),
            _add("data/constants/custom_obj_0", evil_pickle)(m, r),
        ),
        "pickled_sample_inputs": _add("data/sample_inputs/model.pt", sample_zip.getvalue()),
        "graph_target": _edit_json(
            "models/model.json", lambda d: _first_target(d, "torch.os.system")
        ),
        "guards_code": _edit_json(
            "models/model.json", lambda d: d.update(guards_code=["__import__('os')"])
        ),
        "sympy_eval": _edit_json(
            "models/model.json",
            lambda d: d["graph_module"]["graph"]["sym_int_values"].update(
                x={"as_expr": {"expr_str": "__import__('os')"}}
            ),
        ),
    }
    path = _rewrite(real_model, tmp_path / f"{case}.pt2", edits[case])
    with pytest.raises(safe_archive.UnsafeArchiveError, match=expected.replace("(", r"\(")):
        safe_archive.read_checked(path)
    with pytest.raises(DataError, match="refused to load model"):
        inference.load_inference_model(path)
    assert not marker.exists()


def test_predict_cli_refuses_crafted_model(
    evil: tuple[Path, Path],
    images: dict[str, Path],
    tracking_env: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, marker = evil
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", "--model", str(path), str(images["raw"])])
    err = capsys.readouterr().err
    assert info.value.code == 2 and not marker.exists()
    assert err.count("\n") == 1 and str(path) in err and "refused" in err


def _stage_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")
    # The composition of conf/, not the workspace params.yaml (a user's `dvc exp run -S` changes
    # that one).
    (work / "params.yaml").write_text(yaml.safe_dump(config.compose([], REPO / "conf")))
    return work


def _run_stage(script: str, work: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    full_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    full_env.update(env)
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / script)],
        cwd=work,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_evaluate_stage_refuses_crafted_model(evil: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil
    work = _stage_dir(tmp_path)
    shutil.copy2(path, work / "models/inference.pt2")
    proc = _run_stage("evaluate.py", work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "models/inference.pt2: refused to load model" in lines[0]


def test_postprocess_stage_refuses_crafted_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    work = _stage_dir(tmp_path)
    (work / "models/checkpoint.pt").write_bytes(_evil_pickle(marker))
    proc = _run_stage("postprocess.py", work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "models/checkpoint.pt: refused to load checkpoint" in lines[0]


def _log_model(
    model: Path,
    splits: data.Splits,
    make_cfg: Make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str = "sec-model",
) -> str:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with tracking.stage_run("postprocess", make_cfg()) as run:
        version = tracking.log_inference_model(run, model, splits.x_val[:4], name)
    assert version is not None
    return f"models:/{name}/{version}"


def test_registry_refuses_to_log_crafted_model(
    evil: tuple[Path, Path],
    splits: data.Splits,
    make_cfg: Make,
    tracking_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, marker = evil
    with pytest.raises(DataError, match="refused to load model"):
        _log_model(path, splits, make_cfg, tmp_path, monkeypatch)
    assert not marker.exists()


def test_served_model_is_self_contained_and_refuses_swapped_program(
    real_model: Path,
    splits: data.Splits,
    make_cfg: Make,
    tracking_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc

    uri = _log_model(real_model, splits, make_cfg, tmp_path, monkeypatch)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "served")))
    # Loads and predicts with deep_repro made unimportable: the check travels with the model.
    code = (
        "import sys, numpy as np, mlflow.pyfunc; sys.modules['deep_repro'] = None; "
        "m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "print(m.predict(np.zeros((2, 28, 28)))['predicted'].tolist())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(local)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # An attacker who can write the artifact store swaps the program: loading refuses it.
    marker = tmp_path / "pwned"
    [program] = local.glob("artifacts/*.pt2")
    _rewrite(real_model, program, _pickled_weight(marker))
    # (UnsafeArchiveError of the logged copy of safe_archive: a ValueError like ours)
    with pytest.raises(ValueError, match="use_pickle"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. bad input
def test_serving_rejects_fractional_and_out_of_range_pixels(
    real_model: Path,
    splits: data.Splits,
    make_cfg: Make,
    tracking_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(
        _log_model(real_model, splits, make_cfg, tmp_path, monkeypatch)
    )
    schema = model.metadata.get_input_schema()

    def post(pixels: object) -> tuple[int, str]:
        body = json.dumps({"inputs": pixels})
        try:
            response = scoring_server.invocations(body, "application/json", model, schema)
        except MlflowException as exc:
            return exc.get_http_status_code(), exc.message
        return response.status, response.response

    good = splits.x_test[:2].tolist()
    status, body = post(good)
    assert status == 200
    direct = (
        inference.predict_logits(inference.load_inference_model(real_model), splits.x_test[:2])
        .argmax(1)
        .tolist()
    )
    assert [p["predicted"] for p in json.loads(body)["predictions"]] == direct
    half = np.full((1, 28, 28), 0.5).tolist()
    status, message = post(half)
    reason = message.split("Error: ", 1)[-1]
    assert status == 400 and "whole numbers in 0..255" in reason and "784 of 784" in reason
    assert "0.5" not in reason  # the problem is named, the input is not echoed
    status, message = post(np.full((1, 28, 28), 300).tolist())
    assert status == 400 and "must lie in 0..255; 784 of 784 do not" in message


def test_predict_refuses_decompression_bomb_and_classifies_the_rest(
    real_model: Path, images: dict[str, Path], tracking_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert images["bomb"].stat().st_size < 200_000
    code = cli.main(
        [
            "predict",
            "--model",
            str(real_model),
            str(images["raw"]),
            str(images["bomb"]),
            str(images["raw16"]),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1  # one file failed; the others were classified
    assert out.splitlines() == [line for line in out.splitlines() if "Trouser" in line]
    assert [line.split(":")[0] for line in out.splitlines()] == [
        str(images["raw"]),
        str(images["raw16"]),
    ]
    assert err.count("\n") == 1 and f"{images['bomb']}: error: refused image" in err


def test_16_bit_images_are_scaled_not_clipped(images: dict[str, Path]) -> None:
    with Image.open(images["raw16"]) as img:
        assert img.mode.startswith("I;16")  # really a 16-bit file
    assert np.array_equal(cli.load_image(images["raw16"]), cli.load_image(images["raw"]))


# --------------------------------------------------------------------------- 3./4. git tags
def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "clone"
    (repo / "reports/train").mkdir(parents=True)
    (repo / "src").mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "reports/train/history.csv").write_text("epoch\n")
    (repo / "src/code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo


def test_generated_file_first_in_porcelain_is_not_dirty(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "reports/train/history.csv").write_text("epoch\n1\n")
    assert _git(repo, "status", "--porcelain").startswith(" M reports/train/history.csv")
    assert tracking.git_state(repo)["dirty"] == "false"
    (repo / "src/code.py").write_text("x = 2\n")
    _git(repo, "mv", "dvc.yaml", "dvc renamed.yaml")
    state = tracking.git_state(repo)
    assert state["dirty"] == "true"
    assert sorted(state["changed"].split(",")) == ["dvc renamed.yaml", "src/code.py"]


def test_tags_hold_no_local_paths_or_remote_credentials(
    tmp_path: Path, make_cfg: Make, tracking_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo(tmp_path)
    _git(repo, "remote", "add", "origin", "https://alice:s3cret@git.example.com/org/repo.git")
    monkeypatch.chdir(repo)
    cfg = make_cfg()
    with tracking.stage_run("evaluate", cfg) as run:
        x, y = np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8)
        tracking.log_dataset(
            run,
            "fashion-mnist-test",
            x,
            y,
            "0" * 32,
            str(repo / "data/split/test.npz"),
            context="test",
        )
    got = run.client.get_run(run.run_id)
    tags = got.data.tags
    assert tags["deep_repro.git.remote"] == "https://git.example.com/org/repo.git"
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/org/repo.git"
    assert not [k for k, v in tags.items() if str(tmp_path) in v or "s3cret" in v]
    [dataset] = got.inputs.dataset_inputs
    assert json.loads(dataset.dataset.source) == {"uri": "data/split/test.npz"}


# --------------------------------------------------------------------------- 5. SIGINT
def _interrupt_while_blocked(
    cmd: list[str], cwd: Path, env: dict[str, str], server: socket.socket
) -> subprocess.CompletedProcess[str]:
    """Start `cmd`, wait until it is blocked talking to `server` (which never answers), then
    send SIGINT as Ctrl-C would."""
    # A suite started in the background by a shell without job control inherits SIGINT
    # ignored, and Python keeps an inherited SIG_IGN: give the child Ctrl-C's default back.
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        server.settimeout(120)
        conn, _ = server.accept()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def silent_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def test_sigint_in_cli_and_stage_is_one_line_exit_130(
    silent_server: socket.socket, tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_TIMEOUT="120")
    work = _stage_dir(tmp_path)
    for cmd in (
        [sys.executable, "-m", "deep_repro.cli", "leaderboard"],
        [sys.executable, str(REPO / "stages/download.py")],
    ):
        proc = _interrupt_while_blocked(cmd, work, env, silent_server)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "interrupted"


def test_a_logged_models_program_path_stays_inside_the_model(tmp_path: Path) -> None:
    """The MLmodel file is written by whoever logged the model (a student): its program path
    `/abs/other.pt2` or `../x` made predict and grade read any local file as the program
    (another student's cached program, the teacher's own model, /dev/zero)."""
    from deep_repro.errors import TrackingError
    from deep_repro.serving import model_cache

    elsewhere = tmp_path / "someone-elses.pt2"
    elsewhere.write_bytes(b"not yours")
    for rel in (str(elsewhere), "../someone-elses.pt2", "a/../../someone-elses.pt2", "/dev/zero"):
        model_dir = tmp_path / f"model-{abs(hash(rel))}"
        model_dir.mkdir()
        (model_dir / "MLmodel").write_text(
            f"flavors:\n  python_function:\n    artifacts:\n      program:\n        path: {rel}\n"
        )
        mv = model_cache.ModelVersion("m", "1", "r", 1, model_dir.as_uri())
        with pytest.raises(TrackingError, match="not a relative path inside the model"):
            model_cache.cached_program(f"sqlite:///{tmp_path / 'db'}", mv)
    # A symlink inside the model that points out of it is refused too.
    model_dir = tmp_path / "model-link"
    (model_dir / "artifacts").mkdir(parents=True)
    (model_dir / "artifacts/inference.pt2").symlink_to(elsewhere)
    (model_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      program:\n        path: artifacts/inference.pt2\n"
    )
    mv = model_cache.ModelVersion("m", "2", "r", 1, model_dir.as_uri())
    with pytest.raises(TrackingError, match="not a file inside the logged model"):
        model_cache.cached_program(f"sqlite:///{tmp_path / 'db'}", mv)
