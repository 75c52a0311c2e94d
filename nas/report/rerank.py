"""Rerank a search's best candidates by the short training before the long ones: the search's proxy orders the
whole space well enough but not the few near-equal front members next to the budget (docs/BENCHMARKS.md, Headline)."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.detect.short import ShortSchedule, short_score

if TYPE_CHECKING:
    from nas.arch.spec import ArchSpec
    from nas.report.compare import Entrant, MapFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranked:
    entrant: Entrant
    map50_95: float       # mean over the seeds after the short training (NaN: one diverged, ranked last)
    map50: float
    train_s: float
    per_seed: tuple[float, ...] = ()  # mAP50-95 of each seed's run
    train_cpu_s: float = 0.0          # CPU seconds of all its seeds' runs (process time)


@dataclass(frozen=True)
class ShortTask:
    """One candidate's short trainings (every seed of the schedule): a picklable task for a process pool."""
    arch: ArchSpec
    schedule: ShortSchedule
    data: str
    out: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def run_short(task: ShortTask) -> dict[str, Any]:
    """`short_score` of one task; the function `rerank` hands to its map."""
    return short_score(task.arch, task.schedule, task.data, task.out, **task.overrides)


def order(ranked: Iterable[Ranked]) -> list[Ranked]:
    """Best short-training mAP50-95 first; ties by the search's score, then by label (deterministic)."""
    def key(r: Ranked):
        m = r.map50_95 if math.isfinite(r.map50_95) else -math.inf
        return (-m, -(r.entrant.score or 0.0), r.entrant.label)
    return sorted(ranked, key=key)


def rerank(candidates: Sequence[Entrant], schedule: ShortSchedule, out: Path, map_fn: MapFn = map,
           **overrides: Any) -> list[Ranked]:
    """Short-train every candidate into out/<label>/seed<N> (finished ones reused), one task per candidate through
    `map_fn` (e.g. a process pool's map), and return them best first."""
    data = schedule.dataset(out)
    log.info("short-training %d candidates (%d epochs at %d px, seeds %s) into %s", len(candidates), schedule.epochs,
             schedule.imgsz, ", ".join(map(str, schedule.seeds)), out)
    tasks = [ShortTask(e.arch, schedule, data, out / e.label, overrides) for e in candidates]
    ranked = []
    for i, (e, r) in enumerate(zip(candidates, map_fn(run_short, tasks)), 1):
        log.info("rerank [%d/%d] %s: mAP50-95 %.4f (mean of %d seeds) after %d epochs at %d px (%.0f s)", i,
                 len(candidates), e.label, r["map50_95"], len(schedule.seeds), schedule.epochs, schedule.imgsz,
                 r["train_s"])
        ranked.append(Ranked(e, r["map50_95"], r["map50"], r["train_s"], tuple(r["per_seed"]), r["train_cpu_s"]))
    return order(ranked)
