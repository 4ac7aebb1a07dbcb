"""The winner of a study as a Hydra experiment config, `conf/experiment/tuned_<model>.yaml`.

The file holds only the keys that differ from the conf/ defaults, so the DVC loop trains it with

    uv run dvc exp run -S +experiment=tuned_<model>

The `tune` and `tracking` sections never leak into it: the study ranks configurations on the
cheaper tune.epochs budget, the pipeline then trains the winner for train.epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from deep_repro import config
from deep_repro.errors import DeepReproError, scrub
from deep_repro.files import atomic_path
from deep_repro.tuning.space import compose

log = logging.getLogger(__name__)


def _scrubbed(value: Any) -> Any:
    """`value` with credentials removed from every string in it."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


def _strip(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that defines a model (the study's own and tracking settings aside)."""
    return {k: v for k, v in raw.items() if k not in ("tune", "tracking")}


def _diff(best: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves of `best` that differ from (or are missing in) `ref`, nested."""
    out: dict[str, Any] = {}
    for key, value in best.items():
        other = ref.get(key, KeyError)
        if isinstance(value, dict) and isinstance(other, dict):
            sub = _diff(value, other)
            if sub:
                out[key] = sub
        elif other is KeyError or other != value:
            out[key] = value
    return out


class _ExperimentDumper(yaml.SafeDumper):
    """Block mappings, flow lists: `channels: [32, 64]` reads like the files in conf/."""


_ExperimentDumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def write_experiment(
    overrides: Sequence[str], model: str, conf_dir: Path, header: Sequence[str]
) -> Path:
    """Write the config composed from `overrides` as `conf/experiment/tuned_<model>.yaml`.

    The file holds only what differs from the conf/ defaults (group choices as `override /g: x`,
    always pinning the model), so `+experiment=tuned_<model>` reproduces the config exactly; the
    `tune` and `tracking` sections are left out (the pipeline trains for `train.epochs`).
    """
    best, choices = compose(overrides, conf_dir)
    _, defaults = compose([], conf_dir)
    group_overrides = [
        f"{g}={c}"
        for g, c in sorted(choices.items(), key=lambda i: i[0] != "model")
        if g == "model" or c != defaults.get(g)
    ]
    reference, _ = compose(group_overrides, conf_dir)
    body = _diff(_strip(best), _strip(reference))
    lines = ["# @package _global_", *(f"# {h}" for h in header)]
    text = "\n".join(lines) + "\n"
    text += yaml.safe_dump(
        {
            "defaults": [
                {f"override /{o.split('=')[0]}": o.split("=", 1)[1]} for o in group_overrides
            ]
        },
        sort_keys=False,
    )
    name = f"tuned_{model}"
    target = conf_dir / "experiment" / f"{name}.yaml"
    if body:
        values = yaml.dump(body, Dumper=_ExperimentDumper, sort_keys=False)
        # The file goes into git: a password in a URL given on the command line (a private
        # data mirror) is replaced by *** and must be passed again when the file is applied.
        if scrub(values) != values:
            log.warning(
                "%s: credentials in URLs were replaced by *** (the file is tracked by "
                "git); pass them again with -S when applying it",
                target.name,
            )
        text += scrub(values)
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    again = _scrubbed(_strip(compose([f"+experiment={name}"], conf_dir)[0]))
    if again != _scrubbed(_strip(best)):
        wanted = _scrubbed(_strip(best))
        differing = sorted(
            set(config.flatten(_diff(again, wanted))) | set(config.flatten(_diff(wanted, again)))
        )
        raise DeepReproError(
            f"{target} does not reproduce the best trial's config (differs in "
            f"{', '.join(differing[:5])}): please report this"
        )
    return target
