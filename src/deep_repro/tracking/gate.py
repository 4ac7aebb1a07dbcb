"""Model validation: the gate that moves `@champion`, deciding on validation data only.

Why validation and never test: across many experiments (a class comparing on one server), a gate
or a leaderboard that picks by test accuracy turns the test set into a selection set and the
champion's test number becomes optimistic. The test accuracy is computed and reported; no
decision reads it.

Why a paired test: two models scored on the same 6,000 validation images differ by a few
tenths of a percent from noise alone (the 95% interval of one accuracy is about ±0.7 points).
The gate therefore moves the alias only when the candidate is better than the champion beyond
noise: an exact McNemar test on the images where the two disagree, at `evaluate.alpha`. Runs
that differ only by seed share the validation images (`split.seed` is fixed), so they are
paired image by image; versions validated on other images are never compared.
"""

from __future__ import annotations

import base64
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deep_repro.evaluation.metrics import mcnemar_p_value

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
GATE_MAX_ROUNDS = 20
METRIC = "val_accuracy"  # the number the gate (and the leaderboard rank) decides on
# Model-version tags written by the gate: the evidence another gate needs to pair with us.
TAG_STATUS = "validation_status"
TAG_REASON = "validation_reason"
TAG_CORRECT = "val_correct"  # which validation images the version got right (packed bits)
TAG_IMAGES = "val_images"  # digest of the validation images + labels those bits refer to
TAG_ALPHA = "gate_alpha"
TAG_DECISION = "gate_decision"  # first | promoted | kept | rejected | incomparable | champion
TAG_P_VALUE = "gate_p_value"  # McNemar vs the champion it faced (when paired)
TAG_CHAMPION_ACCURACY = "gate_champion_val_accuracy"


@dataclass(frozen=True)
class Evidence:
    """What the gate knows of one model: its accuracy on the validation images and, image by
    image, which of them it classified correctly (for the paired test)."""

    correct: np.ndarray  # bool per validation image, in split order
    images: str  # digest of the validation images and labels

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if len(self.correct) else 0.0


def encode_correct(correct: np.ndarray) -> str:
    """`n:base64(zlib(packbits))`: 6,000 images fit in ~1 KB of tag value."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return f"{len(correct)}:{base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode()}"


def decode_correct(value: str) -> np.ndarray:
    n, payload = value.split(":", 1)
    bits = np.frombuffer(zlib.decompress(base64.b64decode(payload)), dtype=np.uint8)
    return np.unpackbits(bits)[: int(n)].astype(bool)


@dataclass(frozen=True)
class _Entry:
    version: str
    evidence: Evidence
    alpha: float


@dataclass(frozen=True)
class Verdict:
    """How the election treated one version, against the champion of the versions before it."""

    champion_before: str | None
    champion_accuracy: float | None
    p_value: float | None
    promoted: bool
    comparable: bool


def _entries(client: MlflowClient, model_name: str) -> list[_Entry]:
    """Every validated version carrying complete evidence (older versions gated under another
    rule lack it and take no part: they cannot be paired)."""
    entries = []
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        tags = mv.tags
        if tags.get(TAG_STATUS) != "validated":
            continue
        try:
            evidence = Evidence(decode_correct(tags[TAG_CORRECT]), tags[TAG_IMAGES])
            alpha = float(tags[TAG_ALPHA])
        except (KeyError, ValueError, zlib.error):
            continue
        entries.append(_Entry(str(mv.version), evidence, alpha))
    return sorted(entries, key=lambda e: int(e.version))


def elect(entries: list[_Entry]) -> tuple[str | None, dict[str, Verdict]]:
    """The champion as a pure function of the validated versions, replayed in version order:
    the first becomes champion; a later one replaces it only if it is more accurate on the same
    images AND McNemar's p < its own `evaluate.alpha`. Being a function of the set (which only
    grows), every gate that recomputes it after its last write agrees: no lock needed."""
    champion: _Entry | None = None
    verdicts: dict[str, Verdict] = {}
    for entry in entries:
        if champion is None:
            verdicts[entry.version] = Verdict(None, None, None, True, True)
            champion = entry
            continue
        ours, theirs = entry.evidence, champion.evidence
        if ours.images != theirs.images or len(ours.correct) != len(theirs.correct):
            verdicts[entry.version] = Verdict(champion.version, theirs.accuracy, None, False, False)
            continue
        p = mcnemar_p_value(ours.correct, theirs.correct)
        better = ours.accuracy > theirs.accuracy and p < entry.alpha
        verdicts[entry.version] = Verdict(champion.version, theirs.accuracy, p, better, True)
        if better:
            champion = entry
    return (champion.version if champion else None), verdicts


@dataclass(frozen=True)
class GateDecision:
    validated: bool  # beats evaluate.baseline on validation
    promoted: bool  # this gate moved @champion to the candidate
    reason: str
    p_value: float | None = None  # McNemar, candidate vs the champion before it
    champion_accuracy: float | None = None  # that champion's validation accuracy
    outcome: str = "rejected"  # rejected | first | promoted | kept | incomparable | champion


def _champion_version(client: MlflowClient, model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:  # no alias yet
        return None


def champion_after_election(client: MlflowClient, model_name: str) -> tuple[str | None, Any]:
    """Repeat "read the alias, elect, move the alias" until the alias is the elected version.
    Returns (alias, verdicts of the last election)."""
    champion = _champion_version(client, model_name)
    verdicts: dict[str, Verdict] = {}
    for _ in range(GATE_MAX_ROUNDS):
        champion = _champion_version(client, model_name)  # alias first, then the election
        elected, verdicts = elect(_entries(client, model_name))
        if elected is None or champion == elected:
            break
        client.set_registered_model_alias(model_name, CHAMPION, elected)
    else:
        log.warning(
            "@champion of %s still moving after %d rounds; the last gate settles it",
            model_name,
            GATE_MAX_ROUNDS,
        )
    return champion, verdicts


def validation_gate(
    client: MlflowClient,
    model_name: str,
    version: str,
    evidence: Evidence,
    baseline: float,
    alpha: float,
) -> GateDecision:
    """Validate `version` (validation accuracy > baseline) and let the election decide whether
    it becomes `@champion`. Race-free without locks: the evidence is written first, status last
    (a version counted as validated always has complete evidence), then the election runs until
    the alias agrees with it; whichever concurrent gate finishes last leaves the right champion."""
    previous = _champion_version(client, model_name)
    accuracy = evidence.accuracy
    client.set_model_version_tag(model_name, version, METRIC, f"{accuracy:.6f}")
    client.set_model_version_tag(model_name, version, TAG_CORRECT, encode_correct(evidence.correct))
    client.set_model_version_tag(model_name, version, TAG_IMAGES, evidence.images)
    client.set_model_version_tag(model_name, version, TAG_ALPHA, repr(float(alpha)))
    validated = accuracy > baseline
    client.set_model_version_tag(
        model_name, version, TAG_STATUS, "validated" if validated else "rejected"
    )
    champion, verdicts = champion_after_election(client, model_name)
    verdict = verdicts.get(version)
    ours = f"val accuracy {accuracy:.4f}"
    if not validated or verdict is None:
        decision = GateDecision(
            False, False, f"{ours} does not beat evaluate.baseline {baseline:.4f}"
        )
    elif verdict.champion_before is None:
        decision = GateDecision(
            True,
            champion == version != previous,
            f"{ours} beats evaluate.baseline {baseline:.4f} and no earlier version carries "
            f"validation evidence: version {version} is "
            f"{'now ' if previous != version else ''}@champion",
            outcome="first",
        )
    elif not verdict.comparable:
        decision = GateDecision(
            True,
            False,
            f"{ours}, validated on other images than champion v{verdict.champion_before} "
            "(different data.subset or split): not comparable, champion kept",
            champion_accuracy=verdict.champion_accuracy,
            outcome="incomparable",
        )
    else:
        theirs = f"v{verdict.champion_before}'s {verdict.champion_accuracy:.4f}"
        p = f"McNemar p = {verdict.p_value:.3g}"
        if verdict.promoted:
            reason = f"{ours} beats {theirs} ({p} < alpha {alpha:g}): version {version} is "
            reason += "@champion" if champion == version else f"beaten since by v{champion}"
        else:
            worse = evidence.accuracy <= (verdict.champion_accuracy or 0.0)
            why = "not more accurate" if worse else "not better beyond noise"
            reason = f"{ours} vs {theirs}: {why} ({p}, alpha {alpha:g}); "
            reason += f"@champion stays v{champion}"
        decision = GateDecision(
            True,
            verdict.promoted and champion == version != previous,
            reason,
            p_value=verdict.p_value,
            champion_accuracy=verdict.champion_accuracy,
            outcome="promoted" if verdict.promoted else "kept",
        )
    if validated and champion == version == previous:
        decision = GateDecision(
            True,
            False,
            f"version {version} is already the champion ({ours})",
            decision.p_value,
            decision.champion_accuracy,
            "champion",
        )
    # The decision and its numbers on the version itself, where the registry UI shows them
    # (also logged on the evaluate and pipeline runs: `registry.judge_registered_model`).
    for key, value in {
        TAG_DECISION: decision.outcome,
        TAG_P_VALUE: decision.p_value,
        TAG_CHAMPION_ACCURACY: decision.champion_accuracy,
    }.items():
        if value is not None:
            client.set_model_version_tag(
                model_name, version, key, value if isinstance(value, str) else f"{value:.6g}"
            )
    client.set_model_version_tag(model_name, version, TAG_REASON, decision.reason)
    return decision
