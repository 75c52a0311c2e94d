"""`nas pareto RUN`: the front of a search (table, front.csv, front.png, hypervolume), read back from its run folder
or any storage."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from nas.commands.common import add_run_args
from nas.errors import ConfigError, NasError


def cmd_pareto(args: argparse.Namespace) -> None:
    from nas.arch.spec import loads_arch
    from nas.latency.profile import measure_network
    from nas.report.baselines import BASELINES_ATTR, Baseline
    from nas.report.figures import pareto_figure, save_figure
    from nas.report.fronts import default_reference, front, hypervolume, knee, score_name, trial_points, write_front_csv
    from nas.report.runs import open_run, study_scope, trial_head

    r = open_run(args.run, args.storage, args.study)
    points, members = trial_points(r.study), front(r.study)
    if not members:
        raise NasError(f"study {r.study.study_name!r} ({len(points)} complete trials) has no feasible evaluated trial "
                       f"yet: no front (run more trials, or raise the budget)")
    measured = None
    if args.measure:
        protocol = r.table(args.table, "--measure").protocol
        attrs = {t.number: t.user_attrs for t in r.study.get_trials(deepcopy=False)}
        measured = {m.trial: round(measure_network(loads_arch(m.arch, f"trial {m.trial}"), protocol, trial_head(
            attrs[m.trial])).value_us(protocol.statistic) / 1e3, 4) for m in members}
    for flag, v in (("--ref-score", args.ref_score), ("--ref-ms", args.ref_ms)):
        if v is not None and not math.isfinite(v):
            raise ConfigError(None, flag, f"must be a finite number, got {v}")
    budget = r.budget_ms
    ref = list(default_reference(points, budget))
    ref[0] = ref[0] if args.ref_score is None else args.ref_score
    ref[1] = ref[1] if args.ref_ms is None else args.ref_ms
    hv = hypervolume([m.key for m in members], tuple(ref))
    k = knee(members)
    out = Path(args.out) if args.out else (r.run_dir or Path("."))
    csv_path = write_front_csv(members, out / "front.csv", measured)
    baselines = [Baseline(**b) for b in r.study.user_attrs.get(BASELINES_ATTR, [])]
    fig = pareto_figure(points, members, budget_ms=budget, baselines=baselines, score_label=score_name(r.study),
                        title=f"{r.study.study_name}: {len(points)} trials, {len(members)} on the front", highlight=k,
                        scope=study_scope(r.study))
    png_path = save_figure(fig, out / "front.png")
    ref_src = ("given" if args.ref_score is not None else "worst feasible score",
               "given" if args.ref_ms is not None else ("the budget" if budget else "slowest feasible"))
    hv_line = (f"hypervolume {hv:.6g} against reference (score {ref[0]:.6g} = {ref_src[0]}, "
               f"latency {ref[1]:.6g} ms = {ref_src[1]})")
    if args.json:
        rows = [m.row() | ({"measured_ms": measured[m.trial]} if measured else {}) for m in members]
        print(json.dumps(rows, indent=2))
        print(hv_line, file=sys.stderr)
        return
    head = f"{'trial':>6s} {'predicted ms':>13s} {'score':>10s} {'params':>11s} {'MACs':>9s}"
    print(f"{r.study.study_name} ({r.url}): {len(points)} complete trials, {len(members)} on the Pareto front")
    print(head + (f" {'measured ms':>12s}" if measured else ""))
    for m in members:
        line = (f"{m.trial:6d} {m.predicted_ms:13.3f} {m.score:10.4g} {m.params or 0:11,d} "
                f"{(m.macs or 0) / 1e6:8.1f}M")
        if measured:
            line += f" {measured[m.trial]:12.3f}"
        print(line + ("  <- knee" if m is k else ""))
    print(hv_line)
    print(f"wrote {csv_path} and {png_path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pareto", help="the Pareto front of a search: table, front.csv, front.png, hypervolume",
                       description="Print the front (score up, predicted latency down) of a search's feasible trials, "
                                   "write front.csv and front.png, and the hypervolume against a stated reference.")
    add_run_args(p, "folder for front.csv and front.png (default: the run folder)")
    p.add_argument("--measure", action="store_true",
                   help="also measure each front member here, in ms (the whole detector for detector-scope searches)")
    p.add_argument("--ref-score", type=float, help="hypervolume reference score (default: worst feasible score)")
    p.add_argument("--ref-ms", type=float, help="hypervolume reference latency (default: the budget, else the slowest)")
    p.set_defaults(func=cmd_pareto)
