"""The teacher's commands: `deep-repro class enroll` and `deep-repro grade`.

Both talk to the class server as its admin (MLFLOW_TRACKING_USERNAME / _PASSWORD, the variables
MLflow defines) and take the names of the class from the project config (`tracking.experiment`,
`tracking.model_name`) unless told otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError, first_line

DEFAULT_GRADES = Path("grading")


def _server(args: argparse.Namespace) -> tuple[str, str, str]:
    """(tracking URI, experiment prefix, model prefix) of the class."""
    from deep_repro import config, tracking

    cfg = None
    try:
        cfg = config.load_config(model=False)
    except DeepReproError:
        cfg = None
    uri = tracking.tracking_uri(cfg.tracking.uri if cfg else None, args.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        raise DeepReproError(
            f"the class server is an http(s):// MLflow server; the tracking URI is {uri} "
            "(set MLFLOW_TRACKING_URI or --tracking-uri)"
        )
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise DeepReproError(
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the server's admin login"
        )
    prefix = args.experiment_prefix or (cfg.tracking.experiment if cfg else "fashion-mnist")
    model = args.model_prefix or (cfg.tracking.model_name if cfg else "fashion-mnist-classifier")
    return uri, prefix, model


def cmd_enroll(args: argparse.Namespace) -> int:
    from deep_repro.classroom.enrolment import enroll, read_students

    students = read_students(Path(args.students))  # bad input fails before any server call
    from mlflow.exceptions import MlflowException

    uri, prefix, model = _server(args)
    try:
        report = enroll(
            uri,
            students,
            experiment_prefix=prefix,
            model_prefix=model,
            accounts=Path(args.accounts),
            reset=tuple(args.reset),
            remove=tuple(args.remove),
        )
    except MlflowException as exc:  # the server's refusal, in one line (what was done is kept)
        from deep_repro.tracking import unusable

        if "401" in str(exc) or "403" in str(exc):
            raise unusable(uri, exc) from None
        raise DeepReproError(f"class enroll: the server refused: {first_line(exc)}") from None
    print("\n".join(report))
    return 0


def _as_of_ms(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise DeepReproError(
            f"--as-of {text!r}: expected an ISO time, e.g. 2026-12-06T18:00+01:00"
        ) from None
    if when.tzinfo is None:  # a deadline typed without an offset is this machine's local time
        when = when.astimezone()
    return int(when.timestamp() * 1000)


def load_canonical(split: Path, test: Path) -> Any:
    from deep_repro.classroom.grading import Canonical
    from deep_repro.data import load_arrays
    from deep_repro.files import file_digest

    for path in (split, test):
        if not path.is_file():
            raise DeepReproError(
                f"{path} not found: grading scores every champion on the class split; "
                "`uv run dvc pull` (or `uv run dvc repro split`) first"
            )
    tv, te = load_arrays(split), load_arrays(test)
    return Canonical(
        tv["x_val"], tv["y_val"], te["x_test"], te["y_test"], file_digest(split), file_digest(test)
    )


def cmd_grade(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from deep_repro.classroom import grading, snapshot
    from deep_repro.classroom.leaderboard import format_table
    from deep_repro.classroom.roster import read_roster
    from deep_repro.paths import repo_root

    as_of = _as_of_ms(args.as_of)
    if args.snapshot and as_of is not None:
        raise DeepReproError("--snapshot pins the champions of now: it takes no --as-of")
    uri, prefix, _ = _server(args)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    roster = read_roster(client, prefix)
    if roster is None:
        raise DeepReproError(
            f"no class roster on {uri} for {prefix}-*: run `deep-repro class enroll` first"
        )
    if args.snapshot:
        run_id, lines = snapshot.take(client, uri, roster)
        print("\n".join(lines))
        print(f"snapshot run {run_id} in experiment {roster.grading_experiment}")
        return 0
    root = repo_root()
    data = load_canonical(root / args.split, root / args.test)
    pins = {}
    if as_of is not None:
        deadline = datetime.datetime.fromtimestamp(as_of / 1000, tz=datetime.UTC)
        print(f"grading the versions in force at {deadline.isoformat()} (UTC)")
        pins = snapshot.pins_at(client, roster, as_of)
        if pins:
            first = next(iter(pins.values()))
            taken = datetime.datetime.fromtimestamp(first.taken_ms / 1000, tz=datetime.UTC)
            print(f"programs as pinned by snapshot {first.run_id} ({taken.isoformat()})")
        else:
            print(
                "no snapshot taken at or after the deadline: programs are read as the server "
                "holds them now (take one at the deadline: `deep-repro grade --snapshot`)"
            )
    grades = grading.grade_class(client, uri, roster, data, as_of, pins)
    if args.reproduce:
        _reproduce_top(client, roster, grades, args.reproduce, Path(args.out))
    print(format_table(grading.board_rows(grades)))
    run_id = grading.publish(client, roster, grades, data, args.as_of, Path(args.out))
    print(f"\nranked by recomputed validation accuracy; board in {args.out}/grades.{{csv,md}}")
    print(f"grading run {run_id} in experiment {roster.grading_experiment}")
    return 0


def _reproduce_top(client: Any, roster: Any, grades: list[Any], k: int, out: Path) -> None:
    """Hand the top `k` of the board to `deep-repro reproduce`: each graded version is rerun
    from its commit in a clean clone (the class's DVC remote or the data mirrors), and the
    verdict joins the board; the reports go to `<out>/reproductions/<student>/`."""
    from deep_repro.errors import first_line
    from deep_repro.reproduction import record as records
    from deep_repro.reproduction import report
    from deep_repro.reproduction.rerun import rerun
    from deep_repro.reproduction.verdict import Thresholds

    thresholds = Thresholds()
    for g in [g for g in grades if g.scored][:k]:
        ref = f"models:/{roster.model(g.student)}/{g.version}"
        print(f"reproducing {g.student}'s {ref} ...")
        try:
            outcome = rerun(records.from_tracking(client, ref), thresholds)
        except DeepReproError as exc:
            g.reproduced = f"cannot: {first_line(exc)}"
            continue
        g.reproduced = outcome.verdict.verdict
        report.write(report.as_dict(outcome, thresholds), out / "reproductions" / g.student)


def add_parsers(sub: Any) -> None:
    """The teacher's subcommands of `deep-repro`."""
    from deep_repro.classroom.enrolment import DEFAULT_ACCOUNTS
    from deep_repro.pipeline import SPLIT_TEST, SPLIT_TRAIN_VAL

    def names(p: argparse.ArgumentParser) -> None:
        p.add_argument("--experiment-prefix", help="default: tracking.experiment")
        p.add_argument("--model-prefix", help="default: tracking.model_name")

    p = sub.add_parser("class", help="teacher: enrol the class on the server")
    class_sub = p.add_subparsers(dest="class_command", required=True)
    p = class_sub.add_parser(
        "enroll",
        help="create (or keep) each student's account, experiment and model; rerun to add some",
        description="Idempotent: existing accounts keep their passwords, each student's "
        "experiment <prefix>-<user> and model <model prefix>-<user> are created by you and "
        "given to that student alone, and the roster is stored on the server.",
    )
    p.add_argument("students", help="CSV with a header username,password (empty: generated)")
    p.add_argument(
        "--accounts",
        default=str(DEFAULT_ACCOUNTS),
        help=f"where generated passwords go, mode 600 (default: {DEFAULT_ACCOUNTS})",
    )
    p.add_argument("--reset", action="append", default=[], metavar="USER", help="new password")
    p.add_argument(
        "--remove", action="append", default=[], metavar="USER", help="take off the roster"
    )
    names(p)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser(
        "grade",
        help="teacher: score every student's champion here and publish the class board",
        description="Fetches each enrolled student's @champion program (safe loader), scores "
        "it on this checkout's validation split and test set, ranks by the recomputed "
        "validation accuracy with McNemar's p vs the best, and flags claims it cannot confirm.",
    )
    p.add_argument(
        "--as-of",
        help="grade the versions in force at this ISO time (a deadline), as the first "
        "snapshot taken at or after it pinned them",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="at the deadline: pin every champion (version, sha256, a copy of the program) in "
        "the grading experiment, for a later --as-of; scores nothing",
    )
    p.add_argument("--out", default=str(DEFAULT_GRADES), help="where grades.csv/.md go")
    p.add_argument("--split", default=SPLIT_TRAIN_VAL, help="the class split (x_val, y_val)")
    p.add_argument("--test", default=SPLIT_TEST, help="the test set (x_test, y_test)")
    p.add_argument(
        "--reproduce",
        type=int,
        default=0,
        metavar="K",
        help="rerun the top K graded versions from their commits (`deep-repro reproduce`) "
        "and add the verdict to the board",
    )
    names(p)
    p.set_defaults(func=cmd_grade)
