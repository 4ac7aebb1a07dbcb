"""Who is in the class, as the server knows it: the roster and each student's resources.

Identity in the class lab comes from what the *server* knows, never from what a client writes:
a run's `mlflow.user` / `deep_repro.user` tags and its REST `user_id` are whatever the client
sent (`-S tracking.user=alice` in bob's clone). What a student cannot forge is *where* they can
write: each enrolled student has MANAGE on exactly one experiment (`<prefix>-<user>`) and one
registered model (`<model prefix>-<user>`), created by the teacher's enrolment, and everybody
else only reads them (the server's `default_permission = READ`). So a run belongs to the student
whose experiment holds it, and a champion to the student whose registered model it is.

The roster itself lives on the server, as a tag of a teacher-owned experiment
(`<prefix>-class`) that students can read and not change: `grade` and `leaderboard` read it
from there, so every machine sees the same class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from deep_repro.errors import DeepReproError, TrackingError

ROSTER_TAG = "deep_repro.roster"
ROSTER_FORMAT = "deep-repro/roster/1"
# Experiments the teacher's tools own next to the students' `<prefix>-<user>` ones (studies:
# shared Optuna studies' runs, which every enrolled student may write).
CLASS_SUFFIX, GRADING_SUFFIX, STUDIES_SUFFIX = "class", "grading", "studies"
RESERVED = (CLASS_SUFFIX, GRADING_SUFFIX, STUDIES_SUFFIX)
# A user name becomes part of experiment and model names and of a search filter.
USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name) or name in RESERVED:
        raise DeepReproError(
            f"student name {name!r}: expected 1-64 lower-case letters, digits, '.', '_' or '-' "
            f"(not {', '.join(RESERVED)}: the teacher's experiments use them)"
        )
    return name


@dataclass(frozen=True)
class Roster:
    """The enrolled students and the names of their resources on the server."""

    experiment_prefix: str
    model_prefix: str
    students: tuple[str, ...] = field(default=())

    def experiment(self, user: str) -> str:
        return f"{self.experiment_prefix}-{user}"

    def model(self, user: str) -> str:
        return f"{self.model_prefix}-{user}"

    @property
    def class_experiment(self) -> str:
        return f"{self.experiment_prefix}-{CLASS_SUFFIX}"

    @property
    def grading_experiment(self) -> str:
        return f"{self.experiment_prefix}-{GRADING_SUFFIX}"

    @property
    def studies_experiment(self) -> str:
        return f"{self.experiment_prefix}-{STUDIES_SUFFIX}"

    def owner_of_experiment(self, name: str) -> str | None:
        """The enrolled student whose experiment `name` is, or None."""
        prefix = f"{self.experiment_prefix}-"
        user = name[len(prefix) :] if name.startswith(prefix) else None
        return user if user in self.students else None

    def to_json(self) -> str:
        body = {
            "format": ROSTER_FORMAT,
            "experiment_prefix": self.experiment_prefix,
            "model_prefix": self.model_prefix,
            "students": sorted(self.students),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> Roster:
        try:
            body = json.loads(text)
            assert body["format"] == ROSTER_FORMAT
            roster = cls(
                str(body["experiment_prefix"]),
                str(body["model_prefix"]),
                tuple(check_user_name(str(s)) for s in body["students"]),
            )
        except (ValueError, KeyError, TypeError, AssertionError, DeepReproError):
            raise DeepReproError(
                f"{where}: the class roster is not a {ROSTER_FORMAT} document; re-run "
                "`deep-repro class enroll` as the teacher"
            ) from None
        return roster


def read_roster(client: Any, experiment_prefix: str) -> Roster | None:
    """The roster enrolment stored on the server, or None (no class on this server)."""
    name = f"{experiment_prefix}-{CLASS_SUFFIX}"
    exp = client.get_experiment_by_name(name)
    if exp is None or ROSTER_TAG not in exp.tags:
        return None
    roster = Roster.from_json(exp.tags[ROSTER_TAG], f"experiment {name}")
    if roster.experiment_prefix != experiment_prefix:  # a roster planted for other names
        raise DeepReproError(
            f"experiment {name}: its roster is for {roster.experiment_prefix}-*, not "
            f"{experiment_prefix}-*; the teacher must delete it and enrol again"
        )
    return roster


def owned(client: Any, roster: Roster, student: str, mv: Any) -> None:
    """Refuse a version that is not the student's own work by where it lives: its run in the
    student's experiment and its files under that experiment's artifacts. MLflow lets anyone
    with READ register a version whose source or run is a classmate's."""
    exp = client.get_experiment_by_name(roster.experiment(student))
    if exp is None:
        raise TrackingError(f"experiment {roster.experiment(student)} does not exist")
    run = client.get_run(mv.run_id)
    files = client.get_model_version_download_uri(mv.name, mv.version)
    root = exp.artifact_location.rstrip("/") + "/"
    if run.info.experiment_id != exp.experiment_id or not str(files).startswith(root):
        raise TrackingError(
            f"version {mv.version} was made outside {exp.name} (its run or files are another "
            "experiment's): not graded"
        )
