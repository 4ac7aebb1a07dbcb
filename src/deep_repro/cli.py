"""`deep-repro` — the commands people type besides `dvc` and `mlflow`.

deep-repro predict IMAGE...            classify image files with the champion model
deep-repro serve [-m MODEL]            serve it over HTTP (MLflow's API, with request limits)
deep-repro lineage RUN_ID|MODEL_URI    chain from a model back to the raw files
deep-repro reproduce RUN_ID|MODEL_URI  rerun it in a clean clone: bit-identical, equivalent, or not
deep-repro leaderboard                 best pipeline runs of the experiment
deep-repro tune [OVERRIDES...]         Optuna search on the train/val split
deep-repro monitor PATH                drift of a batch or prediction log vs validation
deep-repro sync                        send what a tracking outage left in the local spool
deep-repro class enroll STUDENTS.csv   teacher: accounts, experiments, models, the roster
deep-repro grade [--as-of T|--snapshot] teacher: score every champion here, publish the board
deep-repro submit [-S KEY=VALUES ...]  a sweep of experiments as a SLURM job array
deep-repro collect                     finished cluster experiments into this checkout
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from deep_repro.classroom import commands as classroom_commands
from deep_repro.classroom.leaderboard import (
    UNVERIFIED_NOTE,
    format_table,
    leaderboard_rows,
    seed_group_rows,
)
from deep_repro.cluster import commands as cluster_commands
from deep_repro.errors import DeepReproError, TrackingError, entrypoint
from deep_repro.reproduction import commands as reproduction_commands
from deep_repro.serving import server as serve
from deep_repro.serving.predict import load_image, load_predictor, model_error

log = logging.getLogger("deep_repro")


def _tracking(args: argparse.Namespace) -> tuple[Any, str, Any]:
    """Client, experiment id and config (params.yaml when run inside the project)."""
    import deep_repro.models  # noqa: F401  (registers the architectures: `model`'s options)
    from deep_repro import config, tracking

    try:
        cfg = config.load_config()
    except DeepReproError:
        cfg = config.validate(config.compose())
    uri = tracking.tracking_uri(cfg.tracking.uri, args.tracking_uri)
    client, exp_id = tracking.connect(uri, args.experiment or cfg.tracking.experiment)
    tracking.fail_orphan_runs(client, exp_id)  # runs of killed stages/dvc: RUNNING forever
    return client, exp_id, cfg


def _store_uri(args: argparse.Namespace) -> tuple[str, Any]:
    """The tracking store URI and the project config (None outside a project), without
    importing MLflow or the model code (`model` is left unchecked: only `tracking` is read):
    `predict` must start about as fast as `import torch`."""
    from deep_repro import tracking

    return tracking.project_tracking_uri(args.tracking_uri)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from deep_repro.config.task import CLASS_NAMES

    model_ref, uri = args.model, None
    if model_ref is None or model_ref.startswith(("models:/", "runs:/")):
        # a .pt2 file needs no tracking store at all
        uri, cfg = _store_uri(args)
        if model_ref is None:
            if cfg is None:
                from deep_repro import config

                cfg = config.validate(config.compose(), model=False)
            model_ref = f"models:/{cfg.tracking.model_name}@champion"
    predictor = load_predictor(model_ref, uri)
    images, names, failed = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(Path(path)))
            names.append(path)
        except DeepReproError as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed += 1
    if images:
        probs = predictor(np.stack(images))
        for name, p in zip(names, probs, strict=True):
            order = np.argsort(-p, kind="stable")[: args.top]
            ranked = ", ".join(f"{CLASS_NAMES[i]} {p[i]:.3f}" for i in order[1:])
            extra = f"  (then: {ranked})" if ranked else ""
            print(f"{name}: {CLASS_NAMES[order[0]]} {p[order[0]]:.3f}{extra}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from deep_repro.serving.predict import use_registry

    model_ref = args.model
    if model_ref is None or model_ref.startswith(("models:/", "runs:/")):
        uri, cfg = _store_uri(args)
        if model_ref is None:
            if cfg is None:
                from deep_repro import config

                cfg = config.validate(config.compose(), model=False)
            model_ref = f"models:/{cfg.tracking.model_name}@champion"
        use_registry(uri)
    serve.serve(model_ref, args.host, args.port, args.max_body_bytes, args.max_batch)
    return 0


# --------------------------------------------------------------------------- lineage
def cmd_lineage(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from deep_repro import tracking

    client, _, _ = _tracking(args)
    try:
        run_id = tracking.resolve_run_id(client, args.ref)
    except MlflowException as exc:
        raise TrackingError(model_error(args.ref, exc)) from None
    if args.export is not None:
        from deep_repro.reproduction.record import from_tracking

        record = from_tracking(client, args.ref)
        record.save(args.export)
        print(
            f"{args.export}: the record of run {record.run_id} ({len(record.stages)} stages, "
            f"commit {record.commit[:12]}); `deep-repro reproduce --record {args.export}` "
            "reproduces it from git and the DVC remote alone"
        )
        return 0
    from deep_repro.pipeline import STAGES

    order = list(STAGES)
    chain = sorted(
        tracking.lineage_chain(client, run_id),
        key=lambda r: -order.index(r.data.tags.get(tracking.TAG_STAGE, order[0])),
    )
    print(f"Lineage of {args.ref}: {len(chain)} stage runs, from the model back to the raw files")
    me = chain[0].data.tags.get(f"{tracking.TAG_PREFIX}.user") if chain else None
    for run in chain:
        tags, params = run.data.tags, run.data.params
        stage = tags.get(tracking.TAG_STAGE, "?")
        parent = tags.get(tracking.TAG_PARENT, "-")
        commit = tags.get(f"{tracking.TAG_PREFIX}.git.commit", "unknown")
        dirty = " (dirty)" if tags.get(f"{tracking.TAG_PREFIX}.git.dirty") == "true" else ""
        exp = tags.get(f"{tracking.TAG_PREFIX}.dvc_exp_name")
        print(f"\n[{stage}] run {run.info.run_id}  pipeline run {parent}  status {run.info.status}")
        print(f"  git commit {commit}{dirty}" + (f"  dvc experiment {exp}" if exp else ""))
        for key in sorted(params):
            print(f"  param  {key} = {params[key]}")
        for key in sorted(tags):
            if key.startswith(tracking.IN_PREFIX):
                up = tags.get(tracking.UPSTREAM_PREFIX + key[len(tracking.IN_PREFIX) :], "none")
                print(f"  input  {key[len(tracking.IN_PREFIX) :]}  md5 {tags[key]}  <- run {up}")
        for key in sorted(tags):
            if key.startswith(tracking.OUT_PREFIX):
                print(f"  output {key[len(tracking.OUT_PREFIX) :]}  md5 {tags[key]}")
        user = tags.get(f"{tracking.TAG_PREFIX}.user")
        if user and user != me:
            print(f"  by {user} (another user's run)")
        # The commit and the recorded params are what a reproduction uses: a DVC experiment
        # lives only in its author's checkout until pushed, so name what must be pushed.
        push = f"; its commit must be on the remote (`git push`, or `dvc exp push origin {exp}`)"
        print(f"  reproduce: uv run deep-repro reproduce {run.info.run_id}" + (push if exp else ""))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Creates no experiment; its one write closes runs this machine's dead processes left
    RUNNING in the experiment it shows (as every command does)."""
    from deep_repro import config, tracking
    from deep_repro.classroom.roster import read_roster

    try:
        cfg = config.load_config(model=False)
    except DeepReproError:
        cfg = config.validate(config.compose(), model=False)
    uri = tracking.tracking_uri(cfg.tracking.uri, args.tracking_uri)
    client = tracking.read_client(uri)
    pattern = getattr(args, "experiment", None) or args.experiment or cfg.tracking.experiment
    owners = None
    if "*" in pattern:  # the class: one experiment per student, `fashion-mnist-*`
        roster = read_roster(client, pattern[:-2]) if pattern.endswith("-*") else None
        if roster is not None:  # enrolled students' experiments, looked up by name
            found = [client.get_experiment_by_name(roster.experiment(u)) for u in roster.students]
            owners = {
                e.experiment_id: str(roster.owner_of_experiment(e.name))
                for e in found
                if e is not None
            }
            exp_ids = list(owners)
        else:
            like = pattern.replace("'", "").replace("*", "%")
            matches = client.search_experiments(
                filter_string=f"name LIKE '{like}'", max_results=1000
            )
            exp_ids = [e.experiment_id for e in matches]
    else:
        exp = client.get_experiment_by_name(pattern)
        exp_ids = [exp.experiment_id] if exp is not None else []
        if exp is not None:
            tracking.fail_orphan_runs(client, exp.experiment_id)  # killed stages: RUNNING forever
    if not exp_ids:
        raise DeepReproError(f"--experiment {pattern}: no MLflow experiment matches on {uri}")
    user = tracking.run_user(cfg.tracking.user) if args.mine else args.user
    rows = (seed_group_rows if args.by_seed else leaderboard_rows)(
        client, exp_ids, args.limit, user=user, owners=owners
    )
    print(format_table(rows))
    if any(r["rank"] == "-" for r in rows):
        print(f"\n{UNVERIFIED_NOTE}")
    return 0


# --------------------------------------------------------------------------- tune
def tune_settings(conf_dir: Path) -> list[tuple[str, str, str]]:
    """(key, default, comment) of every `tune.*` setting in conf/config.yaml: read as text at
    `--help` time, so the help shows what the composition really holds, for a few ms."""
    try:
        lines = (conf_dir / "config.yaml").read_text().splitlines()
    except OSError:
        return []
    settings, inside = [], False
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            inside = line.split("#")[0].strip() == "tune:"
            continue
        if inside and line.startswith("  ") and not line.startswith("   ") and ":" in line:
            body, _, comment = line.partition("#")
            key, _, value = body.strip().partition(":")
            settings.append((f"tune.{key.strip()}", value.strip(), comment.strip()))
    return settings


def tune_epilog() -> str:
    from deep_repro.paths import repo_root

    conf = repo_root() / "conf"
    rows = tune_settings(conf)
    if rows:
        width = max(len(f"{k}={v}") for k, v, _ in rows)
        table = "\n".join(f"  {f'{k}={v}':<{width}}  {c}".rstrip() for k, v, c in rows)
        listing = f"settings (defaults from {conf / 'config.yaml'}):\n{table}"
    else:
        listing = "settings: run inside the project to list the tune.* settings of conf/"
    return (
        f"{listing}\n\nany other config key is an override too (the search space itself is "
        "conf/search/<model>.yaml).\n\nexamples:\n"
        "  deep-repro tune                                  # the default model, 20 trials\n"
        "  deep-repro tune model=mlp tune.n_trials=50 tune.epochs=5\n"
        "  deep-repro tune model=cnn tune.sampler=random tune.timeout=3600\n"
        "  deep-repro tune model=logreg data.subset=5000 tune.study_name=quick-look"
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from deep_repro.tuning import run_study

    if args.repair_journal:
        from deep_repro.tuning.journal import repair_journal

        if args.overrides:
            raise DeepReproError("--repair-journal takes no overrides")
        print(repair_journal(Path(args.repair_journal)))
        return 0

    if args.submit is not None:
        return cluster_commands.submit_tune(args)
    run_study(args.overrides)
    return 0


# --------------------------------------------------------------------------- monitor
def cmd_monitor(args: argparse.Namespace) -> int:
    from deep_repro import monitoring
    from deep_repro.monitoring import report as monitoring_report
    from deep_repro.paths import repo_root
    from deep_repro.pipeline import SPLIT_TRAIN_VAL

    if not 0 < args.alpha < 1 or args.permutations < 100:
        raise DeepReproError(
            f"--alpha = {args.alpha} must lie in (0, 1) and --permutations = "
            f"{args.permutations} must be >= 100"
        )
    os.environ.pop("DEEP_REPRO_PREDICTION_LOG", None)  # monitoring's own predictions
    client, exp_id, cfg = _tracking(args)
    model_ref = args.model or f"models:/{cfg.tracking.model_name}@champion"
    predictor = load_predictor(model_ref)
    reference = monitoring.Reference(
        *monitoring.load_reference(Path(args.reference or repo_root() / SPLIT_TRAIN_VAL)),
        predictor,
        seed=args.seed,
    )
    batch = monitoring.load_batch(Path(args.path), predictor, since=args.since)
    report = reference.compare(batch, alpha=args.alpha, permutations=args.permutations)
    for check in report.checks:
        log.info(
            "%-10s statistic %10.4g  p %9.3g  %s%s",
            check.name,
            check.statistic,
            check.p_value,
            check.detail,
            "  <- FIRED" if check in report.fired else "",
        )
    tags = monitoring_report.model_tags(client, exp_id, model_ref, cfg.tracking.model_name)
    md5s = {str(m["md5"]) for m in batch.models if m.get("md5")}
    if md5s and monitoring_report.TAG_MD5 in tags and md5s != {tags[monitoring_report.TAG_MD5]}:
        log.warning(
            "the prediction log was written by other model(s) (md5 %s) than %s",
            ", ".join(sorted(md5s)),
            model_ref,
        )
    if not args.no_log:
        run_id = monitoring_report.log_monitoring_run(
            client, exp_id, report, batch, reference, tags, str(args.path)
        )
        log.info("monitoring run %s", run_id)
    print(report.verdict())
    return 3 if report.drift else 0


# --------------------------------------------------------------------------- sync
def cmd_sync(args: argparse.Namespace) -> int:
    from deep_repro.tracking.spool import spool_dir
    from deep_repro.tracking.sync import sync

    if not any(spool_dir().glob("*.jsonl")):
        print(f"nothing to sync ({spool_dir()} holds no spooled runs)")
        return 0
    client, _, _ = _tracking(args)  # still down: one line, exit 2, the spool kept
    report = sync(client)
    for problem in report.problems:
        log.warning("not synced: %s", problem)
    print(report.summary())
    return 0 if report.completed == report.files else 1


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deep-repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: tracking.uri, "
        "MLFLOW_TRACKING_URI, or the repo's mlflow.db)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify image files")
    p.add_argument("images", nargs="+", help="image files (any size/mode)")
    p.add_argument(
        "--model",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a "
        ".pt2 file (default: models:/<tracking.model_name>@champion)",
    )
    p.add_argument("--top", type=int, default=2, help="classes to show per image")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP: MLflow's scoring API with request limits",
        description="MLflow's scoring app (the /invocations, /ping, /health, /version of "
        "`mlflow models serve`) with a body-size and batch limit (413), Parquet refused (415: "
        "it cannot be bounded before decoding), uint8 images as application/x-npy taken, and "
        "error bodies that never echo the input or a stack trace.",
    )
    p.add_argument(
        "-m",
        "--model",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a local model "
        "directory (default: models:/<tracking.model_name>@champion)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("-p", "--port", type=int, default=5001)
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=serve.DEFAULT_MAX_BODY,
        help="larger request bodies are refused with 413 before they are read",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=serve.DEFAULT_MAX_BATCH,
        help="more images per request are refused (413)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("lineage", help="chain from a run or model back to the raw files")
    p.add_argument("ref", help="a run id (stage or pipeline run) or models:/NAME@ALIAS")
    p.add_argument(
        "--export",
        type=Path,
        metavar="RECORD.json",
        help="write the record a reproduction needs (commit, remote, params, every stage's "
        "dvc.lock entry, metrics, platform, predictions) for `reproduce --record`",
    )
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser(
        "leaderboard", help="best pipeline runs by validation accuracy (test: reported only)"
    )
    p.add_argument("--limit", type=int, default=20)
    p.add_argument(
        "--by-seed",
        action="store_true",
        help="one row per config run under several seeds (`dvc exp run -S seed=1,2,3`): "
        "mean ± std across seeds",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", help="only this user's runs (tag deep_repro.user)")
    who.add_argument(
        "--mine",
        action="store_true",
        help="only my runs (tracking.user, MLFLOW_TRACKING_USERNAME or the OS user)",
    )
    # SUPPRESS: without the flag, the global `--experiment` (before the command) still applies.
    p.add_argument(
        "--experiment",
        default=argparse.SUPPRESS,
        help="MLflow experiment; `*` matches several (a class: 'fashion-mnist-*') "
        "(default: tracking.experiment)",
    )
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser(
        "tune",
        help="Optuna hyperparameter search (Hydra-style overrides)",
        description="Optuna search on the train/val split; overrides use "
        "Hydra syntax (key=value, group=option).",
        epilog=tune_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="e.g. model=cnn tune.n_trials=30")
    p.add_argument(
        "--repair-journal",
        metavar="JOURNAL",
        help="rewrite a damaged Optuna journal file keeping every whole record (a backup is "
        "kept next to it), then exit",
    )
    p.add_argument(
        "--submit",
        type=int,
        metavar="N",
        help="run N workers of this study as a SLURM job array (tune.storage must be "
        "PostgreSQL; cluster options from cluster.yaml); rerun without it to export the winner",
    )
    p.add_argument("--settings", help="with --submit: cluster settings (default: cluster.yaml)")
    p.add_argument("--wait", action="store_true", help="with --submit: until every worker ended")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "monitor", help="drift check of a batch vs the validation data (exit 0: no drift, 3: drift)"
    )
    p.add_argument(
        "path",
        help="prediction-log dir or .jsonl, .npz with 'images' [N,28,28] "
        "uint8 (+ optional 'labels'), or a directory of image files",
    )
    p.add_argument(
        "--model", help="as for predict (default: models:/<tracking.model_name>@champion)"
    )
    p.add_argument(
        "--reference",
        help="reference .npz with x_val/y_val or images/labels "
        "(default: the validation part of data/split/train_val.npz)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="false-alarm rate, Bonferroni-split over the checks",
    )
    p.add_argument("--since", help="prediction logs: only records at/after this ISO time")
    p.add_argument("--permutations", type=int, default=2000, help="for the MMD test")
    p.add_argument("--seed", type=int, default=0, help="reference subsample and permutations")
    p.add_argument("--no-log", action="store_true", help="do not record an MLflow run")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser(
        "sync",
        help="replay runs spooled during a tracking outage (safe to "
        "rerun; exit 1 if some are left)",
    )
    p.set_defaults(func=cmd_sync)
    reproduction_commands.add_parsers(sub)
    cluster_commands.add_parsers(sub)
    classroom_commands.add_parsers(sub)
    return parser


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
