"""The latency table a search predicts with on this machine: the experiment's own when it was measured on this CPU,
else, when asked (`nas search --adapt`, the quickstart), a table adapted here once and kept in the run folder; a
resumed or joined search uses the run folder's table whatever it is asked."""
from __future__ import annotations

import logging
import shlex
from dataclasses import replace
from pathlib import Path

import yaml

from nas.arch.headconfig import HeadConfig
from nas.errors import ConfigError
from nas.latency.environment import cpu_id
from nas.latency.table import LatencyTable
from nas.search.experiment import Experiment

log = logging.getLogger(__name__)
ADAPTED = "latency_table.csv"  # RUN/latency_table.csv
NETWORKS = 50                  # networks measured end to end by the adaptation
HELD_OUT = 10                  # networks (detectors with a detector budget) measured to report before/after


def adapt_command(exp: Experiment, out: str | Path) -> str:
    """The `nas lut adapt` that writes the table `host_table` adapts for this experiment."""
    argv = ["nas", "lut", "adapt", exp.table, "--space", exp.space, "-n", NETWORKS, "--out", out]
    if exp.seed:
        argv += ["--seed", exp.seed]
    if exp.head is not None:
        argv.append("--detector")
        default = HeadConfig()
        for flag, name in (("--neck", "neck"), ("--width", "width"), ("--depth", "depth"), ("--classes", "num_classes")):
            if getattr(exp.head, name) != getattr(default, name):
                argv += [flag, getattr(exp.head, name)]
    return " ".join(shlex.quote(str(a)) for a in argv)


def host_table(exp: Experiment, adapt: bool = False, *, progress: bool = True) -> tuple[Experiment, str | None]:
    """`exp` predicting with the table for this machine, and one line for the user when a table was adapted now.
    Without `adapt`, a table from another CPU is used as it is, with one notice giving the command that adapts it."""
    adapted = exp.run_dir / ADAPTED
    if adapted.is_file():
        return _reuse(exp, adapted), None
    source = LatencyTable.load(exp.table)
    theirs = source.measured_elsewhere()
    if theirs is None:
        return exp, None
    if not adapt:
        mine = Path(exp.output) / f"{Path(exp.table).stem}-adapted.csv"
        log.warning("%s was measured on another CPU (%s; this is %s): budgets are that machine's latency, often 10-30%% "
                    "off here. Adapt it here in about a minute: add --adapt to this command (a new run), or run `%s` "
                    "and give new searches --table %s", exp.table, theirs, cpu_id(), adapt_command(exp, mine), mine)
        return exp, None
    _refuse_mixing(exp)
    return replace(exp, table=str(adapted)), _adapt(exp, source, adapted, progress)


def _reuse(exp: Experiment, adapted: Path) -> Experiment:
    """The run folder's adapted table, checked to come from the experiment's table."""
    _refuse_mixing(exp)
    table = LatencyTable.load(adapted)
    src = (table.header.get("adapted_from") or {}).get("table")
    if Path(exp.table) != adapted and src and Path(src).name != Path(exp.table).name:
        raise ConfigError(str(adapted), "header.adapted_from.table",
                          f"this run's latency table was adapted from {src}, the experiment names {exp.table}: "
                          f"start a new run (--name), or delete {adapted} to adapt {exp.table} instead")
    theirs = table.measured_elsewhere()
    if theirs:
        log.warning("%s was adapted on another CPU (%s; this is %s): this run keeps predicting with it so that its "
                    "trials stay comparable", adapted, theirs, cpu_id())
    else:
        log.info("predicting with %s (adapted to this CPU earlier)", adapted)
    return replace(exp, table=str(adapted))


def _refuse_mixing(exp: Experiment) -> None:
    """A run that already searched with the unadapted table must not go on with another: its trials' latencies
    would come from two tables."""
    config = exp.run_dir / "config.yaml"
    if not config.is_file():
        return
    before = (yaml.safe_load(config.read_text()) or {}).get("table")
    if before and Path(before).name != ADAPTED:
        raise ConfigError(str(config), "table", f"this run already searched with {before} as it is; predicting with "
                                                f"{exp.run_dir / ADAPTED} now would mix two tables' latencies in one "
                                                f"study: start a new run (--name NEW), or go on without --adapt (and "
                                                f"move {ADAPTED} out of the run folder if it is there)")


def _adapt(exp: Experiment, source: LatencyTable, out: Path, progress: bool) -> str:
    from nas.latency.adapt import adapt, held_out_check, target_protocol
    from nas.space import load_space

    space = load_space(exp.space)
    held_out = HELD_OUT
    target = adapt(source, space, target_protocol(source.protocol), NETWORKS, exp.head, seed=exp.seed,
                   name=f"{source.name}-{exp.name}", progress=progress)
    what = "detectors" if exp.head is not None else "backbones"
    check = ""
    if held_out >= 2:
        h = held_out_check(source, target, space, held_out, exp.head, progress=progress)
        check = (f"; on {held_out} held-out {what} within ±10%: {h['source_within_10pct']:.0%} as shipped -> "
                 f"{h['within_10pct']:.0%} adapted (Kendall tau {h['source_kendall_tau']:.2f} -> "
                 f"{h['kendall_tau']:.2f})")
    target.save(out)
    a = target.header["adaptation"]
    return (f"adapted {exp.table} ({source.measured_elsewhere()}) to this CPU ({cpu_id()}) in {a['minutes']:.1f} min "
            f"({a['ops']} ops, {a['networks']} networks measured){check} -> {out}")
