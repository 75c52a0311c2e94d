"""Quick check of the latency protocol: build a table covering only N sampled architectures of a space (and the
calibration networks), then validate it on those architectures (a few minutes instead of the full build). Used to compare protocol
changes before rebuilding the shipped tables.

    taskset -c 1 .venv/bin/python benchmarks/latency_pilot.py --space search_spaces/uib_yolo.yaml -n 30 --seed 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from nas.latency.coverage import arch_ops
from nas.latency.protocol import Protocol
from nas.latency.table import LatencyTable
from nas.latency.validate import calibrate, calibration_archs, validate, validation_archs
from nas.space import load_space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/uib_yolo.yaml")
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--backend", default="torch-cpu")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=0.04)
    ap.add_argument("--e2e-repeats", type=int, default=30)
    ap.add_argument("--e2e-min-time", type=float, default=0.3)
    ap.add_argument("--calibrate", type=int, default=20, help="calibration networks (0: none)")
    ap.add_argument("--statistic", default="p10", choices=("p10", "median"))
    ap.add_argument("--out", help="write the per-arch rows here (JSON)")
    args = ap.parse_args()
    space = load_space(args.space)
    archs = validation_archs(space, args.n, args.seed)
    protocol = Protocol(backend=args.backend, repeats=args.repeats, min_time_s=args.min_time, warmup_runs=3,
                        warmup_s=0.01, reference=not args.no_reference, statistic=args.statistic)
    table = LatencyTable.new(protocol, "pilot")
    t0 = time.time()
    calib = calibration_archs(space, args.calibrate)
    table.extend([(b, s) for a in archs + calib for _, b, s in arch_ops(a)], progress=False)
    build_s = time.time() - t0
    e2e = dataclasses.replace(protocol, repeats=args.e2e_repeats, min_time_s=args.e2e_min_time)
    if calib:
        calibrate(table, calib, e2e, progress=False)
    report = validate(table, archs, e2e, progress=False)
    s = report.summary()
    print(json.dumps({"build_s": round(build_s, 1), "ops": len(table.entries), "nominal_ref_us": table.reference_us,
                      **{k: s[k] for k in ("n", "within_10pct", "within_5pct", "mape", "kendall_tau", "bias_pct")},
                      "sum": s.get("sum"), "calibration": s["calibration"]}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report.rows, f, indent=1)


if __name__ == "__main__":
    main()
