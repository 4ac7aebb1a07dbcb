"""The reproduction report: what a reader attaches to a paper or a submission.

`report.json` (every number, for machines) and `report.md` (the same, for people): the commands
run, both environments, every output's md5 side by side, the metrics with their 95% intervals,
and the verdict with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deep_repro.files import write_bytes
from deep_repro.machine import KEYS, LABELS
from deep_repro.reproduction.rerun import Reproduction
from deep_repro.reproduction.verdict import Thresholds


def as_dict(rep: Reproduction, thresholds: Thresholds) -> dict[str, Any]:
    rec = rep.record
    recorded_platform = next(
        (s.platform for s in reversed(rec.stages) if "torch" in s.platform),
        rec.stages[-1].platform if rec.stages else {},
    )
    return {
        "format": "deep-repro/reproduction/1",
        "verdict": rep.verdict.verdict,
        "reason": rep.verdict.reason,
        "first_difference": rep.verdict.first_difference,
        "explanation": rep.verdict.explanation,
        "thresholds": vars(thresholds),
        "original": {
            "ref": rec.ref,
            "run_id": rec.run_id,
            "experiment": rec.experiment,
            "commit": rec.commit,
            "remote": rec.remote,
            "dvc_exp_name": rec.dvc_exp_name,
            "uv_lock_sha256": rec.uv_lock_sha256,
            "platform": recorded_platform,
        },
        "reproduction": {
            "platform": rep.platform_here,
            "data_source": rep.data_source,
            "commands": rep.commands,
            "seconds": round(rep.seconds, 1),
        },
        "stages": [
            {
                "stage": r.stage,
                "seconds": r.seconds,
                "failed": r.failed,
                "platform_differences": r.platform_differences,
                "outputs": r.outputs,
            }
            for r in rep.stages
        ],
        "recorded_metrics": {
            k: v
            for s in rec.stages
            if s.stage == "evaluate"
            for k, v in sorted(s.metrics.items())
            if k.startswith(("val_", "test_")) and "ms_per_image" not in k
        },
        "reproduced_metrics": rep.metrics,
        "statistics": rep.verdict.statistics,
    }


def to_markdown(body: dict[str, Any]) -> str:
    orig, here = body["original"], body["reproduction"]
    lines = [
        f"# Reproduction of {orig['ref']}: {body['verdict']}",
        "",
        f"**Verdict: {body['verdict']}** — {body['reason']}",
        "",
    ]
    if body["explanation"]:
        lines += ["Explained by: " + "; ".join(body["explanation"]), ""]
    lines += [
        "## What was reproduced",
        "",
        f"- run `{orig['run_id']}` (experiment `{orig['experiment']}`)",
        f"- commit `{orig['commit']}` of {orig['remote']}"
        + (f" (DVC experiment `{orig['dvc_exp_name']}`)" if orig["dvc_exp_name"] else ""),
        f"- uv.lock sha256 `{orig['uv_lock_sha256']}`",
        f"- data from {here['data_source']}; {here['seconds']:.0f} s in all",
        "",
        "## Commands",
        "",
        "```",
        *here["commands"],
        "```",
        "",
        "## Platforms",
        "",
        "| | recorded | here |",
        "|---|---|---|",
    ]
    for key in KEYS:
        a, b = orig["platform"].get(key, "—"), here["platform"].get(key, "—")
        mark = " **≠**" if a != b and "—" not in (a, b) else ""
        lines.append(f"| {LABELS[key]} | {a} | {b}{mark} |")
    lines += ["", "## Outputs, stage by stage", "", "| stage | output | recorded md5 | here | |"]
    lines.append("|---|---|---|---|---|")
    for stage in body["stages"]:
        if stage["failed"]:
            lines.append(f"| {stage['stage']} | (failed: {stage['failed']}) | | | ✗ |")
        for out in stage["outputs"]:
            ok = "=" if out["equal"] else "**≠**"
            lines.append(
                f"| {stage['stage']} | {out['path']} | `{out['recorded']}` | "
                f"`{out['reproduced']}` | {ok} |"
            )
    stats = body["statistics"]
    if stats:
        t = body["thresholds"]
        lines += [
            "",
            "## Predictions, image by image",
            "",
            f"Required on every split: agreement >= {t['min_agreement']}, |accuracy difference| "
            f"<= {t['max_accuracy_diff']}, McNemar p >= {t['alpha']}.",
            "",
            "| split | images | agreement | recorded accuracy (95% CI) | reproduced (95% CI) "
            "| McNemar p |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in stats.items():
            if not s.get("comparable"):
                lines.append(f"| {name} | not the same images | | | | |")
                continue
            rl, rh = s["recorded_ci95"]
            pl, ph = s["reproduced_ci95"]
            lines.append(
                f"| {name} | {s['n']} | {s['agreement']:.4f} | {s['recorded_accuracy']:.4f} "
                f"({rl:.4f}–{rh:.4f}) | {s['reproduced_accuracy']:.4f} ({pl:.4f}–{ph:.4f}) "
                f"| {s['mcnemar_p']:.3g} |"
            )
    if body["recorded_metrics"] or body["reproduced_metrics"]:
        lines += ["", "## Metrics", "", "recorded (MLflow):", ""]
        lines += [f"- {k} = {v:.4f}" for k, v in body["recorded_metrics"].items()]
        lines += ["", "reproduced (reports/metrics.json):", "", "```"]
        lines += [json.dumps(body["reproduced_metrics"], indent=1, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write(body: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    write_bytes(js, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
    write_bytes(md, to_markdown(body).encode())
    return js, md
