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

Why per-image predictions and not a verdict per image: the evidence of each version is the file
of what it predicted on every validation image (`evaluation.predictions`, logged with the
version's run, its sha256 in a tag). Which images it got right is recomputed from it, never
read from a claim; a file that does not match its recorded sha256, or whose labels contradict the
images digest this gate knows, takes no part in the election.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deep_repro.errors import ValidationError
from deep_repro.evaluation.metrics import mcnemar_p_value
from deep_repro.evaluation.predictions import (
    MAX_BYTES,
    Predictions,
    SplitPredictions,
    from_bytes,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
GATE_MAX_ROUNDS = 20
METRIC = "val_accuracy"  # the number the gate (and the leaderboard rank) decides on
# Model-version tags written by the gate: the evidence another gate needs to pair with us.
TAG_STATUS = "validation_status"
TAG_REASON = "validation_reason"
TAG_PREDICTIONS = "predictions"  # runs:/<run>/evidence/predictions-<sha256>.json
TAG_PREDICTIONS_SHA256 = "predictions_sha256"
# Named by content: two versions of one run (or a rerun) never overwrite each other's evidence.
EVIDENCE_DIR = "evidence"
TAG_CORRECT = "val_correct"  # before predictions files: packed bits (read, never written)
TAG_IMAGES = "val_images"  # digest of the validation images + labels the evidence refers to
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


def decode_correct(value: str) -> np.ndarray:
    """The evidence of versions gated before predictions files: `n:base64(zlib(packbits))`."""
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


# Predictions files already read and checked, by (URI, sha256): an election reads every version's
# evidence, and the gate repeats the election until the alias agrees with it.
_LOADED: dict[tuple[str, str], Predictions] = {}


def store_predictions(client: MlflowClient, run_id: str, predictions: Predictions) -> str:
    """Log `predictions` with the run `run_id` (the version's own run) and return its URI."""
    sha256 = predictions.sha256()
    name = f"predictions-{sha256}.json"
    uri = f"runs:/{run_id}/{EVIDENCE_DIR}/{name}"
    with tempfile.TemporaryDirectory(prefix="deep-repro-evidence-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(predictions.to_bytes())
        client.log_artifact(run_id, str(path), EVIDENCE_DIR)
    _LOADED[(uri, sha256)] = predictions
    return uri


def load_predictions(client: MlflowClient, uri: str, sha256: str, what: str) -> Predictions:
    """The predictions file at `uri` (`runs:/<run>/<path>`), checked against `sha256`; any
    fault is one ValidationError line naming `what`."""
    if (uri, sha256) in _LOADED:
        return _LOADED[(uri, sha256)]
    from mlflow.exceptions import MlflowException

    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    if not uri.startswith("runs:/") or not run_id or not path:
        raise ValidationError(f"{what}: predictions URI {uri!r} is not runs:/<run>/<path>")
    with tempfile.TemporaryDirectory(prefix="deep-repro-evidence-") as tmp:
        try:
            local = Path(client.download_artifacts(run_id, path, tmp))
        except (MlflowException, OSError) as exc:
            raise ValidationError(f"{what}: cannot read {uri}: {exc}") from None
        if not local.is_file() or local.stat().st_size > MAX_BYTES:
            raise ValidationError(f"{what}: {uri} is not a predictions file of <= {MAX_BYTES} B")
        data = local.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValidationError(f"{what}: {uri} does not match its recorded sha256")
    _LOADED[(uri, sha256)] = predictions = from_bytes(data, what)
    return predictions


def _evidence(client: MlflowClient, mv: Any, reference: SplitPredictions | None) -> Evidence:
    """What one version got right on validation, recomputed from its predictions file (or, for
    versions gated before such files, read from the packed bits they carry)."""
    tags, what = mv.tags, f"version {mv.version}"
    if TAG_PREDICTIONS not in tags:
        return Evidence(decode_correct(tags[TAG_CORRECT]), tags[TAG_IMAGES])
    val = load_predictions(
        client, tags[TAG_PREDICTIONS], tags.get(TAG_PREDICTIONS_SHA256, ""), what
    ).splits.get("val")
    if val is None:
        raise ValidationError(f"{what}: its predictions file has no 'val' split")
    if (
        reference is not None
        and val.images == reference.images
        and not np.array_equal(val.labels, reference.labels)
    ):
        raise ValidationError(f"{what}: its labels contradict the validation images digest")
    return Evidence(val.correct, val.images)


def _entries(
    client: MlflowClient, model_name: str, reference: SplitPredictions | None = None
) -> list[_Entry]:
    """Every validated version carrying complete, consistent evidence (one lacking it takes no
    part: it cannot be paired). `reference`: the validation split this gate knows."""
    entries = []
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        tags = mv.tags
        if tags.get(TAG_STATUS) != "validated":
            continue
        try:
            evidence = _evidence(client, mv, reference)
            alpha = float(tags[TAG_ALPHA])
        except (KeyError, ValueError, zlib.error):
            continue
        except ValidationError as exc:
            log.warning("%s: left out of the election", exc)
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


def _move_alias(client: MlflowClient, model_name: str, version: str, seen: str | None) -> None:
    """Point @champion at `version`. Two gates that both find no alias and create it at once
    race inside the server (MLflow's upsert is not atomic: one gets a unique-key violation).
    That failure means another gate's write landed: the caller's next round reads and re-elects.
    Any other failure (permissions, outage) is raised."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    except MlflowException:
        if _champion_version(client, model_name) == seen:  # nobody else wrote it: a real fault
            raise
        log.info("@champion of %s was moved by another gate meanwhile: electing again", model_name)


def champion_after_election(
    client: MlflowClient, model_name: str, reference: SplitPredictions | None = None
) -> tuple[str | None, Any]:
    """Repeat "read the alias, elect, move the alias" until the alias is the elected version.
    Returns (alias, verdicts of the last election)."""
    champion = _champion_version(client, model_name)
    verdicts: dict[str, Verdict] = {}
    for _ in range(GATE_MAX_ROUNDS):
        champion = _champion_version(client, model_name)  # alias first, then the election
        elected, verdicts = elect(_entries(client, model_name, reference))
        if elected is None or champion == elected:
            break
        _move_alias(client, model_name, elected, champion)
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
    predictions: Predictions,
    baseline: float,
    alpha: float,
) -> GateDecision:
    """Validate `version` (validation accuracy > baseline) and let the election decide whether
    it becomes `@champion`. Race-free without locks: the evidence is written first, status last
    (a version counted as validated always has complete evidence), then the election runs until
    the alias agrees with it; whichever concurrent gate finishes last leaves the right champion."""
    previous = _champion_version(client, model_name)
    val = predictions.splits["val"]
    evidence = Evidence(val.correct, val.images)
    accuracy = evidence.accuracy
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:  # registered from a path: no run to keep the evidence with
        raise ValidationError(f"{model_name} version {version} has no run to keep its evidence")
    uri = store_predictions(client, run_id, predictions)
    client.set_model_version_tag(model_name, version, METRIC, f"{accuracy:.6f}")
    client.set_model_version_tag(model_name, version, TAG_PREDICTIONS, uri)
    client.set_model_version_tag(model_name, version, TAG_PREDICTIONS_SHA256, predictions.sha256())
    client.set_model_version_tag(model_name, version, TAG_IMAGES, evidence.images)
    client.set_model_version_tag(model_name, version, TAG_ALPHA, repr(float(alpha)))
    validated = accuracy > baseline
    client.set_model_version_tag(
        model_name, version, TAG_STATUS, "validated" if validated else "rejected"
    )
    champion, verdicts = champion_after_election(client, model_name, val)
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
