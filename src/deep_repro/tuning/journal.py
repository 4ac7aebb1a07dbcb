"""Damage to an Optuna journal file, found before Optuna reads it, and its repair.

Optuna appends each record as one line with one `write` under its lock file. A worker killed
during that write leaves a final line without its newline; Optuna's reader skips such a line, but
the next worker appends its own record to it, and from then on every reader of the file stops
with a bare `JSONDecodeError`. So:

- a partial *last* line (no newline) is cut off automatically, under Optuna's own lock (a live
  writer holds it while writing, so a partial line seen under the lock is orphaned), after a
  copy of the file is kept as `<journal>.<UTC time>.bak`: nothing it held was ever applied;
- any other damaged line is a one-line error naming the file and line, pointing at
  `deep-repro tune --repair-journal FILE`, which rewrites the file (again with a backup) keeping
  every whole record: the record a killed worker's partial prefix was glued onto is salvaged,
  and a line holding no record at all is dropped.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

from deep_repro.errors import DeepReproError

log = logging.getLogger(__name__)

RECORD_START = b'{"op_code"'  # every record Optuna writes starts like this (json.dumps order)


def _record(line: bytes) -> dict[str, object] | None:
    """The journal record on one newline-terminated line, or None if it holds none."""
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return value if isinstance(value, dict) and "op_code" in value else None


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, bytes) of each line, streamed."""
    offset = 0
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            yield number, offset, line
            offset += len(line)


def _first_damage(path: Path) -> tuple[int, int, bool] | None:
    """(line, offset, is the partial last line) of the first damaged line, None if whole."""
    for number, offset, line in _lines(path):
        if not line.endswith(b"\n"):
            return number, offset, True  # only the last line can lack its newline
        if _record(line) is None:
            return number, offset, False
    return None


def _backup(path: Path) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    shutil.copy2(path, backup)
    return backup


def check_journal(path: Path) -> None:
    """Refuse a damaged journal with one line; cut off an orphaned partial last record."""
    if not path.is_file() or _first_damage(path) is None:  # the usual case: no lock needed
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        damage = _first_damage(path)  # again, now that no writer can be half-way
        if damage is None:
            return
        number, offset, partial = damage
        if not partial:
            raise DeepReproError(
                f"{path} line {number} is not an Optuna journal record (a worker killed while "
                f"writing?), so Optuna cannot read the file; run `deep-repro tune "
                f"--repair-journal {path}` (keeps a backup; see docs/how-to/tuning.md)"
            )
        backup = _backup(path)
        os.truncate(path, offset)
        log.warning(
            "%s: cut off the partial last record (line %d) of a killed worker; "
            "the file as it was is kept as %s",
            path,
            number,
            backup.name,
        )
    finally:
        lock.release()


def repair_journal(path: Path) -> str:
    """Rewrite a damaged journal keeping every whole record; returns a one-line summary."""
    if not path.is_file():
        raise DeepReproError(f"--repair-journal {path}: no such file")
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        if _first_damage(path) is None:
            return f"{path}: no damaged record, nothing to do"
        backup = _backup(path)
        kept, salvaged, dropped = 0, 0, 0
        tmp = path.with_name(path.name + ".repair.tmp")
        with tmp.open("wb") as out:
            for _, _, line in _lines(path):
                if line.endswith(b"\n") and _record(line) is not None:
                    out.write(line)
                    kept += 1
                    continue
                # A killed worker's partial record with the next worker's whole one glued on.
                body = line if line.endswith(b"\n") else line + b"\n"
                start = body.find(RECORD_START, 1)
                while start > 0 and _record(body[start:]) is None:
                    start = body.find(RECORD_START, start + 1)
                if start > 0:
                    out.write(body[start:])
                    salvaged += 1
                else:
                    dropped += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        lock.release()
    return (
        f"{path}: kept {kept} records, salvaged {salvaged} from damaged lines, dropped "
        f"{dropped} damaged lines; the file as it was is kept as {backup.name}"
    )
