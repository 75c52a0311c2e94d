"""Pareto fronts of a search (score up, predicted latency down): front, hypervolume, knee, the front figure, and
zoo baselines placed on the same axes. Pure functions over an Optuna study; nothing here writes TensorBoard."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nas.arch.spec import ArchSpec
    from nas.detect.model import HeadConfig
    from nas.latency.table import LatencyTable

# The reference points the issue asks for (MobileNetV2/V3/V4): the models a user would otherwise pick.
ZOO_BASELINES = ("mobilenet_v2_100", "mobilenet_v3_small_100", "mobilenet_v3_large_100", "mobilenet_v4_conv_small")
FRONT_COLUMNS = ("trial", "predicted_ms", "score", "params", "macs")
BASELINES_ATTR = "baselines"  # study user attr: the zoo baselines the search logged, for `nas pareto`


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


@dataclass(frozen=True)
class Baseline:
    """A reference architecture (a zoo model) predicted by the same table and scored by the same evaluator."""

    name: str
    predicted_ms: float
    score: float


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


# ---------------------------------------------------------------- zoo baselines

def zoo_baselines(table: LatencyTable, resolutions: Iterable[int], score_fn: Callable[[ArchSpec], float],
                  names: Iterable[str] = ZOO_BASELINES, head: HeadConfig | None = None
                  ) -> tuple[list[Baseline], list[str]]:
    """Zoo models at each search resolution the table fully covers, predicted by it (with `head`: as whole
    detectors, like detector-scope trials) and scored by `score_fn`. Returns the baselines and one note per model
    skipped (the table lacks its ops, or scoring failed)."""
    from nas.arch.zoo import get_arch
    from nas.errors import ConfigError
    from nas.latency.table import arch_ops, extend_command, neckhead_op

    res = sorted(set(resolutions))
    out, notes = [], []
    for name in names:
        for r in res:
            arch = get_arch(name).with_resolution(r)
            label = name if len(res) == 1 else f"{name}@{r}"
            ops: list = [(b, s) for _, b, s in arch_ops(arch)]
            try:
                ops += [neckhead_op(arch, head)] if head is not None else []
            except ConfigError as e:
                notes.append(f"baseline {label} skipped: not usable as a detector ({e.message})"[:300])
                continue
            missing = table.missing(ops)
            if missing:
                what = f"--arch zoo:{name} --resolution {r}"
                fix = extend_command("TABLE", head, what) if head is not None else f"nas lut extend TABLE {what}"
                notes.append(f"baseline {label} skipped: latency table {table.name} has no entry for {len(missing)} "
                             f"of its ops (add them with `{fix}`)")
                continue
            try:
                out.append(Baseline(label, table.predict(arch, head).total_ms, float(score_fn(arch))))
            except Exception as e:  # noqa: BLE001 - a baseline is decoration: never fail the search for it
                notes.append(f"baseline {label} skipped: scoring failed ({type(e).__name__}: {e})"[:300])
    return out, notes


# ---------------------------------------------------------------- the figure

def pareto_figure(points: Sequence[Point], members: Sequence[Point], *, budget_ms: float | None = None,
                  baselines: Sequence[Baseline] = (), score_label: str = "score", title: str | None = None,
                  highlight: Point | None = None, scope: str | None = None) -> Figure:
    """All trials (infeasible greyed; over-budget ones that were never scored as ticks along the bottom), the
    front as a step line, the budget as a vertical line, baselines as labelled stars, the knee ringed. `scope`
    ("detector" or "backbone") says on the latency axis what the predicted latency covers."""
    from matplotlib.figure import Figure  # no pyplot: no global figure registry in a long search process

    fig = Figure(figsize=(9.0, 4.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    feasible = [p for p in points if p.feasible]
    scored_bad = [p for p in points if not p.feasible and p.score is not None and math.isfinite(p.score)]
    unscored = [p for p in points if not p.feasible and (p.score is None or not math.isfinite(p.score))]
    if feasible:
        ax.scatter([p.predicted_ms for p in feasible], [p.score for p in feasible], s=16, color="C0", alpha=0.55,
                   linewidths=0, label=f"trials ({len(feasible)})")
    if scored_bad:
        ax.scatter([p.predicted_ms for p in scored_bad], [p.score for p in scored_bad], s=16, color="0.65",
                   alpha=0.7, linewidths=0, label=f"infeasible ({len(scored_bad)})")
    if unscored:
        ax.plot([p.predicted_ms for p in unscored], [0.015] * len(unscored), "|", color="0.6", markersize=9,
                transform=ax.get_xaxis_transform(), label=f"over budget, not evaluated ({len(unscored)})")
    if members:
        xs = [p.predicted_ms for p in members]
        ys = [p.score for p in members]
        right = max([budget_ms or 0.0] + [p.predicted_ms for p in feasible])
        if right > xs[-1]:  # nothing better exists up to the budget: carry the last step there
            xs, ys = xs + [right], ys + [ys[-1]]
        ax.step(xs, ys, where="post", color="C3", linewidth=1.8, zorder=3)
        ax.scatter([p.predicted_ms for p in members], [p.score for p in members], s=30, color="C3", zorder=4,
                   label=f"Pareto front ({len(members)})")
    if highlight is not None and highlight.score is not None:
        ax.scatter([highlight.predicted_ms], [highlight.score], s=140, facecolors="none", edgecolors="k",
                   linewidths=1.3, zorder=5, label=f"knee (trial {highlight.trial})")
    if budget_ms:
        ax.axvline(budget_ms, color="k", linestyle="--", linewidth=1.0, label=f"budget {budget_ms:g} ms")
    if baselines:
        ax.scatter([b.predicted_ms for b in baselines], [b.score for b in baselines], marker="*", s=150, color="C2",
                   edgecolors="k", linewidths=0.6, zorder=6, label="zoo baselines")
        # Neighbouring stars take turns above and below, further out each time, so labels don't overprint.
        # Labels of the right-most quarter point left, so they stay inside the axes, clear of the legend.
        xs_all = [p.predicted_ms for p in points] + [b.predicted_ms for b in baselines] + [budget_ms or 0.0]
        lo_x, hi_x = min(xs_all), max(xs_all)
        for i, b in enumerate(sorted(baselines, key=lambda b: b.predicted_ms)):
            dy = (1 if i % 2 == 0 else -1) * (6 + 9 * (i % 4 // 2))
            left = b.predicted_ms > lo_x + 0.75 * (hi_x - lo_x)
            ax.annotate(b.name, (b.predicted_ms, b.score), xytext=(-6 if left else 6, dy), textcoords="offset points",
                        fontsize=7, va="bottom" if dy > 0 else "top", ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5})
    what = {"detector": ", whole detector", "backbone": ", backbone only"}.get(scope or "", "")
    ax.set_xlabel(f"predicted latency{what} (ms)")
    ax.set_ylabel(score_label)
    ax.set_title(title or "Pareto front", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        # outside the axes: the legend never hides a point
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an H x W x 3 uint8 array (what TensorBoard's add_image takes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(p))
    return p
