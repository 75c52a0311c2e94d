"""Rerank a search's best candidates by the short training before the long ones: the search's proxy orders the
whole space well enough but not the few near-equal front members next to the budget (docs/BENCHMARKS.md, Headline)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from nas.detect.short import ShortSchedule, short_score

if TYPE_CHECKING:
    from nas.report.compare import Entrant


@dataclass(frozen=True)
class Ranked:
    entrant: Entrant
    map50_95: float       # mean over the seeds after the short training (NaN: one diverged, ranked last)
    map50: float
    train_s: float
    per_seed: tuple[float, ...] = ()  # mAP50-95 of each seed's run


def order(ranked: Iterable[Ranked]) -> list[Ranked]:
    """Best short-training mAP50-95 first; ties by the search's score, then by label (deterministic)."""
    def key(r: Ranked):
        m = r.map50_95 if math.isfinite(r.map50_95) else -math.inf
        return (-m, -(r.entrant.score or 0.0), r.entrant.label)
    return sorted(ranked, key=key)


def rerank(candidates: Sequence[Entrant], schedule: ShortSchedule, out: Path, log: Callable[[str], Any] = print,
           **overrides: Any) -> list[Ranked]:
    """Short-train every candidate into out/<label>/seed<N> (finished ones reused) and return them best first."""
    data = schedule.dataset(out)
    ranked = []
    for i, e in enumerate(candidates, 1):
        r = short_score(e.arch, schedule, data, out / e.label, **overrides)
        log(f"rerank [{i}/{len(candidates)}] {e.label}: mAP50-95 {r['map50_95']:.4f} (mean of {len(schedule.seeds)} "
            f"seeds) after {schedule.epochs} epochs at {schedule.imgsz} px ({r['train_s']:.0f} s)")
        ranked.append(Ranked(e, r["map50_95"], r["map50"], r["train_s"], tuple(r["per_seed"])))
    return order(ranked)
