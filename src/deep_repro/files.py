"""Atomic, byte-reproducible file writing.

Every output is written under a temporary name and renamed into place only when complete, so a
crash or a failed check never leaves a half-written file that DVC or a user could mistake for a
result. Writers never embed timestamps, so rerunning a stage yields byte-identical files.
"""

from __future__ import annotations

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


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
