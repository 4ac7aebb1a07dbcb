"""Enrolment on the class server: accounts, each student's own experiment and model, the roster.

`deep-repro class enroll students.csv` (the teacher, logged in as the server's admin) can be
rerun whenever students join: an existing account keeps its password unless `--reset NAME`
asks for a new one, every student's experiment and registered model are created up front by
the teacher and given to that student alone (MANAGE), and a resource someone else created
first (a classmate pre-claiming `<prefix>-dave` before dave is enrolled) is taken back: the
other student's rights on it are revoked and reported. Generated passwords are written outside
the checkout (mode 600, LF line ends), merged with the ones written before.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deep_repro.classroom.roster import ROSTER_TAG as _ROSTER_TAG
from deep_repro.classroom.roster import Roster, check_user_name, read_roster
from deep_repro.errors import DeepReproError

log = logging.getLogger(__name__)

# Where generated passwords go by default: the teacher's home, never the checkout (git).
DEFAULT_ACCOUNTS = Path("~/.config/deep-repro/class-accounts.csv")
_WRITE = ("EDIT", "MANAGE")  # a permission that lets a student change a resource
MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter ones


@dataclass(frozen=True)
class Student:
    name: str
    password: str = ""  # empty: keep an existing account's, generate one for a new account


def read_students(path: Path) -> list[Student]:
    """`username[,password]` rows (header `username,password`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeepReproError(f"{path}: cannot read ({exc.strerror})") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "username" not in rows[0]:
        raise DeepReproError(f"{path}: expected a CSV with a header `username,password`")
    students = []
    for number, row in enumerate(rows, start=2):
        name = (row.get("username") or "").strip()
        try:
            check_user_name(name)
        except DeepReproError as exc:
            raise DeepReproError(f"{path}:{number}: {exc}") from None
        password = (row.get("password") or "").strip()
        if password and len(password) < MIN_PASSWORD:  # MLflow's own rule, checked up front
            raise DeepReproError(
                f"{path}:{number}: {name}'s password is {len(password)} characters; MLflow "
                f"expects at least {MIN_PASSWORD} (or leave it empty: one is generated)"
            )
        students.append(Student(name, password))
    return students


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _exists(exc: Exception) -> bool:
    return _error_code(exc) == "RESOURCE_ALREADY_EXISTS"


class Enrolment:
    """One enrolment pass against the server at `uri` (admin credentials in the environment)."""

    def __init__(self, uri: str, experiment_prefix: str, model_prefix: str) -> None:
        from mlflow import MlflowClient
        from mlflow.server import get_app_client

        self.auth = get_app_client("basic-auth", tracking_uri=uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        class_exp = self.client.get_experiment_by_name(f"{experiment_prefix}-class")
        roster = read_roster(self.client, experiment_prefix)
        if class_exp is not None and roster is None:  # made by someone else: it would own it
            raise DeepReproError(
                f"experiment {class_exp.name} exists but holds no roster: someone else created "
                "it (and may change it); delete it for good (`mlflow experiments delete` + "
                "`mlflow gc`), then enrol again"
            )
        if class_exp is not None:  # a roster written by anyone but an admin is no roster
            writers = self._writers("experiment", class_exp.experiment_id)
            if writers:
                raise DeepReproError(
                    f"experiment {class_exp.name} holds a roster, but {', '.join(writers)} "
                    "can change it (created it?): delete it for good (`mlflow experiments "
                    "delete` + `mlflow gc`), then enrol again"
                )
        self.roster = roster or Roster(experiment_prefix, model_prefix)
        if self.roster.model_prefix != model_prefix:
            raise DeepReproError(
                f"--model-prefix {model_prefix}: the class on this server uses "
                f"{self.roster.model_prefix!r}"
            )
        self.report: list[str] = []
        # Resources that existed before enrolment made them (kind, id, label, owner): only
        # these can carry someone else's rights (the creator's MANAGE), so only these are
        # checked: a rerun costs O(students), not O(students^2) permission lookups.
        self.preexisting: list[tuple[str, str, str, str | None]] = []
        if roster is None:  # the first enrolment: the grading experiment may be planted too
            grading = self.client.get_experiment_by_name(self.roster.grading_experiment)
            if grading is not None:
                self.preexisting.append(("experiment", grading.experiment_id, grading.name, None))

    # -- who can write what -------------------------------------------------------------------
    def _accounts(self) -> list[str]:
        """Every account on the server that is not an admin (students, and anyone else)."""
        from mlflow.server.auth.routes import LIST_USERS

        users = self.auth._request(LIST_USERS, "GET").get("users", [])
        return sorted(u["username"] for u in users if not u.get("is_admin"))

    def _writers(self, kind: str, resource: str, allowed: tuple[str, ...] = ()) -> list[str]:
        """Non-admin accounts, other than `allowed`, that can change `resource`."""
        return [
            f"{user} ({permission})"
            for user in self._accounts()
            if user not in allowed
            and (permission := self.auth.get_user_permission(user, kind, resource).permission)
            in _WRITE
        ]

    def _only(self, exp_name: str, allowed: tuple[str, ...]) -> None:
        """Nobody but `allowed` writes the teacher's experiment `exp_name`: any other account's
        grant (a non-enrolled login that created it first, a removed student) is revoked."""
        exp_id = self._experiment_id(exp_name)
        for user in self._accounts():
            if user in allowed:
                continue
            effective = self.auth.get_user_permission(user, "experiment", exp_id).permission
            if effective not in _WRITE:
                continue
            self.auth.revoke_user_permission(user, "experiment", exp_id)
            if self.auth.get_user_permission(user, "experiment", exp_id).permission in _WRITE:
                raise DeepReproError(
                    f"{exp_name}: {user} can still write it through a role; unassign that "
                    "role (MLflow's admin UI), then enrol again"
                )
            self.report.append(f"{exp_name}: {user} had {effective} on it: revoked")

    # -- accounts ----------------------------------------------------------------------------
    def account(self, student: Student, reset: bool) -> str | None:
        """Create the account, or keep it; returns a password to hand out, if one was set."""
        from mlflow.exceptions import MlflowException

        password = student.password or secrets.token_urlsafe(12)
        try:
            self.auth.create_user(student.name, password)
            self.report.append(f"{student.name}: account created")
            return None if student.password else password
        except MlflowException as exc:
            if not _exists(exc):
                raise
        if not reset:
            return None  # an enrolled student's password is theirs: never changed by a rerun
        self.auth.update_user_password(student.name, password)
        self.report.append(f"{student.name}: password reset")
        return None if student.password else password

    # -- resources ---------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise DeepReproError(
                    f"experiment {name} is deleted but still holds its name; restore it "
                    "(`mlflow experiments restore`) or delete it for good (`mlflow gc`), then "
                    "enrol again"
                )
            return str(exp.experiment_id)
        return str(self.client.create_experiment(name))

    def _model(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if not _exists(exc):
                raise
        return name

    def _grant(self, user: str, kind: str, resource: str, permission: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.auth.grant_user_permission(user, kind, resource, permission)
        except MlflowException as exc:
            if not _exists(exc):
                raise
            # The grant exists (a rerun): make it exactly `permission`.
            self.auth.revoke_user_permission(user, kind, resource)
            self.auth.grant_user_permission(user, kind, resource, permission)

    def _take_back(self, kind: str, resource: str, label: str, owner: str | None) -> None:
        """Revoke every enrolled student's write access to `resource` but its owner's."""
        for other in self.roster.students:
            if other == owner:
                continue
            effective = self.auth.get_user_permission(other, kind, resource).permission
            if effective in _WRITE:
                self.auth.revoke_user_permission(other, kind, resource)
                self.report.append(
                    f"{label}: {other} had {effective} on it (created it first?): revoked"
                )

    def refuse_planted(self, user: str) -> None:
        """A new student's experiment or model that already holds runs or versions was made
        by someone else before enrolment: adopting it would make those the student's (a
        planted @champion). Refused; an empty one is taken back by `secure`."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.roster.experiment(user))
        if exp is not None and self.client.search_runs([exp.experiment_id], max_results=1):
            raise DeepReproError(
                f"{user}: experiment {exp.name} was created before enrolment and holds runs; "
                "delete it for good (`mlflow experiments delete` + `mlflow gc`), then enrol again"
            )
        if exp is not None:
            self.preexisting.append(("experiment", exp.experiment_id, exp.name, user))
        model = self.roster.model(user)
        versions: list[Any] = []
        exists = False
        with contextlib.suppress(MlflowException):  # no such model yet
            self.client.get_registered_model(model)
            exists = True
            versions = list(self.client.search_model_versions(f"name = '{model}'", max_results=1))
        if exists and not versions:
            self.preexisting.append(("registered_model", model, model, user))
        if versions:
            raise DeepReproError(
                f"{user}: registered model {self.roster.model(user)} was created before "
                "enrolment and holds versions; delete it (`MlflowClient().delete_registered_"
                "model`), then enrol again"
            )

    def resources(self, user: str) -> None:
        exp_id = self._experiment_id(self.roster.experiment(user))
        model = self._model(self.roster.model(user))
        self._grant(user, "experiment", exp_id, "MANAGE")
        self._grant(user, "registered_model", model, "MANAGE")
        # Shared Optuna studies: one study run per study, whoever's worker created it.
        studies = self._experiment_id(self.roster.studies_experiment)
        self._grant(user, "experiment", studies, "EDIT")

    def secure(self) -> None:
        """After the roster is complete: nobody but its owner writes a resource that existed
        before enrolment made it (a classmate's pre-claim), and no student writes the
        teacher's experiments."""
        for kind, resource, label, owner in self.preexisting:
            self._take_back(kind, resource, label, owner)
        # The teacher's experiments, made up front: the roster and the grading runs (the
        # board, the deadline snapshots) are written by admins only; the shared studies by
        # enrolled students only. Checked against every account, not just the roster's.
        self._only(self.roster.class_experiment, ())
        self._only(self.roster.grading_experiment, ())
        self._only(self.roster.studies_experiment, self.roster.students)

    def save_roster(self, students: tuple[str, ...]) -> None:
        self.roster = replace(self.roster, students=tuple(sorted(set(students))))
        exp_id = self._experiment_id(self.roster.class_experiment)
        self.client.set_experiment_tag(exp_id, _ROSTER_TAG, self.roster.to_json())

    def remove(self, user: str) -> None:
        """Take a student off the roster: their rights go, their runs and versions stay."""
        if user not in self.roster.students:
            raise DeepReproError(f"--remove {user}: not on the roster")
        exp_id = self._experiment_id(self.roster.experiment(user))
        for kind, resource in (
            ("experiment", exp_id),
            ("registered_model", self.roster.model(user)),
            ("experiment", self._experiment_id(self.roster.studies_experiment)),
        ):
            try:
                self.auth.revoke_user_permission(user, kind, resource)
            except Exception as exc:  # no grant left: nothing to revoke
                if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        self.report.append(f"{user}: removed from the roster (runs and versions kept)")


def write_accounts(path: Path, passwords: dict[str, str]) -> None:
    """Merge `passwords` into the CSV at `path` (mode 600, LF), atomically."""
    path = path.expanduser()
    existing: dict[str, str] = {}
    if path.exists():
        existing = {
            r["username"]: r["password"] for r in csv.DictReader(io.StringIO(path.read_text()))
        }
    existing.update(passwords)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover would keep its own mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["username", "password"])
        writer.writerows(sorted(existing.items()))
    tmp.replace(path)


def enroll(
    uri: str,
    students: list[Student],
    *,
    experiment_prefix: str,
    model_prefix: str,
    accounts: Path,
    reset: tuple[str, ...] = (),
    remove: tuple[str, ...] = (),
) -> list[str]:
    """Enrol `students` (new ones added, existing ones kept), then secure every resource.
    Returns the report lines."""
    names = [s.name for s in students]
    for name in reset:
        if name not in names:
            raise DeepReproError(f"--reset {name}: not in the students file")
    for name in remove:
        if name in names:
            raise DeepReproError(f"--remove {name}: still in the students file; take it out")
    e = Enrolment(uri, experiment_prefix, model_prefix)
    for name in names:  # before any change: a planted resource stops the whole enrolment
        if name not in e.roster.students:
            e.refuse_planted(name)
    for name in remove:
        e.remove(name)
    kept = tuple(s for s in e.roster.students if s not in remove)
    passwords: dict[str, str] = {}
    for student in students:
        password = e.account(student, reset=student.name in reset)
        if password:
            passwords[student.name] = password
            # At once: a failure later in the enrolment must not lose a password that is set
            # (a rerun keeps an existing account's password).
            write_accounts(accounts, {student.name: password})
    # The roster first: `secure` then knows every student whose rights it must check.
    e.save_roster((*kept, *names))
    for name in names:
        e.resources(name)
        e.report.append(
            f"{name}: experiment {e.roster.experiment(name)}, model {e.roster.model(name)} (MANAGE)"
        )
    e.secure()
    if passwords:
        e.report.append(f"{len(passwords)} password(s) written to {accounts.expanduser()}")
    return e.report
