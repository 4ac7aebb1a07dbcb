"""`deep-repro grade --snapshot`: pin every champion's program at the deadline.

A registry alias keeps no history and a version's files stay writable by their owner: a student
with EDIT on their own experiment can upload new bytes under a version created before the
deadline, and creation times alone cannot see it. So at the deadline (by hand, or from `cron`/`at`)
the teacher takes a snapshot: for every enrolled student, the `@champion` version's number, the
sha256 of its program and a copy of the program, kept in a run of the teacher's grading
experiment, which students only read. `grade --as-of TIME` then grades the snapshot's copy of the
version in force at TIME (the earliest snapshot taken at or after TIME) and flags a version whose
files on the server no longer match it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deep_repro.classroom.roster import Roster, owned
from deep_repro.errors import TrackingError, first_line
from deep_repro.tracking.gate import CHAMPION

KIND = "snapshot"
INDEX = "snapshot.json"
FORMAT = "deep-repro/snapshot/1"


def program_of(client: Any, uri: str, mv: Any, dest: Path) -> str:
    """Copy version `mv`'s program as the server holds it *now* to `dest`; its sha256.
    Never from the local cache: grading must see what is there, not what was there."""
    from deep_repro.serving import model_cache

    local = model_cache.resolve(uri, f"models:/{mv.name}/{mv.version}")
    if local is None:
        raise TrackingError(f"grading reads an http(s):// or sqlite:/// store, not {uri}")
    model_cache.fetch_program(local, dest, uri)
    return hashlib.sha256(dest.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Pin:
    """One student's program as a snapshot recorded it."""

    run_id: str
    taken_ms: int
    student: str
    version: str
    sha256: str

    @property
    def artifact(self) -> str:
        return f"programs/{self.student}/v{self.version}.pt2"


def take(client: Any, uri: str, roster: Roster) -> tuple[str, list[str]]:
    """Snapshot every enrolled student's champion; returns (run id, one line per student)."""
    from deep_repro import tracking

    _, exp_id = tracking.connect(client.tracking_uri, roster.grading_experiment)
    run = client.create_run(exp_id, run_name="snapshot", tags={tracking.TAG_KIND: KIND})
    run_id, taken = str(run.info.run_id), int(run.info.start_time)
    index: dict[str, Any] = {"format": FORMAT, "taken_ms": taken, "students": {}}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for student in roster.students:
            try:
                mv = client.get_model_version_by_alias(roster.model(student), CHAMPION)
                owned(client, roster, student, mv)
                program = Path(tmp) / student / f"v{mv.version}.pt2"
                program.parent.mkdir()
                sha256 = program_of(client, uri, mv, program)
                client.log_artifact(run_id, str(program), f"programs/{student}")
            except Exception as exc:  # this student's problem, recorded; the others go on
                why = f"{type(exc).__name__}: {first_line(exc)}"[:300]
                index["students"][student] = {"error": why}
                lines.append(f"{student}: not pinned ({why})")
                continue
            index["students"][student] = {
                "model": mv.name,
                "version": str(mv.version),
                "created_ms": int(mv.creation_timestamp),
                "sha256": sha256,
            }
            lines.append(f"{student}: v{mv.version} sha256 {sha256[:12]}")
        client.log_text(run_id, json.dumps(index, indent=1, sort_keys=True) + "\n", INDEX)
    client.set_terminated(run_id)
    return run_id, lines


def pins_at(client: Any, roster: Roster, as_of_ms: int) -> dict[str, Pin]:
    """The earliest finished snapshot taken at or after the deadline: student -> pin.
    Only the teacher writes the grading experiment, so its runs are the teacher's."""
    from deep_repro import tracking

    exp = client.get_experiment_by_name(roster.grading_experiment)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{tracking.TAG_KIND}` = '{KIND}' and attributes.status = 'FINISHED' "
        f"and attributes.start_time >= {as_of_ms}",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if not runs:
        return {}
    run = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, INDEX, tmp)
        index = json.loads(Path(path).read_text())
    if index.get("format") != FORMAT:
        raise TrackingError(f"snapshot {run.info.run_id}: not a {FORMAT} index")
    return {
        student: Pin(run.info.run_id, int(run.info.start_time), student, e["version"], e["sha256"])
        for student, e in index["students"].items()
        if "sha256" in e
    }


def pinned_program(client: Any, pin: Pin, dest_dir: Path) -> Path:
    """The snapshot's copy of a pinned program, checked against its recorded sha256."""
    path = Path(client.download_artifacts(pin.run_id, pin.artifact, str(dest_dir)))
    if hashlib.sha256(path.read_bytes()).hexdigest() != pin.sha256:
        raise TrackingError(f"snapshot {pin.run_id}: {pin.artifact} does not match its sha256")
    return path
