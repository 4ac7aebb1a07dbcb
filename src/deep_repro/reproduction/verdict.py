"""What "the same result" means, decided from hashes, platforms and per-image predictions.

Three verdicts (exit status 0, 0, 3):

- **bit-identical**: every recorded output md5 equals the reproduced one;
- **statistically equivalent**: the first difference is at `train` or later (float work), the
  recorded platform differs from this one in a fact that can change float sums
  (`deep_repro.machine`), and the reproduced model agrees with the recorded one on the same
  validation and test images in all three ways: per-image agreement >= `min_agreement`,
  accuracy within `max_accuracy_diff`, and the paired exact McNemar test not significant
  (p >= `alpha`). Each alone proves little: a high p-value on a small set says nothing, and two
  models can have equal accuracy while disagreeing on many images;
- **not reproduced**: anything else. A data stage (integer work on files) must be bit-identical
  on any machine; the same platform with different bytes means something other than the
  platform changed the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deep_repro.evaluation.metrics import mcnemar_p_value, wilson_interval
from deep_repro.evaluation.predictions import Predictions
from deep_repro.reproduction.record import DATA_STAGES, Record

BIT_IDENTICAL = "bit-identical"
EQUIVALENT = "statistically equivalent"
NOT_REPRODUCED = "not reproduced"


@dataclass(frozen=True)
class Thresholds:
    min_agreement: float = 0.98
    max_accuracy_diff: float = 0.005
    alpha: float = 0.05


@dataclass
class StageResult:
    """One stage rerun: every recorded output next to its reproduced md5."""

    stage: str
    seconds: float
    outputs: list[dict[str, Any]]  # {path, recorded, reproduced, equal}
    failed: str | None = None  # the stage's error line, when it did not finish
    platform_differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.failed is None and all(o["equal"] for o in self.outputs)

    def summary(self) -> str:
        if self.failed:
            return f"failed: {self.failed}"
        differing = [o["path"] for o in self.outputs if not o["equal"]]
        if not differing:
            return f"{len(self.outputs)} outputs identical"
        return f"{len(differing)} of {len(self.outputs)} outputs differ ({', '.join(differing)})"


def compare_outputs(
    recorded: dict[str, str], reproduced: dict[str, str | None]
) -> list[dict[str, Any]]:
    return [
        {
            "path": path,
            "recorded": md5,
            "reproduced": reproduced.get(path),
            "equal": reproduced.get(path) == md5,
        }
        for path, md5 in sorted(recorded.items())
    ]


def split_statistics(recorded: Predictions, reproduced: Predictions) -> dict[str, dict[str, Any]]:
    """Per split: agreement, both accuracies with 95% intervals, their difference, McNemar p."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(recorded.splits):
        rec, rep = recorded.splits[name], reproduced.splits.get(name)
        if rep is None or rep.images != rec.images or len(rep.labels) != len(rec.labels):
            out[name] = {"comparable": False}
            continue
        n = len(rec.labels)
        out[name] = {
            "comparable": True,
            "n": n,
            "agreement": float((rec.predicted == rep.predicted).mean()) if n else 1.0,
            "recorded_accuracy": rec.accuracy,
            "recorded_ci95": list(wilson_interval(int(rec.correct.sum()), n)),
            "reproduced_accuracy": rep.accuracy,
            "reproduced_ci95": list(wilson_interval(int(rep.correct.sum()), n)),
            "accuracy_diff": rep.accuracy - rec.accuracy,
            "mcnemar_p": mcnemar_p_value(rec.correct, rep.correct),
        }
    return out


def equivalent(stats: dict[str, dict[str, Any]], t: Thresholds) -> tuple[bool, list[str]]:
    """Whether every split passes all three checks, and one line per check that failed."""
    failures = []
    for name, s in stats.items():
        if not s["comparable"]:
            failures.append(f"{name}: not the same images as recorded")
            continue
        if s["agreement"] < t.min_agreement:
            failures.append(f"{name}: agreement {s['agreement']:.4f} < {t.min_agreement}")
        if abs(s["accuracy_diff"]) > t.max_accuracy_diff:
            failures.append(
                f"{name}: accuracy differs by {abs(s['accuracy_diff']):.4f} > {t.max_accuracy_diff}"
            )
        if s["mcnemar_p"] < t.alpha:
            failures.append(f"{name}: McNemar p = {s['mcnemar_p']:.3g} < alpha {t.alpha}")
    return not failures and bool(stats), failures


@dataclass
class Verdict:
    verdict: str
    reason: str
    first_difference: str | None = None  # the first stage whose outputs differ
    explanation: list[str] = field(default_factory=list)  # the platform facts that differ
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 3 if self.verdict == NOT_REPRODUCED else 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_differing(results: list[StageResult]) -> StageResult | None:
    return next((r for r in results if not r.identical), None)


def may_continue(result: StageResult) -> bool:
    """After a stage whose outputs differ: is a statistical verdict still possible (so the
    later stages must run), or is the answer already "not reproduced"?"""
    return (
        result.failed is None
        and result.stage not in DATA_STAGES
        and bool(result.platform_differences)
    )


def decide(
    record: Record,
    results: list[StageResult],
    reproduced_predictions: Predictions | None,
    recorded_predictions: Predictions | None,
    t: Thresholds,
) -> Verdict:
    done = {r.stage for r in results}
    missing = [s.stage for s in record.stages if s.stage not in done]
    first = first_differing(results)
    if first is None and not missing:
        stats = {}
        if recorded_predictions is not None and reproduced_predictions is not None:
            stats = split_statistics(recorded_predictions, reproduced_predictions)
        return Verdict(
            BIT_IDENTICAL,
            f"all {len(results)} stages: every output md5 as recorded",
            statistics=stats,  # (agreement 1.0, p = 1: shown for the report's table)
        )
    if first is None:  # (cannot happen: a stage is only skipped after a difference)
        return Verdict(NOT_REPRODUCED, f"stages not rerun: {', '.join(missing)}")
    where = f"{first.stage}: {first.summary()}"
    if first.failed:
        return Verdict(NOT_REPRODUCED, where, first.stage)
    if first.stage in DATA_STAGES:
        return Verdict(
            NOT_REPRODUCED,
            f"{where}; a data stage must be bit-identical on any machine",
            first.stage,
        )
    if not first.platform_differences:
        return Verdict(
            NOT_REPRODUCED,
            f"{where} on the same platform as recorded: something other than the machine "
            "changed the result",
            first.stage,
        )
    explained = [f"{first.stage}: {d}" for d in first.platform_differences]
    if missing:
        return Verdict(
            NOT_REPRODUCED, f"{where}; stages not rerun: {', '.join(missing)}", first.stage
        )
    if recorded_predictions is None or reproduced_predictions is None:
        return Verdict(
            NOT_REPRODUCED,
            f"{where}; no recorded per-image predictions to judge equivalence (reproduce "
            "the evaluate run downstream of it)",
            first.stage,
            explained,
        )
    stats = split_statistics(recorded_predictions, reproduced_predictions)
    ok, failures = equivalent(stats, t)
    if ok:
        return Verdict(
            EQUIVALENT,
            f"{where}, explained by another platform; predictions agree (>= "
            f"{t.min_agreement:.0%} per image, accuracy within {t.max_accuracy_diff}, "
            f"McNemar p >= {t.alpha} on every split)",
            first.stage,
            explained,
            stats,
        )
    return Verdict(
        NOT_REPRODUCED,
        f"{where}; predictions differ beyond another platform's noise: " + "; ".join(failures),
        first.stage,
        explained,
        stats,
    )
