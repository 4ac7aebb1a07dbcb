"""`deep-repro reproduce`: rerun a recorded result elsewhere and say whether it holds.

    deep-repro reproduce RUN_ID | models:/NAME@ALIAS | models:/NAME/N
    deep-repro reproduce --record record.json     (from `deep-repro lineage RUN --export`)

Exit status: 0 bit-identical or statistically equivalent, 3 not reproduced, 2 cannot be
reproduced (dirty run, commit not pushed, data nowhere) or a usage error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from deep_repro.errors import DeepReproError

log = logging.getLogger("deep_repro")

EXPERIMENT = "reproductions"  # where reproduction runs go, unless --experiment says otherwise


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="rerun a recorded result in a clean clone and judge it (exit 0 reproduced, "
        "3 not reproduced, 2 cannot be)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "ref", nargs="?", help="a pipeline or stage run id, models:/NAME@ALIAS or models:/NAME/N"
    )
    p.add_argument(
        "--record", type=Path, help="a record file (`lineage RUN --export`) instead of a run"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where report.md and report.json go (default: reproductions/<run id>)",
    )
    p.add_argument("--min-agreement", type=float, default=0.98, help="per-image, every split")
    p.add_argument("--max-accuracy-diff", type=float, default=0.005, help="absolute, every split")
    p.add_argument("--alpha", type=float, default=0.05, help="McNemar's test, every split")
    p.add_argument(
        "--dvc-remote", help="a DVC remote URL holding the data, if the commit names none"
    )
    p.add_argument(
        "--keep-workspace", action="store_true", help="keep the clone (in the cache) afterwards"
    )
    p.add_argument("--no-log", action="store_true", help="record no reproduction run in MLflow")
    # SUPPRESS: without the flag, the global `--experiment` (before the command) still applies.
    p.add_argument(
        "--experiment",
        default=argparse.SUPPRESS,
        help=f"MLflow experiment of the reproduction run (default: {EXPERIMENT})",
    )
    p.set_defaults(func=cmd_reproduce)


def _store(args: argparse.Namespace) -> str:
    from deep_repro import tracking

    return tracking.project_tracking_uri(args.tracking_uri)[0]


def _check_thresholds(args: argparse.Namespace) -> Any:
    from deep_repro.reproduction.verdict import Thresholds

    for name in ("min_agreement", "alpha"):
        value = getattr(args, name)
        if not 0.0 < value < 1.0 if name == "alpha" else not 0.0 <= value <= 1.0:
            raise DeepReproError(f"--{name.replace('_', '-')} = {value}: expected a fraction")
    if not 0.0 <= args.max_accuracy_diff <= 1.0:
        raise DeepReproError(
            f"--max-accuracy-diff = {args.max_accuracy_diff}: expected a fraction (0.005 = "
            "half a point)"
        )
    return Thresholds(args.min_agreement, args.max_accuracy_diff, args.alpha)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from deep_repro import tracking
    from deep_repro.reproduction import record as records
    from deep_repro.reproduction import report
    from deep_repro.reproduction.rerun import rerun

    if (args.ref is None) == (args.record is None):
        raise DeepReproError("reproduce: give a run (RUN_ID or models:/...) or --record FILE")
    thresholds = _check_thresholds(args)
    uri = None
    if args.record is not None:
        rec = records.load(args.record)
    else:
        uri = _store(args)
        rec = records.from_tracking(tracking.read_client(uri), args.ref)
    outcome = rerun(rec, thresholds, dvc_remote=args.dvc_remote, keep=args.keep_workspace)
    body = report.as_dict(outcome, thresholds)
    out = args.out or Path("reproductions") / rec.run_id
    js, md = report.write(body, out)
    if not args.no_log:
        run_id = _log_run(uri or _store(args), args, body, js, md)
        body["reproduction"]["mlflow_run"] = run_id
    v = outcome.verdict
    print(f"{v.verdict}: {v.reason}")
    for line in v.explanation:
        print(f"  explained by {line}")
    for name, s in v.statistics.items():
        if s.get("comparable"):
            print(
                f"  {name}: agreement {s['agreement']:.4f}, accuracy {s['recorded_accuracy']:.4f}"
                f" -> {s['reproduced_accuracy']:.4f}, McNemar p = {s['mcnemar_p']:.3g}"
            )
    print(f"report: {md} ({outcome.seconds:.0f} s)")
    return v.exit_code


def _log_run(uri: str, args: argparse.Namespace, body: dict[str, Any], *files: Path) -> str:
    """The reproduction run: linked to the original by tags, both platforms, the verdict and
    its numbers, the report as artifacts. Written to the configured store, in its own
    experiment; nothing of the original is touched."""
    from deep_repro import tracking
    from deep_repro.tracking.provenance import run_user, source_tags

    client, exp_id = tracking.connect(uri, getattr(args, "experiment", None) or EXPERIMENT)
    orig = body["original"]
    prefix = tracking.TAG_PREFIX
    tags = {
        tracking.TAG_KIND: "reproduction",
        f"{prefix}.reproduces": orig["run_id"],
        f"{prefix}.reproduces_ref": orig["ref"],
        f"{prefix}.verdict": body["verdict"],
        f"{prefix}.first_difference": body["first_difference"] or "none",
        f"{prefix}.git.commit": orig["commit"],
        "mlflow.user": run_user(),
        "mlflow.note.content": f"**{body['verdict']}**: {body['reason']}",
        **source_tags("deep-repro reproduce"),
    }
    tags |= {f"{prefix}.recorded_platform.{k}": v for k, v in orig["platform"].items()}
    tags |= {
        f"{tracking.PLATFORM_PREFIX}{k}": v for k, v in body["reproduction"]["platform"].items()
    }
    run = client.create_run(
        exp_id,
        run_name=f"reproduce-{orig['run_id'][:8]}",
        tags={k: str(v)[:5000] for k, v in tags.items()},
    )
    metrics = {"wall_seconds": body["reproduction"]["seconds"]}
    for split, s in body["statistics"].items():
        if s.get("comparable"):
            metrics |= {
                f"{split}_agreement": s["agreement"],
                f"{split}_accuracy_diff": s["accuracy_diff"],
                f"{split}_mcnemar_p": s["mcnemar_p"],
                f"{split}_accuracy": s["reproduced_accuracy"],
            }
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("reproduction run %s in experiment %s", run.info.run_id, exp_id)
    return str(run.info.run_id)
