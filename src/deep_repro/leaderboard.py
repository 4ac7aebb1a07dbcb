"""The leaderboard: best pipeline runs of one or several experiments, as a plain-text table."""

from __future__ import annotations

from typing import Any

from deep_repro.errors import DeepReproError

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


def leaderboard_rows(
    client: Any, exp_id: str | list[str], limit: int, user: str | None = None
) -> list[dict[str, str]]:
    from deep_repro import tracking

    where = f"tags.`{tracking.TAG_KIND}` = 'pipeline'"
    if user:
        if "'" in user:
            raise DeepReproError(f"--user {user!r}: a user name cannot contain a quote")
        where += f" and tags.`{tracking.TAG_PREFIX}.user` = '{user}'"
    runs = client.search_runs(
        [exp_id] if isinstance(exp_id, str) else exp_id,
        filter_string=where,
        order_by=["metrics.test_accuracy DESC", "attributes.start_time DESC"],
        max_results=1000,
    )
    rows: list[dict[str, str]] = []
    for run in runs:
        metrics = run.data.metrics
        if "test_accuracy" not in metrics:
            continue
        tags, params = run.data.tags, run.data.params
        rows.append(
            {
                "rank": str(len(rows) + 1),
                "test_acc": f"{metrics['test_accuracy']:.4f}",
                "val_acc": f"{metrics.get('val_accuracy', float('nan')):.4f}",
                "test_f1": f"{metrics.get('test_macro_f1', float('nan')):.4f}",
                **{col: _short(params.get(key, "")) for col, key in LEADERBOARD_PARAMS.items()},
                "user": tags.get(f"{tracking.TAG_PREFIX}.user", ""),
                "commit": tags.get(f"{tracking.TAG_PREFIX}.git.commit", "")[:8],
                "dvc_exp": tags.get(f"{tracking.TAG_PREFIX}.dvc_exp_name", ""),
                "run_id": run.info.run_id,
            }
        )
        if len(rows) >= limit:
            break
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no evaluated pipeline runs yet: run `uv run dvc repro`)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)
