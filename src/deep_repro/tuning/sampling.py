"""Optuna samplers and pruners, as named by `tune.sampler` / `tune.pruner`.

Each trial gets a fresh sampler seeded by `(tune.seed, trial number)`: sequential runs with the
same seed repeat the same trials exactly, and parallel workers never draw the same random start
point.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from deep_repro.errors import ConfigError, first_line
from deep_repro.tuning.space import SearchSpace

PRUNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "median": {"n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"min_resource": 1, "reduction_factor": 3},
}


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """A fresh sampler; created per trial with a per-trial seed (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "tpe":
            # multivariate+group: lr and optimizer interact, and conditional keys form groups;
            # constant_liar: parallel workers do not all crowd the same promising region.
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True
            )
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            # CMA-ES handles float/int only; categorical keys are sampled independently (random).
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "grid":
            grid = {p.key: p.grid_points() for p in space.params}
            return optuna.samplers.GridSampler(grid, seed=seed)  # type: ignore[arg-type]  # optuna types the grid too narrowly (it takes any values)
    raise ConfigError(f"config error: tune.sampler = {name!r} unknown")  # pragma: no cover


def check_sampler(name: str, space: SearchSpace) -> None:
    where = space.where
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError(
                "config error: tune.sampler = 'cmaes' needs the `cmaes` package, "
                "which is not installed (`uv add cmaes`), or use tpe/random/grid"
            )
    if name == "grid":
        for p in space.params:
            if p.when:
                raise ConfigError(
                    f"search space {where}: {p.key}: tune.sampler=grid cannot "
                    "search conditional (when) parameters"
                )
            if p.grid_points() is None:
                raise ConfigError(
                    f"search space {where}: {p.key}: tune.sampler=grid needs "
                    "`grid: [values]` or `step` for a float/int range"
                )


def make_pruner(name: str, epochs: int, space: SearchSpace) -> optuna.pruners.BasePruner:
    args = {**PRUNER_DEFAULTS.get(name, {}), **space.pruners.get(name, {})}
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**args)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**{"max_resource": epochs, **args})
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"search space {space.where}: pruners.{name}: {first_line(exc)}"
        ) from None
    return optuna.pruners.NopPruner()


def trial_sampler(
    name: str, seed: int, number: int, space: SearchSpace
) -> optuna.samplers.BaseSampler:
    """The sampler for trial `number`, seeded by (tune.seed, number): reproducible when run
    sequentially, and parallel workers never replay each other's random draws."""
    import numpy as np

    if name == "grid":
        # The grid sampler shuffles its grid by the seed and numbers the points in that
        # order: every worker and trial must use the same seed or the ids point elsewhere.
        return make_sampler("grid", seed, space)
    return make_sampler(
        name, int(np.random.SeedSequence([seed, number]).generate_state(1)[0]), space
    )
