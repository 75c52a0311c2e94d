"""The Pareto front of a study (score up, predicted latency down), its knee, hypervolume, picks, and front.csv."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:

    pass


FRONT_COLUMNS = ("trial", "predicted_ms", "score", "params", "macs")


@dataclass(frozen=True)
class Point:
    """One finished trial on the (latency, score) plane. `score` is None when it was never evaluated."""

    trial: int
    predicted_ms: float
    score: float | None = None
    params: int | None = None
    macs: int | None = None
    feasible: bool = True
    objectives: tuple[float, float] | None = field(default=None, repr=False)  # (score, latency) it is ranked by
    arch: str | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[float, float]:
        return self.objectives or (self.score, self.predicted_ms)

    def row(self) -> dict[str, float | int | None]:
        return {"trial": self.trial, "predicted_ms": self.predicted_ms, "score": self.score, "params": self.params,
                "macs": self.macs}


# ---------------------------------------------------------------- the front

def is_pareto_study(study: optuna.Study) -> bool:
    return len(study.directions) == 2


def _feasible(t: FrozenTrial) -> bool:
    score = t.user_attrs.get("score")
    return (t.user_attrs.get("evaluated") is True and isinstance(score, (int, float)) and math.isfinite(score)
            and all(v <= 0 for v in t.constraints.values()))


def trial_points(study: optuna.Study) -> list[Point]:
    """Every complete trial that has a predicted latency, in trial order (failed and pruned ones have no score)."""
    pareto = is_pareto_study(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if not isinstance(a.get("predicted_ms"), (int, float)):
            continue
        ok = _feasible(t)
        score = float(a["score"]) if isinstance(a.get("score"), (int, float)) else None
        # Pareto studies are ranked by their own objective values (what Optuna's best_trials uses); the others by the
        # raw score and predicted latency the objective stored (mnas values are rewards, not scores).
        objectives = (t.values[0], t.values[1]) if pareto and ok else None
        out.append(Point(t.number, float(a["predicted_ms"]), score, a.get("params"), a.get("macs"), ok, objectives,
                         a.get("arch")))
    return out


def pareto_indices(pairs: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (score, latency) pairs: no other pair has score >= and latency <= with one
    strict. Duplicates are all kept, as Optuna's best_trials keeps them."""
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][1], -pairs[i][0]))
    keep, best = [], -math.inf
    prev: tuple[float, float] | None = None
    for i in order:
        s, lat = pairs[i]
        if s > best or (prev is not None and (s, lat) == prev):
            keep.append(i)
            best, prev = max(best, s), (s, lat)
    return sorted(keep)


def front(study: optuna.Study) -> list[Point]:
    """Feasible, evaluated trials that no other one beats on both score and latency, fastest first."""
    points = [p for p in trial_points(study) if p.feasible]
    members = [points[i] for i in pareto_indices([p.key for p in points])]
    return sorted(members, key=lambda p: (p.predicted_ms, -(p.score or 0.0), p.trial))


def hypervolume(points: Iterable[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (score, latency_ms) points (score maximised, latency minimised) and bounded by
    `reference` = (score, latency_ms); points not strictly better than the reference on both count for nothing."""
    ref_s, ref_l = (float(v) for v in reference)
    if not (math.isfinite(ref_s) and math.isfinite(ref_l)):
        raise ValueError(f"the reference point must be finite, got {reference}")
    pts = sorted((lat, s) for s, lat in points if s > ref_s and lat < ref_l)
    area, best = 0.0, ref_s
    for i, (lat, s) in enumerate(pts):
        best = max(best, s)
        right = pts[i + 1][0] if i + 1 < len(pts) else ref_l
        area += (right - lat) * (best - ref_s)
    return area


def default_reference(points: Sequence[Point], budget_ms: float | None) -> tuple[float, float]:
    """(worst feasible score seen, the budget or else the slowest feasible latency): a data-derived reference, so
    hypervolumes of different runs are only comparable when the reference is fixed by hand."""
    ok = [p for p in points if p.feasible]
    if not ok:
        raise ValueError("no feasible evaluated trial: no reference point")
    return min(p.score for p in ok), float(budget_ms) if budget_ms else max(p.predicted_ms for p in ok)


def knee(members: Sequence[Point]) -> Point:
    """The front member farthest from the straight line joining the front's extremes, towards the ideal corner,
    with both axes scaled to [0, 1] over the front. Ties (and fronts of one or two) go to the higher score."""
    if not members:
        raise ValueError("an empty front has no knee")
    lat = np.array([p.predicted_ms for p in members], dtype=float)
    sc = np.array([p.score for p in members], dtype=float)

    def unit(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    # On a front the fastest member scores lowest: its extremes sit at (0, 0) and (1, 1), the ideal at (0, 1), and
    # the signed distance to the diagonal towards the ideal is (score - latency) / sqrt(2).
    gain = (unit(sc) - unit(lat)) / math.sqrt(2)
    best = max(range(len(members)), key=lambda i: (round(float(gain[i]), 12), sc[i], -lat[i]))
    return members[best]


def pick(study: optuna.Study, spec: str) -> tuple[FrozenTrial, str]:
    """The trial `spec` names: 'best' (highest score on the front; for single-objective studies Optuna's best trial,
    i.e. the best reward in mnas mode), 'knee' (see `knee`) or 'trial:N'. Returns it and a one-word description."""
    from nas.errors import ConfigError, NasError

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if spec.startswith("trial:"):
        n = spec.removeprefix("trial:")
        if not n.isdigit():
            raise ConfigError(None, "--pick", f"{spec!r}: expected trial:N with N a trial number, e.g. trial:12")
        t = by_number.get(int(n))
        if t is None or t.state != TrialState.COMPLETE or "arch" not in t.user_attrs:
            state = "does not exist" if t is None else f"is {t.state.name.lower()}"
            raise NasError(f"trial {n} of study {study.study_name!r} {state}; pick a complete trial (see `nas pareto`)")
        return t, f"trial {n}"
    if spec not in ("best", "knee"):
        raise ConfigError(None, "--pick", f"unknown choice {spec!r}; use best, knee or trial:N (e.g. trial:12)")
    members = front(study)
    if not members:
        raise NasError(f"study {study.study_name!r} has no feasible evaluated trial yet; nothing to pick "
                       f"(run more trials, or raise the budget)")
    if spec == "knee":
        return by_number[knee(members).trial], "knee"
    if is_pareto_study(study):
        top = max(members, key=lambda p: (p.score, -p.predicted_ms))
        return by_number[top.trial], "best"
    return study.best_trial, "best"


# ---------------------------------------------------------------- labels, CSV

def score_name(study: optuna.Study) -> str:
    """What the score axis is, from the attributes trials stored ('params proxy score', ...)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        proxies = [k.removeprefix("proxy_") for k in t.user_attrs if k.startswith("proxy_")]
        if proxies:
            return f"{proxies[0]} proxy score"
        if t.user_attrs.get("evaluated") is True:
            break
    return "score"


def write_front_csv(members: Sequence[Point], path: str | Path,
                    measured_ms: dict[int, float] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = FRONT_COLUMNS + (("measured_ms",) if measured_ms is not None else ())
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for m in members:
            row = list(m.row().values())
            if measured_ms is not None:
                row.append(measured_ms.get(m.trial))
            w.writerow(row)
    return p
