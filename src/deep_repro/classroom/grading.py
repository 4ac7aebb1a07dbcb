"""`deep-repro grade`: the class board from numbers the teacher recomputed, never from claims.

For every enrolled student the teacher's machine fetches the `@champion` program (or the one in
force at a deadline), checks it with the same safe loader as `predict` (a tensor-only program,
nothing unpickled), and scores it *itself* on the canonical validation split and test set of
the teacher's checkout. Ranks follow the recomputed validation accuracy (as the gate decides:
selecting on test would make the winner's test number optimistic), each one paired with the
class best by McNemar's exact test on the same images. What a student logged is shown only as
"claimed", and what the numbers alone cannot show is flagged: a program trained on another
split (the test set is public: a student could train on it), two students with the same
program, a claim that the program does not reproduce, a version created after the deadline.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deep_repro.classroom.roster import Roster, owned
from deep_repro.classroom.snapshot import Pin
from deep_repro.errors import TrackingError, first_line
from deep_repro.tracking.gate import CHAMPION

ELECTED = ("first", "promoted", "champion")  # gate decisions that made a version @champion
CLAIM_METRIC = "val_accuracy"  # the gate's tag on a version: what the student's evaluate measured


@dataclass(frozen=True)
class Canonical:
    """The teacher's data: the split every champion is scored on, identified by its md5."""

    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    split_md5: str  # of data/split/train_val.npz, as DVC records it
    test_md5: str


@dataclass
class Grade:
    student: str
    version: str = ""
    sha256: str = ""
    created_ms: int = 0
    val_correct: np.ndarray | None = None
    test_correct: np.ndarray | None = None
    claimed_val: float | None = None
    p_vs_best: float | None = None
    flags: list[str] = field(default_factory=list)
    error: str = ""  # why there is no score (no champion, refused program)
    reproduced: str = ""  # `grade --reproduce K`: the verdict of rerunning this version
    pinned: str = ""  # the deadline snapshot (run id) whose copy of the program was graded

    @property
    def scored(self) -> bool:
        return self.val_correct is not None

    def accuracy(self, split: str) -> float:
        correct = self.val_correct if split == "val" else self.test_correct
        return float(np.mean(correct)) if correct is not None else float("nan")


def _version_in_force(client: Any, model: str, as_of_ms: int | None) -> tuple[Any, list[str]]:
    """The version graded: @champion now, or, with a deadline, the last version created by
    then that the gate elected (aliases keep no history; creation times are the server's)."""
    from mlflow.exceptions import MlflowException

    flags: list[str] = []
    try:
        current = client.get_model_version_by_alias(model, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        current = None
    if as_of_ms is None:
        if current is None:
            raise TrackingError(f"no @{CHAMPION} in {model}")
        return current, flags
    if current is not None and int(current.creation_timestamp) > as_of_ms:
        flags.append(f"late: @champion v{current.version} was created after the deadline")
    versions = [
        v
        for v in client.search_model_versions(f"name = '{model}'", max_results=10000)
        if int(v.creation_timestamp) <= as_of_ms
        and (v.tags.get("gate_decision") in ELECTED or v.version == getattr(current, "version", ""))
    ]
    if not versions:
        raise TrackingError(f"no version of {model} was @champion by the deadline")
    return max(versions, key=lambda v: int(v.creation_timestamp)), flags


def _score(path: Path, data: Canonical) -> tuple[np.ndarray, np.ndarray]:
    """(val correct, test correct) of the program at `path`, scored here."""
    import torch

    from deep_repro.inference.export import load_inference_model, predict_logits

    model = load_inference_model(path)  # refuses anything but a tensor-only program
    with torch.inference_mode():
        val = predict_logits(model, data.x_val).argmax(1).numpy()
        test = predict_logits(model, data.x_test).argmax(1).numpy()
    return val == data.y_val, test == data.y_test


def _program(client: Any, uri: str, grade: Grade, mv: Any, pin: Pin | None, tmp: Path) -> Path:
    """The program graded: the server's files now, or with a deadline snapshot that pinned
    this version, the snapshot's copy (flagged when the server's files changed since)."""
    from deep_repro.classroom.snapshot import pinned_program, program_of

    path = tmp / "now.pt2"
    grade.sha256 = program_of(client, uri, mv, path)
    if pin is None or pin.version != grade.version:
        return path
    if pin.sha256 != grade.sha256:
        grade.flags.append(
            f"replaced: v{grade.version}'s program changed after the snapshot "
            f"(sha256 {pin.sha256[:12]} then, {grade.sha256[:12]} now): graded the snapshot's"
        )
        grade.sha256 = pin.sha256
    grade.pinned = pin.run_id
    return pinned_program(client, pin, tmp / "pinned")


def _flag_numbers(grade: Grade, data: Canonical) -> None:
    measured, n_val = grade.accuracy("val"), len(data.y_val)
    # One image of 10,000 is 0.0001: a rounding of the claim, or one prediction flipped by
    # another CPU's arithmetic, is no discrepancy; two images are.
    if grade.claimed_val is None:
        grade.flags.append("claimed: the version has no gate result")
    elif not abs(grade.claimed_val - measured) <= 1.5 / n_val:  # NaN claims too
        grade.flags.append(f"claimed {grade.claimed_val:.4f} but measured {measured:.4f}")
    # The validation images are public: a program fitted to them (a lookup of their labels)
    # scores far higher there than on test, which selection never touched.
    test, n_test = grade.accuracy("test"), len(data.y_test)
    se = math.sqrt(measured * (1 - measured) / n_val + test * (1 - test) / n_test)
    if measured - test > 3 * max(se, 1 / n_val):
        grade.flags.append(f"val {measured:.4f} >> test {test:.4f}: fitted to the val images?")


def grade_student(
    client: Any,
    uri: str,
    roster: Roster,
    student: str,
    data: Canonical,
    as_of_ms: int | None,
    pin: Pin | None = None,
) -> Grade:
    """One student's grade; whatever their version does (a missing run, a program that does
    not run, a tag that is no number) ends as this student's error, never the whole board's."""
    from deep_repro.pipeline import SPLIT_TRAIN_VAL
    from deep_repro.tracking import IN_PREFIX

    grade = Grade(student)
    try:
        mv, grade.flags = _version_in_force(client, roster.model(student), as_of_ms)
        grade.version, grade.created_ms = str(mv.version), int(mv.creation_timestamp)
        owned(client, roster, student, mv)
        with tempfile.TemporaryDirectory() as tmp:
            path = _program(client, uri, grade, mv, pin, Path(tmp))
            grade.val_correct, grade.test_correct = _score(path, data)
        claim = mv.tags.get(CLAIM_METRIC)
        grade.claimed_val = float(claim) if claim is not None else None
        trained_on = client.get_run(mv.run_id).data.tags.get(f"{IN_PREFIX}{SPLIT_TRAIN_VAL}")
    except Exception as exc:
        grade.val_correct = grade.test_correct = None
        grade.error = f"{type(exc).__name__}: {first_line(exc)}"[:300]
        return grade
    _flag_numbers(grade, data)
    if trained_on != data.split_md5:
        grade.flags.append(
            f"split: trained on {SPLIT_TRAIN_VAL} md5 {str(trained_on)[:8]}, "
            f"not the class split {data.split_md5[:8]}"
        )
    return grade


def grade_class(
    client: Any,
    uri: str,
    roster: Roster,
    data: Canonical,
    as_of_ms: int | None = None,
    pins: dict[str, Pin] | None = None,
) -> list[Grade]:
    """Every enrolled student's grade, ranked: scored ones by recomputed validation accuracy
    (ties: the earlier version first), then the ones without a score."""
    from deep_repro.evaluation.metrics import mcnemar_p_value

    pins = pins or {}
    grades = [
        grade_student(client, uri, roster, s, data, as_of_ms, pins.get(s)) for s in roster.students
    ]
    scored = sorted(
        (g for g in grades if g.scored), key=lambda g: (-g.accuracy("val"), g.created_ms)
    )
    if scored:
        best = scored[0]
        for g in scored:
            assert g.val_correct is not None and best.val_correct is not None
            g.p_vs_best = None if g is best else mcnemar_p_value(g.val_correct, best.val_correct)
    by_program: dict[str, list[str]] = {}
    for g in scored:
        by_program.setdefault(g.sha256, []).append(g.student)
    for g in scored:
        twins = [s for s in by_program[g.sha256] if s != g.student]
        if twins:
            g.flags.append(f"same program as {', '.join(twins)}")
    return scored + [g for g in grades if not g.scored]


def _pm(correct: np.ndarray | None) -> str:
    from deep_repro.evaluation.metrics import wilson_interval

    if correct is None:
        return ""
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return f"{float(np.mean(correct)):.4f} ± {(high - low) / 2:.4f}"


def board_rows(grades: list[Grade]) -> list[dict[str, str]]:
    rows = []
    for rank, g in enumerate(grades, start=1):
        rows.append(
            {
                "rank": str(rank) if g.scored else "-",
                "student": g.student,
                "val_acc (ranks)": _pm(g.val_correct),
                "test_acc": _pm(g.test_correct),
                "p_vs_best": "" if g.p_vs_best is None else f"{g.p_vs_best:.3g}",
                "claimed_val": "" if g.claimed_val is None else f"{g.claimed_val:.4f}",
                "version": g.version,
                "sha256": g.sha256[:12],
                "flags": "; ".join(g.flags) or g.error,
            }
        )
    if any(g.reproduced for g in grades):  # a column only when the teacher asked for it
        for row, g in zip(rows, grades, strict=True):
            row["reproduced"] = g.reproduced
    return rows


def to_csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=list(rows[0]) if rows else ["rank"], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, str]], heading: str) -> str:
    if not rows:
        return f"{heading}\n\n(no student enrolled)\n"
    cols = list(rows[0])
    lines = [heading, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def publish(
    client: Any, roster: Roster, grades: list[Grade], data: Canonical, as_of: str | None, out: Path
) -> str:
    """Write the board (CSV + Markdown) under `out` and log it as one MLflow grading run in the
    teacher's grading experiment; returns the run id."""
    from deep_repro import tracking
    from deep_repro.files import atomic_path

    rows = board_rows(grades)
    heading = (
        f"# Class board: ranked by recomputed validation accuracy ({len(data.y_val)} images; "
        f"test {len(data.y_test)} images, reported only)"
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("grades.csv", to_csv(rows)), ("grades.md", to_markdown(rows, heading))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    _, exp_id = tracking.connect(client.tracking_uri, roster.grading_experiment)
    run = client.create_run(
        exp_id,
        run_name=f"grading-{as_of or 'now'}",
        tags={tracking.TAG_KIND: "grading", "deep_repro.as_of": as_of or "now"},
    )
    run_id = str(run.info.run_id)
    client.log_param(run_id, "split_md5", data.split_md5)
    client.log_param(run_id, "test_md5", data.test_md5)
    client.log_param(run_id, "students", len(roster.students))
    for g in grades:
        if g.scored:
            client.log_metric(run_id, f"val_accuracy.{g.student}", g.accuracy("val"))
            client.log_metric(run_id, f"test_accuracy.{g.student}", g.accuracy("test"))
    client.log_artifact(run_id, str(out / "grades.csv"))
    client.log_artifact(run_id, str(out / "grades.md"))
    # What was graded, by number and full sha256: the record a later dispute is settled by.
    graded = {
        g.student: {
            "model": roster.model(g.student),
            "version": g.version,
            "sha256": g.sha256,
            "created_ms": g.created_ms,
            "program": f"snapshot {g.pinned}" if g.pinned else "the server's files at grading",
        }
        for g in grades
        if g.scored
    }
    client.log_text(run_id, json.dumps(graded, indent=1, sort_keys=True) + "\n", "graded.json")
    client.set_terminated(run_id)
    return run_id
