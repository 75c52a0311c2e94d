"""Run folders: a search read back from its folder (config.yaml + storage) or from any storage URL and study name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.errors import ConfigError, NasError

if TYPE_CHECKING:  # optuna is imported where it is used: `nas --help` should not pay for it
    import optuna


@dataclass
class Run:
    study: optuna.Study
    url: str                   # storage URL, password masked
    run_dir: Path | None
    exp: Any                   # the resolved Experiment from config.yaml, or None (--storage/--study only)
    origin: Path               # folder the relative paths in config.yaml are relative to

    @property
    def budget_ms(self) -> float | None:
        if self.exp is not None:
            return self.exp.budget_ms
        from optuna.trial import TrialState

        t = next(iter(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), None)
        return t.user_attrs.get("budget_ms") if t else None

    def table(self, override: str | None, needed_for: str):
        """The latency table the search used (or --table): its entries and its measurement protocol."""
        from nas.latency.table import LatencyTable

        if override:
            return LatencyTable.load(override)
        if self.exp is None:
            raise ConfigError(None, "--table", f"{needed_for} needs the latency table the search used; "
                                               f"pass --table PATH")
        path = _resolve(self.exp.table, self.origin)
        if not path.is_file():
            raise ConfigError(str(self.run_dir / "config.yaml"), "table",
                              f"{path} not found ({needed_for} needs it); pass --table PATH")
        return LatencyTable.load(path)


def _origin(run_dir: Path, exp) -> Path:
    """config.yaml keeps paths as given on the command line, relative to the folder `nas search` ran in; recover
    that folder from where the run folder is now (RUN = ORIGIN/output/name), so `nas pareto` works from anywhere."""
    rel = Path(os.path.normpath(Path(exp.output) / exp.name))
    parts = run_dir.resolve().parts
    if rel.is_absolute() or ".." in rel.parts or tuple(parts[-len(rel.parts):]) != rel.parts:
        return Path.cwd()
    return Path(*parts[:-len(rel.parts)])


def _resolve(path: str, origin: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else origin / p


def _run_storage(run_dir: Path, exp, origin: Path) -> str:
    cfg = run_dir / "config.yaml"
    if exp.storage:
        if "***" in exp.storage:
            raise ConfigError(str(cfg), "storage", "the password is masked in config.yaml; pass --storage with the "
                                                   "full URL (and --study if needed)")
        for scheme in ("sqlite:///", "journal://"):  # file storages given relative to the search's folder
            if exp.storage.startswith(scheme) and not Path(exp.storage.removeprefix(scheme)).is_absolute():
                return scheme + str(origin / exp.storage.removeprefix(scheme))
        return exp.storage
    for name, scheme in (("study.db", "sqlite:///"), ("study.journal", "journal://")):
        if (run_dir / name).is_file():
            return scheme + str((run_dir / name).resolve())
    raise ConfigError(str(run_dir), None, "no study.db or study.journal in this run folder; pass --storage URL")


def open_run(run: str | None, storage: str | None = None, study_name: str | None = None) -> Run:
    """A run folder (config.yaml + storage), or --storage URL --study NAME; either may override the other."""
    from nas.config import load_yaml
    from nas.search.experiment import experiment_from_dict
    from nas.search.storage import make_storage, mask_url

    exp, run_dir, origin = None, None, Path.cwd()
    if run is None and not (storage and study_name):
        raise ConfigError(None, "RUN", "give a run folder (e.g. runs/NAME), or --storage URL and --study NAME")
    if run is not None:
        run_dir = Path(run)
        cfg = run_dir / "config.yaml"
        if not run_dir.is_dir():
            raise ConfigError(run, None, "no such run folder; `nas search` writes them under runs/NAME")
        if not cfg.is_file():
            raise ConfigError(run, None, "not a run folder (no config.yaml); pass the folder `nas search` wrote, "
                                         "or --storage URL --study NAME")
        exp = experiment_from_dict(load_yaml(cfg), str(cfg))
        origin = _origin(run_dir, exp)
    url = storage or _run_storage(run_dir, exp, origin)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(None, "--storage", f"{mask_url(url)}: no such SQLite file")  # else SQLite makes an empty one
    import optuna

    name = study_name or exp.study_name
    store = make_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise NasError(f"no study {name!r} in {mask_url(url)}; studies there: {', '.join(names) or 'none'} "
                       f"(choose one with --study)") from None
    return Run(study, mask_url(url), run_dir, exp, origin)


def study_scope(study) -> str | None:
    """What the study's latencies cover, from its first finished trial ("detector" or "backbone")."""
    t = next((t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and "scope" in t.user_attrs), None)
    return t.user_attrs["scope"] if t else None


def trial_head(attrs: dict[str, Any]):
    """The detector head a detector-scope trial was budgeted with (None: a backbone-scope trial)."""
    from nas.arch.headconfig import HeadConfig

    d = attrs.get("detector")
    return HeadConfig(**d) if attrs.get("scope") == "detector" and isinstance(d, dict) else None
