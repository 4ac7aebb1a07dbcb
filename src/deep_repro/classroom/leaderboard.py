"""The leaderboard: best pipeline runs of one or several experiments, as a plain-text table.

Ranked by validation accuracy; every accuracy is shown with its 95% interval (one run) or as
mean ± std across seeds (`--by-seed`). A student's own exploration tool: only runs whose numbers
their own finished `evaluate` stage run logged are ranked (a hand-made "pipeline run" is listed
apart, unranked), and on a class server a run's owner is the enrolled student whose experiment
holds it (`classroom.roster`), not the user name a client wrote into its tags. The graded board,
recomputed by the teacher, is `deep-repro grade`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from deep_repro.errors import DeepReproError

# Runs are ranked by validation accuracy: ranking by test accuracy across many experiments
# would select on the test set and make the winner's test number optimistic.
RANK_METRIC = "val_accuracy"

# column -> pipeline-run param shown in the leaderboard
LEADERBOARD_PARAMS = {
    "model": "model.name",
    "lr": "model.lr",
    "optimizer": "optimizer.name",
    "scheduler": "scheduler.name",
    "augment": "augment.name",
    "epochs": "train.epochs",
    "subset": "data.subset",
}


def _short(value: str) -> str:
    """Numbers to 4 significant digits (a tuned lr is 0.005496154572586805)."""
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def _pm(metrics: dict[str, float], prefix: str) -> str:
    """`0.9235 ± 0.0052`: the accuracy with the half-width of its 95% Wilson interval."""
    acc = metrics.get(f"{prefix}_accuracy")
    if acc is None:
        return ""
    low = metrics.get(f"{prefix}_accuracy_ci95_low")
    high = metrics.get(f"{prefix}_accuracy_ci95_high")
    if low is None or high is None:
        return f"{acc:.4f}"
    return f"{acc:.4f} ± {(high - low) / 2:.4f}"


# experiment id -> its enrolled owner, on a class server (None: no roster, tags name users)
Owners = dict[str, str] | None


def _verified(client: Any, exp_ids: list[str]) -> set[tuple[str, float]]:
    """(pipeline run id, val accuracy) logged by a finished evaluate stage run *in the pipeline
    run's own experiment* (a run elsewhere naming it as parent is someone else's word)."""
    from deep_repro import tracking

    where = f"tags.`{tracking.TAG_STAGE}` = 'evaluate' and attributes.status = 'FINISHED'"
    backed: set[tuple[str, float]] = set()
    for exp_id in exp_ids:
        for r in client.search_runs([exp_id], filter_string=where, max_results=50000):
            parent = r.data.tags.get("mlflow.parentRunId")
            if parent and RANK_METRIC in r.data.metrics:
                backed.add((f"{exp_id}/{parent}", r.data.metrics[RANK_METRIC]))
    return backed


def _pipeline_runs(client: Any, exp_ids: list[str], user: str | None, owners: Owners) -> list[Any]:
    """Evaluated pipeline runs, best VALIDATION accuracy first (test never decides a rank),
    each with `.verified` (backed by its own evaluate stage) and `.owner` set."""
    from deep_repro import tracking

    if user and "'" in user:
        raise DeepReproError(f"--user {user!r}: a user name cannot contain a quote")
    if owners is not None and user:  # a class: whose experiment, not which tag
        exp_ids = [e for e in exp_ids if owners.get(e) == user]
        if not exp_ids:
            return []
    where = f"tags.`{tracking.TAG_KIND}` = 'pipeline'"
    if user and owners is None:
        where += f" and tags.`{tracking.TAG_PREFIX}.user` = '{user}'"
    runs = client.search_runs(
        exp_ids,
        filter_string=where,
        order_by=[f"metrics.{RANK_METRIC} DESC", "attributes.start_time DESC"],
        max_results=5000,
    )
    runs = [r for r in runs if RANK_METRIC in r.data.metrics]
    backed = _verified(client, exp_ids)
    for r in runs:
        key = f"{r.info.experiment_id}/{r.info.run_id}"
        r.verified = (key, r.data.metrics[RANK_METRIC]) in backed
        r.owner = (
            owners.get(r.info.experiment_id, "")
            if owners is not None
            else r.data.tags.get(f"{tracking.TAG_PREFIX}.user", "")
        )
    return [r for r in runs if r.verified] + [r for r in runs if not r.verified]


def leaderboard_rows(
    client: Any, exp_ids: list[str], limit: int, user: str | None = None, owners: Owners = None
) -> list[dict[str, str]]:
    from deep_repro import tracking

    rows: list[dict[str, str]] = []
    ranked = 0
    for run in _pipeline_runs(client, exp_ids, user, owners)[:limit]:
        metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
        ranked += run.verified
        rows.append(
            {
                "rank": str(ranked) if run.verified else "-",
                "val_acc (ranks)": _pm(metrics, "val"),
                "test_acc": _pm(metrics, "test"),
                "test_f1": f"{metrics.get('test_macro_f1', float('nan')):.4f}",
                **{col: _short(params.get(key, "")) for col, key in LEADERBOARD_PARAMS.items()},
                "seed": params.get("seed", ""),
                "user": run.owner,
                "commit": tags.get(f"{tracking.TAG_PREFIX}.git.commit", "")[:8],
                "dvc_exp": tags.get(f"{tracking.TAG_PREFIX}.dvc_exp_name", ""),
                "run_id": run.info.run_id,
            }
        )
    return rows


def _seed_group(run: Any) -> tuple[str, ...]:
    """What makes two runs "the same experiment but for the seed": every pipeline param except
    `seed` (tracking.* only says where results go), the user and the code commit."""
    from deep_repro import tracking

    params = sorted(
        (k, v) for k, v in run.data.params.items() if k != "seed" and not k.startswith("tracking.")
    )
    tags = run.data.tags
    return (
        run.owner,
        tags.get(f"{tracking.TAG_PREFIX}.git.commit", ""),
        *(f"{k}={v}" for k, v in params),
    )


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def seed_group_rows(
    client: Any, exp_ids: list[str], limit: int, user: str | None = None, owners: Owners = None
) -> list[dict[str, str]]:
    """One row per config run under several seeds: mean ± standard deviation ACROSS seeds (the
    seed-to-seed spread, not the interval of one run), ranked by mean validation accuracy. A
    rerun of the same seed counts once (its latest run); unverified runs are left out."""
    from deep_repro import tracking

    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for run in _pipeline_runs(client, exp_ids, user, owners):
        if not run.verified:
            continue
        seed = run.data.params.get("seed", "")
        group = groups.setdefault(_seed_group(run), {})
        latest = group.get(seed)
        if latest is None or run.info.start_time > latest.info.start_time:
            group[seed] = run
    ranked = sorted(
        groups.values(),
        key=lambda g: -statistics.fmean(r.data.metrics[RANK_METRIC] for r in g.values()),
    )
    rows: list[dict[str, str]] = []
    for group in ranked[:limit]:
        runs = [group[s] for s in sorted(group, key=lambda s: (len(s), s))]
        first = runs[0]
        params, tags = first.data.params, first.data.tags
        rows.append(
            {
                "rank": str(len(rows) + 1),
                "val_acc mean ± std (ranks)": _mean_std(
                    [r.data.metrics[RANK_METRIC] for r in runs]
                ),
                "test_acc mean ± std": _mean_std(
                    [r.data.metrics.get("test_accuracy", math.nan) for r in runs]
                ),
                "n": str(len(runs)),
                "seeds": ",".join(r.data.params.get("seed", "?") for r in runs),
                **{col: _short(params.get(key, "")) for col, key in LEADERBOARD_PARAMS.items()},
                "user": first.owner,
                "commit": tags.get(f"{tracking.TAG_PREFIX}.git.commit", "")[:8],
            }
        )
    return rows


UNVERIFIED_NOTE = (
    "rank -: no finished evaluate stage run of its own logged these numbers (a run made by "
    "hand, or an interrupted pipeline): listed, never ranked"
)


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no evaluated pipeline runs yet: run `uv run dvc repro`)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)
