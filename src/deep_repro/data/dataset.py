"""Data: acquisition (mirrors + checksums), IDX parsing, and the stratified split.

Life cycle: raw IDX .gz files (exactly as published) -> processed arrays (uint8 npz, no pickle)
-> train/val/test split. Every step is a pure function of its inputs and the seed, so DVC can
content-hash the outputs and skip unchanged steps.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import secrets
import shutil
import socket
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deep_repro.config.task import IMAGE_SHAPE, NUM_CLASSES
from deep_repro.errors import DataError, scrub
from deep_repro.files import atomic_path, file_digest

log = logging.getLogger(__name__)

# IDX magic numbers: 0x0000 0803 = unsigned byte, 3 dims; 0x0000 0801 = unsigned byte, 1 dim.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
OFFLINE_HINT = (
    "offline? install the real dataset with `apt-get install dataset-fashion-mnist` "
    "(mirror file:///usr/share/datasets/fashion-mnist) or set "
    "data.mirrors to a directory/URL holding the four .gz files"
)


# --------------------------------------------------------------------------- download
@dataclass(frozen=True)
class MirrorFailure:
    mirror: str
    reason: str


def netrc_login(host: str) -> tuple[str, str] | None:
    """A private mirror's (login, password) from ~/.netrc or the file $NETRC names: the config
    never holds credentials (deep_repro.config.urls), and urllib, unlike curl or requests, does not
    read netrc by itself. None when there is no file or no entry for `host`."""
    import netrc
    import os

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except FileNotFoundError:
        return None
    except (OSError, netrc.NetrcParseError) as exc:  # e.g. readable by others: say so, go on
        log.warning("%s not used: %s", path, exc)
        return None
    return (entry[0] or "", entry[2] or "") if entry else None


class _LoginStaysOnItsHost(urllib.request.HTTPRedirectHandler):
    """urllib copies every header to a redirect's target, on any host and from https to http:
    a mirror's login (netrc) would go to whoever it redirects to. Drop it when the target is
    another host or a downgrade to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        from urllib.parse import urlsplit

        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            old, nxt = urlsplit(req.full_url), urlsplit(newurl)
            moved = (old.hostname, old.port) != (nxt.hostname, nxt.port)
            if moved or (old.scheme == "https" and nxt.scheme != "https"):
                new.remove_header("Authorization")
        return new


def _fetch(url: str, dest: Path, desc: str) -> None:
    """Copy `url` (http(s) or file) to `dest` with a progress bar."""
    import base64
    from urllib.parse import unquote, urlsplit

    from tqdm import tqdm

    parts = urlsplit(url)
    request = urllib.request.Request(url)
    if parts.username is not None:  # private mirror: credentials go in a header, never in logs
        host = parts.hostname or ""
        request = urllib.request.Request(
            parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
        )
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(token).decode()}")
    elif parts.scheme in ("http", "https") and (login := netrc_login(parts.hostname or "")):
        token = f"{login[0]}:{login[1]}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(token).decode()}")
    with urllib.request.build_opener(_LoginStaysOnItsHost).open(request, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            open(dest, "wb") as out,
            tqdm(
                total=total, unit="B", unit_scale=True, desc=desc, leave=False, mininterval=0.5
            ) as bar,
        ):
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


class _Rejected(Exception):
    """A mirror served a file whose content is not the expected one."""


# A corrupt deflate stream raises zlib.error (not an OSError) from gzip: a bad file, like the rest.
GZIP_ERRORS = (OSError, EOFError, zlib.error)
TMP_MARK = ".download-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_downloads(target: Path) -> None:
    """Delete the temp folders of downloads of `target` whose process on this host is gone
    (killed: SIGKILL, OOM, power): they hold partial files no later run would ever clean."""
    host = socket.gethostname()
    for folder in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        owner, _, where = folder.name[len(f".{target.name}{TMP_MARK}") :].partition("@")
        pid = owner.split("-")[0]
        if where == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a killed download", folder.name)


@contextlib.contextmanager
def _download_path(target: Path) -> Iterator[Path]:
    """Like files.atomic_path, but the temp folder names its owner (pid, host), so that the
    next download can tell a killed download's leftovers from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent / (
        f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"
    )
    folder.mkdir()
    try:
        yield folder / target.name
        os.replace(folder / target.name, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def download_file(name: str, expected_sha256: str, mirrors: Sequence[str], dest_dir: Path) -> str:
    """Fetch `<name>.gz` from the first mirror whose decompressed bytes match the checksum.

    Returns the mirror used. Raises DataError listing every mirror and why it was rejected.
    """
    target = dest_dir / f"{name}.gz"
    _remove_stale_downloads(target)
    if target.exists():
        try:
            if file_digest(target, "sha256", decompress=True) == expected_sha256:
                log.info("%s already present and verified", target.name)
                return "cache"
        except GZIP_ERRORS:
            pass
        target.unlink()
    failures: list[MirrorFailure] = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{name}.gz"
        try:
            # Only a verified file leaves the atomic block; any exception discards the temp file.
            with _download_path(target) as tmp:
                _fetch(url, tmp, desc=name)
                actual = file_digest(tmp, "sha256", decompress=True)
                if actual != expected_sha256:
                    raise _Rejected(
                        f"sha256 mismatch (got {actual[:12]}…, expected {expected_sha256[:12]}…)"
                    )
        except _Rejected as exc:
            failures.append(MirrorFailure(scrub(mirror), str(exc)))
        except (urllib.error.URLError, ValueError, *GZIP_ERRORS) as exc:
            # Truncated gzip streams raise EOFError; bad gzip headers raise BadGzipFile.
            reason = getattr(exc, "reason", None) or exc
            failures.append(MirrorFailure(scrub(mirror), f"{type(exc).__name__}: {reason}"))
        else:
            log.info("%s verified from %s", name, scrub(mirror))
            return mirror
        log.info(
            "%s: mirror %s rejected (%s); trying the next one",
            name,
            failures[-1].mirror,
            failures[-1].reason,
        )
    detail = "; ".join(f"{f.mirror}: {f.reason}" for f in failures)
    raise DataError(f"could not get {name}.gz from any of data.mirrors ({detail}); {OFFLINE_HINT}")


# --------------------------------------------------------------------------- IDX format
def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except GZIP_ERRORS as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc})") from None


def parse_idx(
    path: Path, *, expect_magic: int, expect_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Parse an IDX (.gz) file into a uint8 array, validating magic number and size."""
    raw = _read_gz(path)
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expect_magic:
        raise DataError(
            f"{path}: bad IDX magic number {magic:#010x}, expected {expect_magic:#010x}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header + int(np.prod(dims))
    if len(raw) != expected_len:
        raise DataError(
            f"{path}: truncated or padded IDX data: {len(raw)} bytes, header "
            f"{dims} implies {expected_len}"
        )
    if expect_shape is not None and dims[1:] != expect_shape:
        raise DataError(f"{path}: images are {dims[1:]}, expected {expect_shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip'd IDX file (used to build the test fixture)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    # mtime=0 and no embedded file name: byte-identical .gz files on every run.
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw_fh,
        gzip.GzipFile(fileobj=raw_fh, mode="wb", mtime=0, filename="") as fh,
    ):
        fh.write(header + array.tobytes())


def load_idx_pair(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one official part (`train` or `t10k`), cross-checked."""
    images = parse_idx(
        raw_dir / f"{prefix}-images-idx3-ubyte.gz",
        expect_magic=IDX_IMAGES_MAGIC,
        expect_shape=IMAGE_SHAPE,
    )
    labels = parse_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", expect_magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{raw_dir}/{prefix}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{raw_dir}/{prefix}-labels: label {int(labels.max())} out of range "
            f"0..{NUM_CLASSES - 1}"
        )
    return images, labels


# --------------------------------------------------------------------------- arrays on disk
def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write a pickle-free, byte-reproducible .npz (loadable with `np.load`).

    `np.savez_compressed` stamps the current time into each zip entry, which would make DVC see
    a new output on every rerun; here every entry carries a fixed 1980-01-01 timestamp.
    """
    import zipfile

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path} not found: run the upstream stages first (`dvc repro`)")
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------- split
def stratified_indices(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so every class keeps its share: returns (kept, held_out), each sorted."""
    held: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = rng.permutation(idx)
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced subset of `size` samples (sorted)."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, chosen = stratified_indices(labels, size / len(labels), rng)
    return chosen


def make_split(
    images: np.ndarray, labels: np.ndarray, *, val_size: float, seed: int, subset: int | None
) -> dict[str, np.ndarray]:
    """Stratified train/val split of the official training set (optionally subsampled first)."""
    rng = np.random.default_rng(seed)
    if subset is not None:
        if subset > len(labels):
            raise DataError(f"data.subset = {subset} exceeds the {len(labels)} training images")
        keep = stratified_subset(labels, subset, rng)
        images, labels = images[keep], labels[keep]
    train_idx, val_idx = stratified_indices(labels, val_size, rng)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"split.val_size = {val_size} leaves an empty train or val set for {len(labels)} images"
        )
    return {
        "x_train": images[train_idx],
        "y_train": labels[train_idx],
        "x_val": images[val_idx],
        "y_val": labels[val_idx],
    }


@dataclass(frozen=True)
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_splits(train_val: Path, test_file: Path) -> Splits:
    tv = load_arrays(train_val)
    test = load_arrays(test_file)
    return Splits(
        tv["x_train"], tv["y_train"], tv["x_val"], tv["y_val"], test["x_test"], test["y_test"]
    )


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over the full content (dtype, shape and bytes) of the given arrays."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
