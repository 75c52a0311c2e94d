"""Experiment configs (`nas/experiment@1`): one YAML describes one search; every field can be overridden on the
command line. Relative paths are resolved against the experiment file's folder."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from nas.config import check_keys, load_yaml, read, require_mapping, short_repr, suggest
from nas.errors import ConfigError
from nas.search.storage import GRACE_S, HEARTBEAT_S, STORAGE_TIMEOUT_S

if TYPE_CHECKING:
    from nas.arch.headconfig import HeadConfig

FORMAT = "nas/experiment@1"
MODES = ("constraint", "mnas", "pareto")
EVALUATORS = ("proxy", "train", "supernet")
SCOPES = ("backbone", "detector")


@dataclass(frozen=True)
class EvaluatorConfig:
    kind: str = "proxy"            # proxy | train | supernet
    proxy: str = "macs"            # proxy name (kind: proxy); macs ranked short-trained mAP best (BENCHMARKS.md)
    resolution: int = 160          # proxy input resolution
    batch: int = 8
    # short training (kind: train)
    data: str | None = None        # data YAML; None = DigitsDet generated in the run folder
    epochs: int = 3
    imgsz: int = 160
    train_batch: int = 16
    neck: str = "dw"               # also the neck of detector-scope budgets
    train_images: int = 400        # DigitsDet size when generated
    val_images: int = 100
    pruner: str = "hyperband"      # hyperband | successive_halving | median | none (constraint / mnas modes)
    # weights inherited from a trained supernet (kind: supernet; `nas supernet train` trains it with the fields above)
    run: str | None = None         # the supernet's run folder; None = <output>/<name>/supernet
    calib_images: int = 256        # training images a subnet's BatchNorm statistics are recalibrated on


@dataclass(frozen=True)
class Experiment:
    name: str
    space: str
    table: str
    budget_ms: float | None = None
    scope: str = "detector"        # what the budget covers: detector (backbone + neck + head, what deploys) | backbone
    num_classes: int = 10          # classes of the deployed detector: sizes the head in detector-scope budgets
    mode: str = "constraint"
    mnas_alpha: float = -0.07      # MnasNet reward ACC·(LAT/T)^w: w = alpha if LAT <= T else beta (paper: -0.07)
    mnas_beta: float = -0.07
    sampler: str = "tpe"
    trials: int = 50
    timeout_s: float | None = None
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    storage: str | None = None     # SQLAlchemy URL, journal:///path or redis://; default SQLite in the run folder
    study: str | None = None       # default: name
    seed: int = 0
    workers: int = 1
    output: str = "runs"
    device: str = "cpu"
    tensorboard_every: int = 25    # Pareto figure in RUN/tb every K finished trials (and at the end); 0 = no TensorBoard
    heartbeat_s: int = HEARTBEAT_S  # SQL storages: a running trial's heartbeat period, in seconds
    grace_s: int = GRACE_S         # a trial silent this long (its worker died) is failed and retried; see --grace
    storage_timeout_s: int = STORAGE_TIMEOUT_S  # a worker gives up after the storage is unreachable this long
    source: str = field(default="<experiment>", compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def study_name(self) -> str:
        return self.study or self.name

    @property
    def head(self) -> HeadConfig | None:
        """The neck+head a detector-scope budget includes (evaluator.neck, the training's width and depth, and
        num_classes); None for backbone-scope budgets."""
        if self.scope != "detector":
            return None
        from nas.arch.headconfig import HeadConfig

        return HeadConfig(neck=self.evaluator.neck, num_classes=self.num_classes)

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        # SQLite is not safe for several writers: parallel local workers share a journal file instead.
        if self.workers > 1:
            return f"journal:///{(self.run_dir / 'study.journal').resolve()}"
        return f"sqlite:///{(self.run_dir / 'study.db').resolve()}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {"format": FORMAT, **d}


_TOP = [f.name for f in fields(Experiment) if f.name != "source"]
_EVAL = [f.name for f in fields(EvaluatorConfig)]


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be positive"


def experiment_from_dict(d: Any, source: str = "<experiment>", base: Path | None = None) -> Experiment:
    """Validate a loaded YAML mapping; paths are made relative to `base` (the experiment file's folder)."""
    d = require_mapping(d, source, None)
    if d.get("format") != FORMAT:
        raise ConfigError(source, "format", f"expected {FORMAT!r}, got {d.get('format')!r}; is this an experiment config?")
    check_keys(d, ["format"] + _TOP, source, None)

    def path(key: str, default: Any = ...) -> str | None:
        v = read(d, key, (str, type(None)), source, None, **({} if default is ... else {"default": default}))
        if v is None or base is None or "://" in v:
            return v
        # lexically normalised ("experiments/../x" -> "x"), so messages show the path a user would type
        return os.path.normpath(base / v) if not Path(v).is_absolute() else v

    ev_raw = require_mapping(read(d, "evaluator", dict, source, None, default={}), source, "evaluator")
    check_keys(ev_raw, _EVAL, source, "evaluator")
    defaults = EvaluatorConfig()
    ev_kw: dict[str, Any] = {}
    for f in fields(EvaluatorConfig):
        kind = {int: int, float: float, str: str}.get(type(getattr(defaults, f.name)), (str, type(None)))
        if f.name in ev_raw:
            ev_kw[f.name] = read(ev_raw, f.name, kind, source, "evaluator")
    ev = EvaluatorConfig(**ev_kw)
    if ev.data and base is not None and not Path(ev.data).is_absolute():
        ev = replace(ev, data=str(base / ev.data))
    if ev.run and base is not None and not Path(ev.run).is_absolute():
        ev = replace(ev, run=os.path.normpath(base / ev.run))
    exp = Experiment(
        name=read(d, "name", str, source, None),
        space=path("space"),
        table=path("table"),
        budget_ms=read(d, "budget_ms", (float, type(None)), source, None, default=None,
                       check=lambda v: None if v is None or v > 0 else "must be positive"),
        scope=read(d, "scope", str, source, None, default="detector"),
        num_classes=read(d, "num_classes", int, source, None, default=10),
        mode=read(d, "mode", str, source, None, default="constraint"),
        mnas_alpha=read(d, "mnas_alpha", float, source, None, default=-0.07),
        mnas_beta=read(d, "mnas_beta", float, source, None, default=-0.07),
        sampler=read(d, "sampler", str, source, None, default="tpe"),
        trials=read(d, "trials", int, source, None, default=50, check=_positive),
        timeout_s=read(d, "timeout_s", (float, type(None)), source, None, default=None),
        evaluator=ev,
        storage=read(d, "storage", (str, type(None)), source, None, default=None),
        study=read(d, "study", (str, type(None)), source, None, default=None),
        seed=read(d, "seed", int, source, None, default=0),
        workers=read(d, "workers", int, source, None, default=1, check=_positive),
        output=path("output", "runs") or "runs",
        device=read(d, "device", str, source, None, default="cpu"),
        tensorboard_every=read(d, "tensorboard_every", int, source, None, default=25,
                               check=lambda v: None if v >= 0 else "must be >= 0 (0 turns TensorBoard off)"),
        heartbeat_s=read(d, "heartbeat_s", int, source, None, default=HEARTBEAT_S),
        grace_s=read(d, "grace_s", int, source, None, default=GRACE_S),
        storage_timeout_s=read(d, "storage_timeout_s", int, source, None, default=STORAGE_TIMEOUT_S),
        source=source,
    )
    return check(exp)


# Sizes a search may ask for. Checked here rather than only when reading the file, so command-line overrides
# (--trials -1, --seed -1) are held to the same rules; a 10^9 batch or 10^5 worker processes would take the
# machine down before the first trial could fail with a reason.
_RANGES: dict[str, tuple[int, int]] = {
    "trials": (1, 10**7), "workers": (1, 256), "num_classes": (1, 10_000), "evaluator.resolution": (32, 4096),
    "evaluator.batch": (1, 4096), "evaluator.epochs": (1, 10_000), "evaluator.imgsz": (32, 4096),
    "evaluator.train_batch": (1, 4096), "evaluator.train_images": (1, 10**7), "evaluator.val_images": (1, 10**7),
    "evaluator.calib_images": (0, 10**6),
    "heartbeat_s": (1, 86_400), "grace_s": (2, 7 * 86_400),
    "storage_timeout_s": (1, 7 * 86_400),
}
PRUNERS = ("hyperband", "successive_halving", "median", "none")


def _check_ranges(exp: Experiment) -> None:
    from nas.arch.headconfig import NECKS

    s = exp.source
    for name, (lo, hi) in _RANGES.items():
        v = getattr(exp.evaluator, name.split(".")[1]) if name.startswith("evaluator.") else getattr(exp, name)
        if not lo <= v <= hi:
            raise ConfigError(s, name, f"must be between {lo} and {hi}, got {short_repr(v)}")
    # samplers seed numpy with seed + worker index, which must stay below 2**32
    if not 0 <= exp.seed <= 2**32 - exp.workers:
        raise ConfigError(s, "seed", f"must be between 0 and {2**32 - exp.workers}, got {short_repr(exp.seed)}")
    for name in ("budget_ms", "timeout_s"):
        v = getattr(exp, name)
        if v is not None and not v > 0:
            raise ConfigError(s, name, f"must be positive, got {v}")
    if exp.grace_s <= exp.heartbeat_s:  # else every live trial between two heartbeats looks dead
        raise ConfigError(s, "grace_s", f"must be longer than heartbeat_s ({exp.heartbeat_s}), got {exp.grace_s}; "
                                        f"2-3 heartbeats is usual")
    ev = exp.evaluator
    for name, value, choices in (("pruner", ev.pruner, PRUNERS), ("neck", ev.neck, NECKS)):
        if value not in choices:  # else a typo would silently mean "no pruning" or fail every trial
            raise ConfigError(s, f"evaluator.{name}", f"unknown {name} {value!r}{suggest(value, choices)}; "
                                                      f"choose {', '.join(choices)}")


def check(exp: Experiment) -> Experiment:
    """Cross-field rules, shared by files and command-line overrides."""
    s = exp.source
    if exp.mode not in MODES:
        raise ConfigError(s, "mode", f"unknown mode {exp.mode!r}{suggest(exp.mode, MODES)}; choose {', '.join(MODES)}")
    if exp.scope not in SCOPES:
        raise ConfigError(s, "scope", f"unknown scope {exp.scope!r}; choose {', '.join(SCOPES)}")
    if exp.evaluator.kind not in EVALUATORS:
        raise ConfigError(s, "evaluator.kind", f"unknown evaluator {exp.evaluator.kind!r}{suggest(exp.evaluator.kind, EVALUATORS)}; "
                                               f"choose {', '.join(EVALUATORS)}")
    if exp.mode in ("constraint", "mnas") and exp.budget_ms is None:
        raise ConfigError(s, "budget_ms", f"mode {exp.mode!r} needs a latency budget (e.g. budget_ms: 20)")
    if exp.tensorboard_every < 0:
        raise ConfigError(s, "tensorboard_every", "must be >= 0 (0 turns TensorBoard off)")
    if not exp.name or "/" in exp.name or exp.name.startswith("."):
        raise ConfigError(s, "name", "must be a plain folder name (no '/', not starting with '.')")
    _check_ranges(exp)
    from nas.search.samplers import check_sampler_name

    check_sampler_name(exp.sampler, s)
    if exp.evaluator.kind == "proxy":
        from nas.search.proxies import PROXIES

        if exp.evaluator.proxy not in PROXIES:
            raise ConfigError(s, "evaluator.proxy", f"unknown proxy {exp.evaluator.proxy!r}"
                                                    f"{suggest(exp.evaluator.proxy, PROXIES)}; choose {', '.join(PROXIES)}")
    return exp


def load_experiment(path: str | Path, *, check_files: bool = True) -> Experiment:
    """Read an experiment; with check_files, also load its space and table now, before a run folder or a worker
    process exists (a bad file is then one error line, not a traceback from every spawned worker)."""
    p = Path(path)
    exp = experiment_from_dict(load_yaml(p), str(p), p.parent)
    if check_files:
        from nas.latency.table import LatencyTable
        from nas.space import load_space

        for key, value in (("space", exp.space), ("table", exp.table)):
            if not Path(value).is_file():
                raise ConfigError(exp.source, key, f"file not found: {value!r}" + (
                    " (relative paths start at the experiment file's folder)" if not Path(value).is_absolute() else ""))
        load_space(exp.space)
        LatencyTable.load(exp.table)
    return exp


def apply_overrides(exp: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """Command-line overrides: top-level fields by name, evaluator fields as 'evaluator.<field>'."""
    top, ev = {}, {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k.startswith("evaluator."):
            ev[k.split(".", 1)[1]] = v
        else:
            top[k] = v
    if ev:
        top["evaluator"] = replace(exp.evaluator, **ev)
    return check(replace(exp, **top, source=f"{exp.source} + command line"))


def dump_experiment(exp: Experiment) -> str:
    """The resolved config, as saved in the run folder (storage passwords masked)."""
    from nas.search.storage import mask_url

    d = exp.to_dict()
    if d.get("storage"):
        d["storage"] = mask_url(d["storage"])
    return yaml.safe_dump(d, sort_keys=False)

