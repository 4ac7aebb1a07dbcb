"""Atomic, byte-reproducible file writing, and the one file-hashing loop.

Every output is written under a temporary name and renamed into place only when complete, so a
crash or a failed check never leaves a half-written file that DVC or a user could mistake for a
result. Writers never embed timestamps, so rerunning a stage yields byte-identical files.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield `<tempdir>/<target.name>` next to `target`; move it into place if the block succeeds.

    The temporary file keeps the final *name* because some writers embed it (the zip archives
    of `torch.save` and `torch.export.save` are rooted at a folder named after the file).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tmp_path = Path(tmp) / target.name
        yield tmp_path
        os.replace(tmp_path, target)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_digest(path: Path, algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file, read in 1 MiB chunks (of its gunzipped content if `decompress`).

    md5 of the raw bytes is the hash DVC writes in dvc.lock (used to link MLflow runs); sha256 of
    the decompressed content identifies a Fashion-MNIST file independently of its gzip wrapper.
    """
    digest = hashlib.new(algorithm, usedforsecurity=False)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(paths: tuple[str, ...], root: Path) -> dict[str, str]:
    """`{path: md5}` (the dvc.lock hash) of those of `paths` under `root` that exist."""
    return {p: file_digest(root / p) for p in paths if (root / p).is_file()}


# --------------------------------------------------------------------------- report files
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def save_figure(fig: Any, path: Path) -> None:
    """PNG without timestamps/software metadata: byte-identical across reruns."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display, same bytes everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
