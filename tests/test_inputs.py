"""Inputs a user or the world hands the project (issue 20, section 5): special files and pixel
bombs given to `predict`, corrupt or interrupted downloads, a damaged Optuna journal. All real
files and processes; only the internet is faked."""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from deep_repro import cli, config, data

from .test_security import real_model  # noqa: F401 - fixture: a small real .pt2
from .test_tuning import BASE, project  # noqa: F401 - fixture: a minimal tuning project


def _strip_png(width: int) -> bytes:
    """A valid 1-bit PNG of width x 1 black pixels: 80,000,000 wide is ~10 KB on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    idat = zlib.compress(b"\0" * (1 + (width + 7) // 8), 9)
    header = width.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _unblock_fifo_after(fifo: Path, delay: float, stop: threading.Event) -> None:
    """Open the FIFO for writing once `delay` has passed: a reader blocked in open() (the old
    code) gets EOF instead of hanging the test run forever."""
    if stop.wait(delay):
        return
    while not stop.is_set():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO:
                return
        time.sleep(0.05)


def test_predict_refuses_fifo_and_pixel_strip_and_classifies_the_rest(
    real_model: Path,  # noqa: F811
    splits: data.Splits,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(splits.x_test[0]).save(good)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    strip = tmp_path / "strip.png"
    strip.write_bytes(_strip_png(80_000_000))
    assert strip.stat().st_size < 80_000
    stop = threading.Event()
    watchdog = threading.Thread(target=_unblock_fifo_after, args=(fifo, 20, stop), daemon=True)
    watchdog.start()
    started = time.monotonic()
    try:
        code = cli.main(["predict", "--model", str(real_model), str(fifo), str(strip), str(good)])
    finally:
        stop.set()
        watchdog.join()
    out, err = capsys.readouterr()
    assert time.monotonic() - started < 20  # never waited for a writer
    assert code == 1  # some files failed, the others were classified (as documented)
    assert [line.split(":")[0] for line in out.splitlines()] == [str(good)]
    assert err.splitlines() == [
        f"{fifo}: error: refused: not a regular file",
        f"{strip}: error: refused image: too many pixels (80000000x1; at most 10000 per side "
        "and 25,000,000 in total)",
    ]


# --------------------------------------------------------------------------- Optuna journal
def _journal_with_trials(path: Path, n: int = 2) -> None:
    """A real journal file written by Optuna: study tune-mlp with `n` finished trials."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="tune-mlp", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)


def _trials(path: Path) -> int:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return len(optuna.load_study(study_name="tune-mlp", storage=storage).trials)


def test_killed_workers_partial_record_is_cut_off_with_a_backup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed mid-write leaves a partial last line; the next worker's records used to
    be glued onto it, and every later reader stopped with a JSONDecodeError."""
    import optuna

    from deep_repro.tuning import storage

    path = tmp_path / "optuna/journal.log"
    _journal_with_trials(path)
    whole = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"op_code":6,"worker_id":"dead-worker","trial_id":1,"state"')
    for _ in range(2):  # the next worker, then the one after it
        store = storage.open_storage(str(path), "tune-mlp", 60, lambda *_: None)
        study = optuna.load_study(study_name="tune-mlp", storage=store.storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert _trials(path) == 4
    [backup] = path.parent.glob("journal.log.*.bak")
    assert backup.read_bytes().startswith(whole) and backup.read_bytes().endswith(b'"state"')
    assert path.read_bytes().startswith(whole) and b"dead-worker" not in path.read_bytes()
    [warning] = [r.getMessage() for r in caplog.records if "partial last record" in r.getMessage()]
    assert f"(line {len(whole.splitlines()) + 1})" in warning


def test_damaged_journal_line_is_one_line_and_repairable(
    project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = project / "optuna/journal.log"
    _journal_with_trials(path, n=3)
    lines = path.read_bytes().splitlines(keepends=True)
    # line 3: garbage; line 5: a killed worker's partial record with a whole one glued on
    lines.insert(2, b"\x00\x00garbage\n")
    lines[4] = b'{"op_code":6,"worker_id":"dead' + lines[4]
    path.write_bytes(b"".join(lines))
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", *BASE, "tune.n_trials=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"error: {path} line 3 is not an Optuna journal record" in err
    assert f"deep-repro tune --repair-journal {path}" in err

    assert cli.main(["tune", "--repair-journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"kept {len(lines) - 2} records, salvaged 1 from damaged lines, dropped 1" in out
    assert _trials(path) == 3  # nothing whole was lost
    [backup] = path.parent.glob("journal.log.*.bak")
    assert backup.read_bytes() == b"".join(lines)


# --------------------------------------------------------------------------- SIGTERM
def test_sigterm_ends_stage_and_pipeline_runs_like_ctrl_c(tmp_path: Path) -> None:
    """kill/systemd/SLURM send SIGTERM: the stage and its pipeline run must not stay RUNNING."""
    import shutil
    import socket
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    from .helpers import REPO

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")
    with socket.socket() as mirror:  # the internet, faked: a mirror that never answers
        mirror.bind(("127.0.0.1", 0))
        mirror.listen(8)
        params = config.compose([], REPO / "conf")  # never the workspace's params.yaml
        params["data"]["mirrors"] = [f"http://127.0.0.1:{mirror.getsockname()[1]}/fmnist"]
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        uri = f"sqlite:///{work / 'mlflow.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env["MLFLOW_TRACKING_URI"] = uri
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "stages/download.py")],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            mirror.settimeout(120)
            conn, _ = mirror.accept()  # the stage run is open, the download under way
            proc.terminate()  # SIGTERM, by PID
            _, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "terminated"
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = {r.data.tags.get("deep_repro.kind"): r.info.status for r in runs}
    assert status == {"pipeline": "FAILED", "stage": "KILLED"}


# --------------------------------------------------------------------------- download
LABELS = "train-labels-idx1-ubyte"


def test_corrupt_deflate_stream_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from deep_repro.errors import DataError

    from .helpers import FIXTURE, fixture_sha256

    good = (FIXTURE / f"{LABELS}.gz").read_bytes()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    # The first deflate block header right after the 10-byte gzip header: block type 3 (invalid).
    (mirror / f"{LABELS}.gz").write_bytes(good[:10] + bytes([0xFF]) + good[11:])
    dest = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        data.download_file(LABELS, fixture_sha256()[LABELS], [mirror.as_uri()], dest)
    message = str(info.value)
    assert f"could not get {LABELS}.gz" in message and "invalid block type" in message
    assert "\n" not in message and list(dest.iterdir()) == []
    # A corrupt file already in place is replaced, and parsing one is a DataError too.
    dest.mkdir(exist_ok=True)
    (dest / f"{LABELS}.gz").write_bytes((mirror / f"{LABELS}.gz").read_bytes())
    with pytest.raises(DataError, match=f"{LABELS}.gz: not a complete gzip file"):
        data.parse_idx(dest / f"{LABELS}.gz", expect_magic=data.IDX_LABELS_MAGIC)
    assert data.download_file(LABELS, fixture_sha256()[LABELS], [FIXTURE.as_uri()], dest)
    assert data.parse_idx(dest / f"{LABELS}.gz", expect_magic=data.IDX_LABELS_MAGIC).size == 2000


def test_killed_download_leaves_nothing_after_the_rerun(tmp_path: Path) -> None:
    import http.server
    import signal
    import subprocess
    import sys

    from .helpers import FIXTURE, fixture_sha256

    payload = (FIXTURE / f"{LABELS}.gz").read_bytes()
    release = threading.Event()

    class Stalls(http.server.BaseHTTPRequestHandler):  # the internet, faked: a stalled transfer
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:300])
            self.wfile.flush()
            release.wait(60)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = tmp_path / "raw"
    code = (
        "import sys; from pathlib import Path; from deep_repro import data; "
        "data.download_file(sys.argv[1], sys.argv[2], [sys.argv[3]], Path(sys.argv[4]))"
    )
    url = f"http://127.0.0.1:{server.server_address[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, LABELS, fixture_sha256()[LABELS], url, str(dest)]
    )
    try:
        deadline = time.monotonic() + 120
        while not list(dest.glob(f".{LABELS}.gz.*/{LABELS}.gz")):  # the transfer has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # killed mid-transfer: no clean-up code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        release.set()
        server.shutdown()
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")]  # the partial file
    data.download_file(LABELS, fixture_sha256()[LABELS], [FIXTURE.as_uri()], dest)
    assert sorted(p.name for p in dest.iterdir()) == [f"{LABELS}.gz"]
