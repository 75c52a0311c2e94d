"""Train a search's best front members and zoo baselines on the same data and schedule, measure the trained
detectors side by side, and write the comparison (markdown, CSV, PNG, TensorBoard)."""
from __future__ import annotations

import csv
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.errors import ConfigError, NasError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nas.arch.headconfig import HeadConfig
    from nas.arch.spec import ArchSpec
    from nas.detect.train import TrainConfig, TrainResult
    from nas.latency.protocol import Protocol
    from nas.latency.table import LatencyTable

log = logging.getLogger(__name__)

# The builtin map's contract: map_fn(fn, items) yields fn(item) in order; e.g. ProcessPoolExecutor(...).map.
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]

# Short on purpose: every baseline is one more full training. The small V3 and V4 are the usual mobile choices.
DEFAULT_BASELINES = ("mobilenet_v3_small_100", "mobilenet_v4_conv_small")


COLUMNS = ("model", "source", "map50_95", "map50", "latency_ms", "predicted_ms", "params", "macs", "epochs",
           "run_dir")


@dataclass(frozen=True)
class Entrant:
    label: str            # folder name under RUN/compare and the figure's label, e.g. trial-12, mobilenet_v3_small_100
    source: str           # "search" or "zoo"
    arch: ArchSpec
    score: float | None = None  # the search's score (front members)


@dataclass(frozen=True)
class Row:
    model: str
    source: str
    map50_95: float
    map50: float
    latency_ms: float | None   # measured here, interleaved with the others, at the training image size
    predicted_ms: float | None  # the table's prediction at the training image size (None: not covered)
    params: int
    macs: int
    epochs: int
    run_dir: str


def parse_baselines(text: str | None) -> list[str]:
    """'zoo:a,zoo:b' or 'a,b' -> zoo names; 'none' or '' -> no baselines; None -> the defaults."""
    from nas.arch.zoo import ZOO
    from nas.config import suggest

    if text is None:
        return list(DEFAULT_BASELINES)
    names = [n.strip().removeprefix("zoo:") for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for n in names:
        if n not in ZOO:
            raise ConfigError("command line", "--baselines", f"unknown zoo model {n!r}{suggest(n, list(ZOO))}; see "
                                                             f"`nas zoo list`, or 'none' for no baselines")
    return list(dict.fromkeys(names))


def top_members(study, k: int, max_ms: float | None = None) -> list[Entrant]:
    """The k front members with the highest search score (ties: the faster), best first, each architecture once
    (the earliest trial of the best-ranked); with `max_ms`, only members predicted at or under it."""
    from nas.arch.spec import dumps_arch, loads_arch
    from nas.report.fronts import front

    members = [p for p in front(study) if max_ms is None or p.predicted_ms <= max_ms]
    if not members:
        under = f" at or under {max_ms:g} ms" if max_ms is not None else ""
        raise NasError(f"study {study.study_name!r} has no feasible evaluated trial{under} yet: nothing to train "
                       f"(run more trials, or raise the budget)")
    out: list[Entrant] = []
    seen: set[str] = set()
    for p in sorted(members, key=lambda p: (-(p.score or 0.0), p.predicted_ms, p.trial)):
        arch = loads_arch(p.arch, f"trial {p.trial}")
        key = dumps_arch(replace(arch, name=""))  # a sampler may propose one arch twice: both land on the front
        if key not in seen:
            seen.add(key)
            out.append(Entrant(f"trial-{p.trial}", "search", arch, p.score))
        if len(out) == k:
            break
    return out


def zoo_entrants(names: Sequence[str]) -> list[Entrant]:
    from nas.arch.zoo import get_arch

    return [Entrant(n, "zoo", get_arch(n)) for n in names]


def predicted_ms(table: LatencyTable | None, arch: ArchSpec, head: HeadConfig, imgsz: int) -> float | None:
    """The table's whole-detector prediction at imgsz, None when the table lacks one of its ops."""
    from nas.latency.table import LatencyTableError

    if table is None:
        return None
    try:
        return round(table.predict(arch.with_resolution(imgsz), head).total_ms, 3)
    except (LatencyTableError, ConfigError):
        return None


@dataclass(frozen=True)
class Training:
    """One training of a comparison: a picklable task, so a process pool can run it."""
    label: str            # for the log lines, e.g. trial-12 or "b1-trial-12 seed 0"
    config: TrainConfig


def run_training(task: Training) -> TrainResult:
    """Train task.config; the task `compare` hands to its map. Each epoch's metrics are logged at debug level."""
    from nas.detect.train import train

    c = task.config
    log.info("training %s for %d epochs at %d px", task.label, c.epochs, c.imgsz)
    r = train(c, functools.partial(_log_epoch, task.label))
    log.info("trained %s: mAP50-95 %.4f, mAP50 %.4f, %d epochs (%.1f min)", task.label, r.map50_95, r.map50,
             r.epochs, r.seconds / 60)
    return r


def _log_epoch(label: str, epoch: int, row: dict[str, Any]) -> None:
    log.debug("  %s: epoch %d, mAP50-95 %.4f, mAP50 %.4f, %.0f s", label, epoch, row["map50_95"], row["map50"],
              row["time"])


def compare(entrants: Sequence[Entrant], base: TrainConfig, out: Path, head: HeadConfig,
            protocol: Protocol | None, table: LatencyTable | None = None, map_fn: MapFn = map) -> list[Row]:
    """Train every entrant with `base` (same data, epochs, image size, neck, seed) into out/<label>, one task per
    training through `map_fn`; then, after all trainings, measure the trained detectors interleaved in this process
    (drift hits all alike) under `protocol` (None: no measurement)."""
    from nas.arch.detector import detector_cost
    from nas.detect.checkpoint import load_detector

    tasks = [Training(e.label, replace(base, arch=e.arch, project=str(out), name=e.label, exist_ok=True))
             for e in entrants]
    log.info("training %d models for %d epochs at %d px into %s", len(tasks), base.epochs, base.imgsz, out)
    results = dict(zip((e.label for e in entrants), map_fn(run_training, tasks)))
    latency: dict[str, float] = {}
    if protocol is not None:
        models = {label: load_detector(r.best if r.best.is_file() else r.last) for label, r in results.items()}
        measured = measure_detectors(models, base.imgsz, protocol)
        latency = {k: round(m.value_us(protocol.statistic) / 1e3, 3) for k, m in measured.items()}
    rows = []
    for e in entrants:
        r = results[e.label]
        params, macs = detector_cost(e.arch, head, base.imgsz)
        rows.append(Row(e.label, e.source, r.map50_95, r.map50, latency.get(e.label),
                        predicted_ms(table, e.arch, head, base.imgsz), params, macs, r.epochs, str(r.run_dir)))
    return rows


def measure_detectors(models: dict[str, Any], imgsz: int, protocol: Protocol,
                      rounds: int | None = None) -> dict[str, Any]:
    """Whole detectors measured side by side (`measure_interleaved`) at imgsz x imgsz: drift hits all alike.
    Returns label -> Measurement; `rounds` None = until the protocol's repeats and time are reached."""
    import dataclasses

    from nas.latency.profile import measure_interleaved

    # Whole detectors are few and slow: time more calls than a table entry (binding fields unchanged).
    p = dataclasses.replace(protocol, repeats=max(protocol.repeats, 30), min_time_s=max(protocol.min_time_s, 1.0))
    what = f"{rounds} rounds" if rounds else f">= {p.repeats} runs each"
    log.info("measuring %d detectors interleaved at %d px (%s, %d thread(s), %s)", len(models), imgsz, p.backend,
             p.threads, what)
    return measure_interleaved(models, (3, imgsz, imgsz), p, rounds=rounds)


# ---------------------------------------------------------------- outputs

def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown(rows: Sequence[Row], title: str) -> str:
    lines = [f"### {title}", "",
             "| model | source | mAP50-95 | mAP50 | latency ms (measured) | predicted ms | params | MACs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.source} | {_fmt(r.map50_95, 4)} | {_fmt(r.map50, 4)} | "
                     f"{_fmt(r.latency_ms, 2)} | {_fmt(r.predicted_ms, 2)} | {r.params:,} | {r.macs / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return path


def comparison_figure(rows: Sequence[Row], title: str, budget_ms: float | None = None) -> Figure:
    """mAP50-95 against measured latency: searched models as dots, zoo baselines as stars, each labelled; the
    search's budget as a vertical line when it was a whole-detector budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for source, style in (("search", {"marker": "o", "s": 45, "color": "C3", "label": "searched (front members)"}),
                          ("zoo", {"marker": "*", "s": 160, "color": "C2", "edgecolors": "k", "linewidths": 0.6,
                                   "label": "zoo baselines"})):
        pts = [r for r in rows if r.source == source and r.latency_ms is not None]
        if not pts:
            continue
        ax.scatter([r.latency_ms for r in pts], [r.map50_95 for r in pts], zorder=3, **style)
        for r in pts:
            ax.annotate(r.model, (r.latency_ms, r.map50_95), xytext=(5, 4), textcoords="offset points", fontsize=8)
    if budget_ms:
        ax.axvline(budget_ms, color="k", linestyle="--", linewidth=1.0, label=f"search budget {budget_ms:g} ms")
    ax.set_xlabel("measured detector latency (ms)")
    ax.set_ylabel("mAP50-95 (val)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def write_outputs(rows: Sequence[Row], out: Path, title: str, budget_ms: float | None,
                  tb_dir: Path | None) -> dict[str, Path]:
    """compare.md, compare.csv, map_vs_latency.png in `out`; the figure and the table in TensorBoard at tb_dir."""
    from nas.report.figures import figure_to_array, save_figure

    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, title)
    paths = {"markdown": out / "compare.md", "csv": write_csv(rows, out / "compare.csv")}
    paths["markdown"].write_text(md)
    fig = comparison_figure(rows, title, budget_ms)
    paths["png"] = save_figure(fig, out / "map_vs_latency.png")
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tb_dir)) as w:
            w.add_image("compare/map_vs_latency", figure_to_array(fig), 0, dataformats="HWC")
            w.add_text("compare/table", md, 0)
        paths["tensorboard"] = tb_dir
    return paths
