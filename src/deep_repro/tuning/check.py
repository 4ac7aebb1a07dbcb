"""What is checked before any trial runs.

* A parsed search space against the composed config and the typed schema: every key exists (in
  the context of each searched config-group option), every range end and choice composes into a
  valid, trainable config, and Hydra reads every override back as exactly the value sampled.
* A resumed study against this run: the same training setup and split file (else old and new
  trials would not be comparable) and compatible distributions of the searched keys.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from deep_repro import config
from deep_repro.errors import ConfigError, DeepReproError, first_line
from deep_repro.tuning.space import SearchSpace, compose, get_key, set_key

log = logging.getLogger(__name__)

STUDY_ATTR_BASE = "deep_repro.base"
STUDY_ATTR_OVERRIDES = "deep_repro.base_overrides"


def check_search_space(
    space: SearchSpace,
    base_overrides: Sequence[str],
    conf_dir: Path,
    n_train: int,
    base: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> tuple[SearchSpace, dict[str, Any]]:
    """Check a search space against the composed config and the schema, before any trial.

    `base` is the composition of `base_overrides` with its group choices, if already done.
    Returns the space without the keys fixed on the command line, and the base values of the
    keys that `when` conditions refer to.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from deep_repro import training  # imports torch: only once there is a space to check

    where = space.where
    base_raw, base_choices = base or compose(base_overrides, conf_dir)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(base_overrides))
    except Exception as exc:  # already composed fine, so this should not happen
        raise ConfigError(f"config error: cannot parse overrides: {first_line(exc)}") from None
    fixed = {o.key_or_group for o in parsed if not o.is_delete()}
    params = []
    for p in space.params:
        if p.key in fixed:
            log.info("%s is fixed on the command line: not searched", p.key)
        else:
            params.append(p)
    if not params:
        raise ConfigError(
            f"search space {where}: every parameter is fixed on the command line; nothing to search"
        )
    space = SearchSpace(space.path, tuple(params), space.pruners)

    # Each option of each searched group changes which keys exist (e.g. optimizer.momentum only
    # in sgd): compose them all once, and judge keys and values in each of those contexts.
    contexts: dict[str, dict[str, Any]] = {"base": base_raw}
    for p in params:
        if p.group:
            for choice in p.choices:
                if choice != base_choices.get(p.key):
                    contexts[f"{p.key}={choice}"] = compose(
                        [*base_overrides, p.override(choice)], conf_dir
                    )[0]
    flat = [config.flatten(c) for c in contexts.values()]
    searched = [p.key for p in params]
    when_base: dict[str, Any] = {}
    for p in params:
        if not p.group and any(isinstance(get_key(c, p.key), dict) for c in contexts.values()):
            raise ConfigError(f"search space {where}: {p.key} is a section, not a value")
        if not p.group and not any(p.key in f for f in flat):
            ctx = ", ".join(f"{g}={c}" for g, c in base_choices.items())
            raise ConfigError(
                f"search space {where}: unknown key {p.key}: not in the composed config ({ctx})"
            )
        for other, _ in p.when:
            if other in searched[: searched.index(p.key)]:
                continue
            if other in searched:
                raise ConfigError(
                    f"search space {where}: {p.key}: when refers to {other}, which "
                    "must be declared before it"
                )
            if other in base_choices:
                when_base[other] = base_choices[other]
            elif other in flat[0]:
                when_base[other] = flat[0][other]
            else:
                raise ConfigError(
                    f"search space {where}: {p.key}: when refers to unknown key {other}"
                )
    for name, raw in contexts.items():
        for p in params:
            for value in [None] if p.group else p.candidates():
                candidate = copy.deepcopy(raw)
                if not p.group:
                    set_key(candidate, p.key, value)
                try:
                    training.check_trainable(config.validate(candidate), n_train)
                except DeepReproError as exc:
                    what = name if p.group else f"{p.key} = {value!r}"
                    ctx = "" if name == "base" or p.group else f" (with {name})"
                    raise ConfigError(
                        f"search space {where}: {what}{ctx} gives an invalid "
                        f"config: {first_line(exc)}"
                    ) from None
    # Hydra must read each override back as exactly the value sampled (e.g. a string that
    # looks like a number must stay a string): parse every candidate override.
    for p in params:
        for value in [] if p.group else p.candidates():
            try:
                back = parser.parse_override(p.override(value)).value()
            except Exception as exc:
                raise ConfigError(
                    f"search space {where}: {p.key} = {value!r} cannot be "
                    f"written as a Hydra override: {first_line(exc)}"
                ) from None
            if back != value or type(back) is not type(value):
                raise ConfigError(
                    f"search space {where}: {p.key} = {value!r} reads back as "
                    f"{back!r} in a Hydra override"
                )
    return space, when_base


def comparable_setup(
    raw: dict[str, Any], tune_epochs: int, space: SearchSpace, data: dict[str, str]
) -> dict[str, Any]:
    """What makes two trials comparable: the training setup (not the searched keys, not
    train.epochs, which trials do not use) and the exact data files (`{path: md5}`)."""
    flat = config.flatten(
        {
            k: v
            for k, v in raw.items()
            if k in ("seed", "model", "optimizer", "scheduler", "augment", "train")
        }
    )
    searched = {p.key for p in space.params}
    out = {
        k: v
        for k, v in flat.items()
        if k != "train.epochs"
        and k not in searched
        and not any(k.startswith(g + ".") for g in searched)
    }
    out["tune.epochs"] = tune_epochs
    out.update(data)
    return out


def check_study(
    study: optuna.Study,
    storage: str,
    base: dict[str, Any],
    shown_overrides: str,
    space: SearchSpace,
) -> None:
    """Refuse to add trials to a study they are not comparable with (`storage`: where it lives,
    for messages); a new study records `base` (see `comparable_setup`) for the reruns to come."""
    where = f"study {study.study_name!r} in {storage}"
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"{where} does not maximise (not created by deep-repro tune): "
            "pick another tune.study_name"
        )
    recorded = study.user_attrs.get(STUDY_ATTR_BASE)
    if recorded is None:
        study.set_user_attr(STUDY_ATTR_BASE, base)
        study.set_user_attr(STUDY_ATTR_OVERRIDES, shown_overrides)
    else:
        changed = [
            f"{k}: {recorded[k]!r} -> {base[k]!r}"
            for k in sorted(base)
            if k in recorded and recorded[k] != base[k]
        ]
        if changed:
            raise ConfigError(
                f"{where} was run with another setup "
                f"({'; '.join(changed[:3])}): its trials would not be "
                "comparable; use a new tune.study_name"
            )
    seen: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            seen.setdefault(name, dist)
    for p in space.params:
        if p.key in seen:
            try:
                optuna.distributions.check_distribution_compatibility(seen[p.key], p.distribution())
            except ValueError as exc:
                raise ConfigError(
                    f"search space {space.where}: {p.key} changed incompatibly "
                    f"with study {study.study_name!r} ({first_line(exc)}); use a new "
                    "tune.study_name"
                ) from None
