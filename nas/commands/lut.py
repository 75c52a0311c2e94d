"""`nas lut build | extend | calibrate | show | validate | template | import`: latency lookup tables."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from nas.commands.device import device_flags, measurer_from
from nas.commands.int8 import int8_flags, local_calibration, with_dtype
from nas.commands.lutargs import covering_flags, detector_flags, head_from, measuring_flags, ops_from, protocol_from
from nas.errors import ConfigError
from nas.latency.protocol import BACKENDS


def cmd_build(args: argparse.Namespace) -> None:
    from nas.latency.table import writing

    with writing(args.out):  # a second build of the same file waits, then finds the table and refuses
        _build(args)


def _build(args: argparse.Namespace) -> None:
    from nas.latency.table import LatencyTable

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(str(out), None, "exists; use `nas lut extend` to add ops, or --force to start over")
    protocol = protocol_from(args)
    ops = ops_from(args)
    measurer = measurer_from(args)
    table = LatencyTable.new(protocol, name=args.name or out.stem,
                             space=", ".join(str(s) for s in args.space or []) or None, measurer=measurer)
    from nas.latency.coverage import key_of

    print(f"measuring {len({key_of(op) for op in ops})} ops ({protocol.describe()}) into {out}", file=sys.stderr)
    n = table.extend(ops, path=out, progress=not args.quiet, measurer=measurer)
    print(f"{out}: {n} ops measured, {len(table.entries)} in the table")
    if args.calibrate and args.space:
        _calibrate(table, args.space[0], args.calibrate, args.quiet, measurer)
        table.save(out)


def _calibrate(table, space_path: Path, n: int, quiet: bool, measurer) -> None:
    from nas.latency.validate import calibrate, calibration_archs, end_to_end
    from nas.space import load_space

    archs = calibration_archs(load_space(space_path), n)
    scale = calibrate(table, archs, end_to_end(local_calibration(table.protocol)), not quiet, measurer)
    print(f"{table.path}: calibration scale {scale:.4f} (median of measured / summed latency over {n} networks of "
          f"{space_path}; `nas lut validate` reports the plain sum beside it)")


def cmd_adapt(args: argparse.Namespace) -> None:
    from nas.latency.adapt import adapt, target_protocol
    from nas.latency.table import LatencyTable
    from nas.space import load_space

    source = LatencyTable.load(args.table)
    protocol = target_protocol(source.protocol, args.backend, args.threads, args.reference)
    protocol = with_dtype(protocol, args)
    out = Path(args.out or f"runs/lut-adapt/{args.table.stem}-{protocol.backend}-t{protocol.threads}.csv")
    if out.exists() and not args.force:
        raise ConfigError(str(out), None, "exists; use --force to overwrite it, or --out for another file")
    print(f"adapting {args.table} to {args.device or 'this machine'} ({protocol.describe()}): {args.ops} ops and "
          f"{args.num} networks to measure", file=sys.stderr)
    table = adapt(source, load_space(args.space), protocol, args.num, head_from(args), n_ops=args.ops, seed=args.seed,
                  name=out.stem, progress=not args.quiet, measurer=measurer_from(args))
    table.save(out)
    print(f"{out}: {len(table.entries)} ops adapted from {args.table}")
    print(_adaptation_line(table))


def _adaptation_line(table) -> str:
    """Where an adapted table came from, what was measured for it and how well the fit did, in one line."""
    a, src = table.header["adaptation"], table.header["adapted_from"]
    r = {k: v for k, v in a.get("residuals", {}).items() if v is not None}
    fit = [f"ops within ±10% {r['ops_cv_within_10pct']:.0%} (cross-validated)" if "ops_cv_within_10pct" in r else "",
           f"networks within ±10% {r['networks_within_10pct']:.0%}" if "networks_within_10pct" in r else "",
           f"(the source table: {r['source_within_10pct']:.0%})" if "source_within_10pct" in r else ""]
    scale = f", calibration scale {table.scale:.4f}" if table.header.get("calibration") else ""
    return (f"adapted from {src['table']} ({src.get('cpu_id') or 'unknown CPU'}, {src['backend']}, {src['threads']} "
            f"thread(s)): {a['ops']} ops and {a['networks']} networks measured in {a['minutes']:.1f} min{scale}; "
            + ", ".join(f for f in fit[:2] if f) + (f" {fit[2]}" if fit[2] else ""))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from nas.latency.table import LatencyTable, writing

    with writing(args.table):  # not over entries another process adds meanwhile: it waits, we wait
        table = LatencyTable.load(args.table)
        _calibrate(table, args.space, args.num, args.quiet, measurer_from(args))
        table.save(args.table)


def cmd_extend(args: argparse.Namespace) -> None:
    from nas.latency.table import LatencyTable, writing

    ops = ops_from(args)
    measurer = measurer_from(args)
    with writing(args.table):  # read under the lock: a second extend measures only what the first did not add
        table = LatencyTable.load(args.table)
        table.check_compatible(table.protocol, measurer=measurer)
        n = table.extend(ops, path=args.table, progress=not args.quiet, measurer=measurer)
    print(f"{args.table}: {n} ops added, {len(table.entries)} in the table")


def cmd_show(args: argparse.Namespace) -> None:
    import yaml

    from nas.commands.common import arch_ref
    from nas.latency.table import LatencyTable

    table = LatencyTable.load(args.table)
    if args.arch:
        arch = arch_ref(args.arch)
        if args.resolution:
            arch = arch.with_resolution(args.resolution)
        head = head_from(args)
        pred = table.predict(arch, head)
        if args.json:
            print(json.dumps({"arch": arch.name, "scope": "detector" if head else "backbone",
                              "predicted_ms": pred.total_ms,
                              "blocks": [{"block": b, "op": k, "us": us} for b, k, us in pred.blocks]}, indent=2))
            return
        what = f"detector ({head.neck} neck, {head.num_classes} classes)" if head else "backbone"
        print(f"{arch.name} {what} at {arch.resolution}px on {table.name}: {pred.total_ms:.3f} ms predicted")
        for b, k, us in pred.blocks:
            print(f"  {b:7s} {us / 1e3:8.3f} ms  {k}")
        return
    if args.json:
        print(json.dumps({"header": table.header, "entries": len(table.entries)}, indent=2, default=str))
        return
    sys.stdout.write(yaml.safe_dump(table.header, sort_keys=False))
    if table.header.get("adaptation"):
        print(_adaptation_line(table))
    vals = sorted(getattr(e, table.column) for e in table.entries.values())
    if vals:
        print(f"entries ({table.protocol.statistic} latencies): {len(vals)} ops, median {vals[len(vals) // 2]:.1f} us, "
              f"min {vals[0]:.1f} us, max {vals[-1]:.1f} us")


def cmd_validate(args: argparse.Namespace) -> None:
    from nas.latency.table import LatencyTable, writing
    from nas.latency.validate import end_to_end, validate, validation_archs, write_report
    from nas.space import load_space

    table = LatencyTable.load(args.table)
    space = load_space(args.space)
    archs = validation_archs(space, args.num, args.seed)
    if args.extend:
        from nas.latency.coverage import arch_ops

        head = head_from(args)
        ops = [(b, s) for a in archs for _, b, s in arch_ops(a)]
        if head is not None:
            from nas.latency.coverage import neckhead_op

            ops += [neckhead_op(a, head) for a in archs]
        with writing(args.table):  # read again under the lock: another process may have added entries
            table = LatencyTable.load(args.table)
            table.extend(ops, path=args.table, progress=not args.quiet, measurer=measurer_from(args))
    protocol = end_to_end(local_calibration(table.protocol), args.repeats, args.min_time)
    report = validate(table, archs, protocol, progress=not args.quiet, head=head_from(args),
                      measurer=measurer_from(args))
    paths = write_report(report, args.out)
    s = report.summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return
    what = "detectors (backbone + neck+head)" if head_from(args) else "architectures"
    print(f"{report.n} {what} from {args.space}, {report.protocol}")
    if table.header.get("adaptation"):
        print(_adaptation_line(table))
    print(f"{'predictor':22s} {'MAPE':>7s} {'±5%':>6s} {'±10%':>6s} {'tau':>6s} {'rho':>6s} {'bias':>7s}")
    label = "lookup table*" if report.calibration else "lookup table (sum)"
    for name, acc in ((label, report.lut), ("table, plain sum", report.plain_sum),
                      ("linear MACs+params", report.flops), ("table vs raw runs**", report.raw)):
        if acc is not None:
            print(f"{name:22s} {acc.mape:6.1f}% {acc.within_5:6.2f} {acc.within_10:6.2f} {acc.kendall_tau:6.2f} "
                  f"{acc.spearman_rho:6.2f} {acc.bias:+6.1f}%")
    if report.calibration:
        c = report.calibration
        print(f"* the sum of entries x {c['scale']}, the table's calibration: fitted on {c['archs']} other sampled "
              f"networks ({c['fitted']}), none of them in this sample")
    if report.raw:
        print("** measured times not normalised by the reference workload timed alongside them (machine-speed drift "
              "left in)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_template(args: argparse.Namespace) -> None:
    """The op list a device must measure, for tables built where this machine can't reach."""
    from nas.latency.coverage import key_of

    keys = sorted({key_of(op) for op in ops_from(args)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["op", "median_us"])
        for k in keys:
            w.writerow([k, ""])
    print(f"{out}: {len(keys)} ops to measure; fill median_us (optionally p10_us, p90_us, n) and run `nas lut import`")


def cmd_import(args: argparse.Namespace) -> None:
    from nas.config import load_yaml, require_mapping
    from nas.latency.table import FORMAT, import_csv

    header = dict(require_mapping(load_yaml(args.header), str(args.header), None))
    header.setdefault("format", FORMAT)
    header.setdefault("name", Path(args.out).stem)
    if "protocol" not in header:
        raise ConfigError(str(args.header), "protocol",
                          "required: backend, threads, batch and dtype of the measurement")
    table = import_csv(args.csv, header)
    from nas.latency.table import LatencyTable

    try:
        LatencyTable.loads(table.dumps(), str(args.header))  # the result must load like any table
    except ConfigError as e:  # the entries were checked above: a problem here is in the header file's own fields
        field = (e.field or "").removeprefix("header").removeprefix(".") or None
        raise ConfigError(str(args.header), field, e.message) from None
    table.save(args.out)
    print(f"{args.out}: {len(table.entries)} ops imported from {args.csv}")


def register(sub: argparse._SubParsersAction) -> None:
    lut = sub.add_parser("lut", help="latency lookup tables: build, adapt, extend, show, validate").add_subparsers(
        dest="lut_command", metavar="ACTION", required=True)
    _register_building(lut)
    _register_adapt(lut)
    _register_reading(lut)
    _register_elsewhere(lut)


def _register_building(lut: argparse._SubParsersAction) -> None:
    p = lut.add_parser("build", help="measure every op of a space (and/or archs) into a new table")
    p.add_argument("--out", required=True, help="table file to write (e.g. latency_tables/cpu_torch_fp32_t1.csv)")
    p.add_argument("--name", help="table name (default: the file name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing table")
    covering_flags(p)
    measuring_flags(p)
    device_flags(p)
    p.add_argument("--calibrate", type=int, default=30, metavar="N",
                   help="then fit the table's calibration on N networks sampled from the first --space, measured "
                        "end to end (default 30; 0: none)")
    p.set_defaults(func=cmd_build)

    p = lut.add_parser("calibrate", help="(re)fit a table's calibration scale on sampled networks measured end to end")
    p.add_argument("table", type=Path)
    p.add_argument("--space", type=Path, required=True, help="search space to sample the networks from")
    p.add_argument("-n", "--num", type=int, default=30, help="networks to measure (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    device_flags(p)
    p.set_defaults(func=cmd_calibrate)

    p = lut.add_parser("extend", help="measure only the ops a table is missing (same protocol as the table)")
    p.add_argument("table", type=Path)
    covering_flags(p)
    device_flags(p)
    p.set_defaults(func=cmd_extend)


def _register_adapt(lut: argparse._SubParsersAction) -> None:
    p = lut.add_parser("adapt", help="a table for this machine (and backend, threads) from another machine's table, "
                                     "in minutes: a few hundred ops and networks measured, a fitted transfer")
    p.add_argument("table", type=Path, help="the source table (e.g. a shipped one, built on another CPU)")
    p.add_argument("--space", type=Path, required=True, help="search space whose ops to sample and measure")
    p.add_argument("--backend", help=f"target backend: {' | '.join(BACKENDS)} (default: the source table's)")
    p.add_argument("--threads", type=int, help="target intra-op threads (default: the source table's)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="time the reference workload alongside each op (default: as the source on its backend; "
                        "on for torch, off for ONNX Runtime)")
    p.add_argument("-n", "--num", type=int, default=50, help="networks to measure end to end (default 50)")
    p.add_argument("--ops", type=int, default=400, help="single ops to measure (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the op sample (default 0)")
    int8_flags(p, None)
    p.add_argument("--out", help="table file to write (default runs/lut-adapt/SOURCE-BACKEND-tTHREADS.csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    detector_flags(p, "also measure some of the space's neck+head ops (whole-detector budgets)")
    device_flags(p)
    p.set_defaults(func=cmd_adapt)


def _register_reading(lut: argparse._SubParsersAction) -> None:
    p = lut.add_parser("show", help="a table's header, or an arch's predicted latency block by block")
    p.add_argument("table", type=Path)
    p.add_argument("--arch", help="arch YAML or zoo:NAME to predict")
    p.add_argument("--resolution", type=int, help="predict at this input resolution")
    p.add_argument("--json", action="store_true")
    detector_flags(p, "predict the whole detector: backbone + the neck+head op")
    p.set_defaults(func=cmd_show)

    p = lut.add_parser("validate", help="predicted vs measured end-to-end latency on sampled architectures")
    p.add_argument("table", type=Path)
    p.add_argument("--space", type=Path, required=True, help="search space to sample from")
    p.add_argument("-n", "--num", type=int, default=30, help="architectures to sample (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lut-validate", help="folder for the CSV, PNG and TensorBoard events")
    p.add_argument("--extend", action="store_true", help="measure ops the table is missing first")
    p.add_argument("--repeats", type=int, default=30, help="minimum timed runs per architecture (default 30)")
    p.add_argument("--min-time", type=float, default=0.3, help="minimum timed seconds per architecture (default 0.3)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    detector_flags(p, "validate whole detectors: backbone + the neck+head op against the Detector measured end to end")
    device_flags(p)
    p.set_defaults(func=cmd_validate)


def _register_elsewhere(lut: argparse._SubParsersAction) -> None:
    p = lut.add_parser("template", help="CSV of the ops to measure on another device (for `nas lut import`)")
    p.add_argument("--out", required=True)
    covering_flags(p)
    p.set_defaults(func=cmd_template)

    p = lut.add_parser("import", help="a table from a CSV measured on another device (see docs/LATENCY.md)")
    p.add_argument("csv", type=Path, help="CSV with columns op,median_us[,p10_us,p90_us,n]")
    p.add_argument("--header", type=Path, required=True, help="YAML with name, device and protocol of the measurement")
    p.add_argument("--out", required=True, help="table file to write")
    p.set_defaults(func=cmd_import)
