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

from deep_repro import cli, data

from .test_security import real_model  # noqa: F401 - fixture: a small real .pt2


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
