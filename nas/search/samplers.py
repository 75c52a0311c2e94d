"""Optuna samplers and pruners by short name, seeded."""
from __future__ import annotations

import inspect

import optuna

from nas.config import suggest
from nas.errors import ConfigError

SAMPLERS = {"tpe", "nsga2", "nsga3", "random", "gp", "qmc", "cmaes", "bruteforce"}


def check_sampler_name(name: str, source: str = "<experiment>") -> None:
    if name in SAMPLERS:
        return
    cls = getattr(optuna.samplers, name, None) if name.endswith("Sampler") else None
    # Only samplers make_sampler can build from a seed alone: abstract bases (BaseSampler) and those needing a
    # search space or a base sampler (GridSampler, PartialFixedSampler) would only fail once the search starts.
    if not (isinstance(cls, type) and not inspect.isabstract(cls) and all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(cls).parameters.values())):
        valid = sorted(SAMPLERS) + ["<any optuna.samplers class name, e.g. TPESampler>"]
        what = (f"sampler {name!r} cannot be built from a seed alone" if isinstance(cls, type)
                else f"unknown sampler {name!r}{suggest(name, SAMPLERS)}")
        raise ConfigError(source, "sampler", f"{what}; choose {', '.join(valid)}")


def make_sampler(name: str, seed: int, multi_objective: bool) -> optuna.samplers.BaseSampler:
    """A seeded sampler by short name, or any optuna.samplers class by its name."""
    if name == "tpe":
        # multivariate TPE models the joint distribution of the per-block choices; constraints come from
        # trial.set_constraint (Optuna 5), not a constraints_func.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    cls = getattr(optuna.samplers, name)
    try:
        return cls(seed=seed)
    except TypeError:
        return cls()


def make_pruner(exp) -> optuna.pruners.BasePruner:
    kind = exp.evaluator.pruner if exp.evaluator.kind == "train" else "none"
    epochs = max(exp.evaluator.epochs, 1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()
