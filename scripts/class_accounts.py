"""Create one MLflow account per student on the class server (basic-auth app), from a CSV.

    export MLFLOW_TRACKING_URI=http://teacher-host:5000
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...   # the admin account
    uv run python scripts/class_accounts.py students.csv --out accounts.csv

students.csv has a header `username,password`; an empty password is generated and written,
with the user name, to --out (mode 0600; hand each student their line). For every student this
creates (idempotently) the user, an experiment `<experiment>-<user>` and a registered model
`<model>-<user>`, and gives the student MANAGE on both. With the server's
`default_permission = READ` everybody can read everything (the class leaderboard) but only
change their own runs and move their own model's `@champion`.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"class_accounts: {message}", file=sys.stderr)
    sys.exit(1)


def read_students(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        fail(f"{path}: cannot read ({exc.strerror})")
    students = []
    for number, row in enumerate(rows, start=2):
        name = (row.get("username") or "").strip()
        if not name or "'" in name:
            fail(f"{path}:{number}: expected a `username` column with a name (no quotes)")
        students.append((name, (row.get("password") or "").strip()))
    return students


def setup_student(
    auth: object, client: object, user: str, password: str, experiment: str, model: str
) -> None:
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(user, password)  # type: ignore[attr-defined]
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.update_user_password(user, password)  # type: ignore[attr-defined]
    exp = client.get_experiment_by_name(experiment)  # type: ignore[attr-defined]
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)  # type: ignore
    try:
        client.create_registered_model(model)  # type: ignore[attr-defined]
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for kind, resource in (("experiment", exp_id), ("registered_model", model)):
        auth.grant_user_permission(user, kind, resource, "MANAGE")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="header username,password")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("accounts.csv"),
        help="where generated passwords go (default: accounts.csv)",
    )
    parser.add_argument(
        "--experiment",
        default="fashion-mnist",
        help="experiment prefix: <prefix>-<user> (default: fashion-mnist)",
    )
    parser.add_argument(
        "--model",
        default="fashion-mnist-classifier",
        help="registered model prefix: <prefix>-<user>",
    )
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        fail("set MLFLOW_TRACKING_URI to the class server (http://host:port)")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        fail("set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to the admin account")
    students = read_students(args.csv)

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    generated = []
    for user, password in students:
        if not password:
            password = secrets.token_urlsafe(12)
            generated.append((user, password))
        try:
            setup_student(
                auth, client, user, password, f"{args.experiment}-{user}", f"{args.model}-{user}"
            )
        except MlflowException as exc:
            fail(f"{user}: {exc.error_code}: {str(exc).splitlines()[0][:200]}")
        print(f"{user}: experiment {args.experiment}-{user}, model {args.model}-{user} (MANAGE)")
    if generated:
        tmp = args.out.with_name(args.out.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["username", "password"])
            writer.writerows(generated)
        tmp.replace(args.out)
        print(f"{len(generated)} generated password(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
