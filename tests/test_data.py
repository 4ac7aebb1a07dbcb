"""Data acquisition, IDX parsing and the split, on the committed real-data fixture."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deep_repro import data
from deep_repro.errors import DataError, scrub
from deep_repro.files import file_digest

from .helpers import FIXTURE, fixture_sha256

NAME = "train-labels-idx1-ubyte"


# --------------------------------------------------------------------------- IDX
def test_parse_fixture_idx() -> None:
    images, labels = data.load_idx_pair(FIXTURE, "train")
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (2000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).min() == 200  # stratified fixture


def test_write_parse_roundtrip_is_byte_reproducible(tmp_path: Path) -> None:
    array = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    data.write_idx(tmp_path / "a.gz", array)
    data.write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    parsed = data.parse_idx(
        tmp_path / "a.gz", expect_magic=data.IDX_IMAGES_MAGIC, expect_shape=(28, 28)
    )
    assert np.array_equal(parsed, array)


def test_bad_magic_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    data.write_idx(path, np.zeros(5, dtype=np.uint8))  # a labels file (magic 2049)
    with pytest.raises(DataError, match="bad IDX magic number 0x00000801, expected 0x00000803"):
        data.parse_idx(path, expect_magic=data.IDX_IMAGES_MAGIC)


def test_truncated_idx_is_rejected(tmp_path: Path) -> None:
    raw = gzip.decompress((FIXTURE / f"{NAME}.gz").read_bytes())
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="truncated or padded IDX data"):
        data.parse_idx(path, expect_magic=data.IDX_LABELS_MAGIC)


def test_truncated_gzip_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes((FIXTURE / f"{NAME}.gz").read_bytes()[:200])
    with pytest.raises(DataError, match="not a complete gzip file"):
        data.parse_idx(path, expect_magic=data.IDX_LABELS_MAGIC)


def test_label_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    data.write_idx(tmp_path / "x-images-idx3-ubyte.gz", images)
    data.write_idx(tmp_path / "x-labels-idx1-ubyte.gz", np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(DataError, match=r"label 10 out of range 0\.\.9"):
        data.load_idx_pair(tmp_path, "x")
    data.write_idx(tmp_path / "x-labels-idx1-ubyte.gz", np.array([0, 1], np.uint8))
    with pytest.raises(DataError, match="4 images but 2 labels"):
        data.load_idx_pair(tmp_path, "x")


def test_wrong_image_size_is_rejected(tmp_path: Path) -> None:
    data.write_idx(tmp_path / "x.gz", np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"images are \(32, 32\), expected \(28, 28\)"):
        data.parse_idx(tmp_path / "x.gz", expect_magic=data.IDX_IMAGES_MAGIC, expect_shape=(28, 28))


# --------------------------------------------------------------------------- mirrors
@pytest.fixture
def bad_mirror(tmp_path: Path) -> Path:
    """A mirror serving a same-named file with other content, and a truncated one."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data.write_idx(corrupt / f"{NAME}.gz", np.zeros(2000, dtype=np.uint8))
    return corrupt


@pytest.fixture
def http_mirror() -> Iterator[str]:
    """The network, faked: a local HTTP server serving a truncated download."""
    payload = (FIXTURE / f"{NAME}.gz").read_bytes()[:300]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://user:s3cret@127.0.0.1:{server.server_address[1]}/fmnist"
    server.shutdown()


def test_failover_to_next_mirror_on_mismatch_and_truncation(
    tmp_path: Path, bad_mirror: Path, http_mirror: str
) -> None:
    dest = tmp_path / "raw"
    used = data.download_file(
        NAME,
        fixture_sha256()[NAME],
        [bad_mirror.as_uri(), http_mirror, (tmp_path / "nope").as_uri(), FIXTURE.as_uri()],
        dest,
    )
    assert used == FIXTURE.as_uri()
    assert sorted(p.name for p in dest.iterdir()) == [f"{NAME}.gz"]  # no temp files left
    assert file_digest(dest / f"{NAME}.gz", "sha256", decompress=True) == fixture_sha256()[NAME]


def test_all_mirrors_failing_lists_each_and_leaves_nothing(
    tmp_path: Path, bad_mirror: Path, http_mirror: str
) -> None:
    dest = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        data.download_file(NAME, fixture_sha256()[NAME], [bad_mirror.as_uri(), http_mirror], dest)
    message = str(info.value)
    assert "sha256 mismatch" in message and "EOFError" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "s3cret" not in message and "***@127.0.0.1" in message  # credentials redacted
    assert "\n" not in message
    assert list(dest.iterdir()) == []


def test_existing_verified_file_is_kept(tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    data.download_file(NAME, fixture_sha256()[NAME], [FIXTURE.as_uri()], dest)
    assert (
        data.download_file(NAME, fixture_sha256()[NAME], ["file:///nonexistent"], dest) == "cache"
    )


# --------------------------------------------------------------------------- split
def test_split_is_stratified_disjoint_and_deterministic() -> None:
    images, labels = data.load_idx_pair(FIXTURE, "train")
    a = data.make_split(images, labels, val_size=0.1, seed=7, subset=None)
    b = data.make_split(images, labels, val_size=0.1, seed=7, subset=None)
    c = data.make_split(images, labels, val_size=0.1, seed=8, subset=None)
    for key in a:
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["y_val"], c["y_val"]) or not np.array_equal(a["x_val"], c["x_val"])
    assert len(a["y_val"]) == 200 and len(a["y_train"]) == 1800
    assert np.all(np.bincount(a["y_val"]) == 20)  # every class keeps its share
    train_rows = {row.tobytes() for row in a["x_train"]}
    assert not any(row.tobytes() in train_rows for row in a["x_val"])


def test_subset_is_stratified() -> None:
    images, labels = data.load_idx_pair(FIXTURE, "train")
    parts = data.make_split(images, labels, val_size=0.2, seed=0, subset=500)
    counts = np.bincount(np.concatenate([parts["y_train"], parts["y_val"]]))
    assert counts.sum() == 500 and counts.min() == 50
    with pytest.raises(DataError, match=r"data\.subset = 5000 exceeds the 2000 training images"):
        data.make_split(images, labels, val_size=0.2, seed=0, subset=5000)


def test_npz_is_byte_reproducible_and_pickle_free(tmp_path: Path) -> None:
    x = np.arange(100, dtype=np.uint8)
    data.save_arrays(tmp_path / "a.npz", x=x)
    data.save_arrays(tmp_path / "b.npz", x=x)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert np.array_equal(data.load_arrays(tmp_path / "a.npz")["x"], x)


def test_scrub() -> None:
    assert scrub("https://u:p@host:8080/x") == "https://***@host:8080/x"
    assert scrub("file:///a/b") == "file:///a/b"


def test_a_private_mirror_takes_its_login_from_netrc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config never holds credentials (deep_repro.config.urls), so a mirror behind basic
    auth gets its login from ~/.netrc, or the file $NETRC names, as curl and requests would."""
    import base64

    payload = (FIXTURE / f"{NAME}.gz").read_bytes()
    expected = "Basic " + base64.b64encode(b"ana:s3cret").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == expected
            body = payload if ok else b"login required"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}/fmnist"
    try:
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        with pytest.raises(DataError, match="HTTPError: Unauthorized"):
            data.download_file(NAME, fixture_sha256()[NAME], [mirror], tmp_path / "raw")
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login ana password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        used = data.download_file(NAME, fixture_sha256()[NAME], [mirror], tmp_path / "raw")
        assert used == mirror
    finally:
        server.shutdown()


def test_a_mirror_login_is_not_sent_to_the_host_it_redirects_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: urllib copies the Authorization header to a redirect target on any host,
    so a netrc login for the mirror went to whatever host the mirror redirected to."""
    payload = (FIXTURE / f"{NAME}.gz").read_bytes()
    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://localhost:{other.server_address[1]}"  # another host name

    class Mirror(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    for server in (other, mirror):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login ana password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        url = f"http://127.0.0.1:{mirror.server_address[1]}/fmnist"
        assert data.download_file(NAME, fixture_sha256()[NAME], [url], tmp_path / "raw") == url
        assert seen == [None]
    finally:
        for server in (other, mirror):
            server.shutdown()
