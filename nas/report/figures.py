"""Figures: the Pareto front with budget, baselines and knee; rendering to PNG files and TensorBoard arrays."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from nas.report.baselines import Baseline
from nas.report.fronts import Point

if TYPE_CHECKING:
    from matplotlib.figure import Figure



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
