"""How well does a latency table transfer to this machine and protocol? (issue 17's acceptance table)

Measures held-out architectures (a validation seed no fit ever sees) once, end to end, under the target protocol,
and scores every predictor on those same measurements: the source table as it is, the source with a global scale
fitted here (`nas lut calibrate`), the source adapted with `nas lut adapt` from each number of networks asked for,
and optionally a table fully rebuilt here. Each is reported normalised as `nas lut validate` does (the measurement
put on the table's reference speed) and raw (the milliseconds a user gets). Run on a quiet machine:

    .venv/bin/python benchmarks/adapt_quality.py latency_tables/cpu_torch-cpu_fp32_t1.csv \
        --space search_spaces/uib_yolo.yaml -n 100 --networks 10,20,50 --out runs/adapt-quality/torch
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.arch.headconfig import HeadConfig  # noqa: E402
from nas.latency.adapt import target_protocol  # noqa: E402
from nas.latency.environment import cpu_id  # noqa: E402
from nas.latency.profile import measure_network  # noqa: E402
from nas.latency.table import LatencyTable  # noqa: E402
from nas.latency.validate import accuracy, calibration_archs, end_to_end, validation_archs  # noqa: E402
from nas.space import load_space  # noqa: E402


def score(table: LatencyTable, archs, raws, statistic: str, head) -> dict:
    pred = [table.predict(a, head).total_us for a in archs]
    normalised = [r.normalised(table.reference_us).value_us(statistic) for r in raws]
    raw = [r.value_us(statistic) for r in raws]
    return {"normalised": accuracy(pred, normalised).to_json(), "raw": accuracy(pred, raw).to_json()}


def calibrated(source: LatencyTable, space, protocol, n: int) -> tuple[LatencyTable, float]:
    """The source with one global scale fitted on n backbones measured here (what `nas lut calibrate` does; the
    scale multiplies a detector's backbone part)."""
    t0 = time.monotonic()
    table = copy.deepcopy(source)
    archs = calibration_archs(space, n)
    ratios = []
    for a in archs:
        m = measure_network(a, protocol).normalised(table.reference_us).value_us(protocol.statistic)
        ratios.append(m / table.predict(a).sum_us)
    ratios.sort()
    table.header["calibration"] = {"scale": round(ratios[len(ratios) // 2], 4), "archs": n, "seed": 0,
                                   "fitted": "benchmark"}
    return table, (time.monotonic() - t0) / 60


def _adapt_in_own_process(args: argparse.Namespace, n: int, out: Path) -> LatencyTable:
    """`nas lut adapt` as a user runs it: in a fresh process (its networks are timed before anything else), on the
    CPUs this process may use."""
    cmd = [sys.executable, "-m", "nas", "lut", "adapt", str(args.source.resolve()), "--space",
           str(args.space.resolve()), "-n", str(n), "--out", str(out.resolve()), "--force", "--quiet"]
    cmd += ["--backend", args.backend] if args.backend else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--detector"] if args.detector else []
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    return LatencyTable.load(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("--space", type=Path, required=True)
    p.add_argument("--backend", help="target backend (default: the source's)")
    p.add_argument("--threads", type=int, help="target threads (default: the source's)")
    p.add_argument("--detector", action="store_true", help="whole detectors (dw neck, 10 classes)")
    p.add_argument("-n", "--num", type=int, default=100, help="held-out architectures (default 100)")
    p.add_argument("--seed", type=int, default=4242, help="validation seed of the held-out sample")
    p.add_argument("--networks", default="10,20,50", help="adapt from each of these numbers of networks")
    p.add_argument("--calibrate", type=int, default=30, help="networks of the global-scale baseline (default 30)")
    p.add_argument("--rebuilt", type=Path, help="a table fully rebuilt here, for comparison")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    source = LatencyTable.load(args.source)
    space = load_space(args.space)
    head = HeadConfig() if args.detector else None
    protocol = target_protocol(source.protocol, args.backend, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    archs = validation_archs(space, args.num, args.seed)
    network = end_to_end(protocol)
    t0 = time.monotonic()
    raws = [measure_network(a, network, head) for a in archs]
    result = {"command": " ".join(sys.argv), "cpu_id": cpu_id(), "source": str(args.source),
              "source_cpu_id": source.header.get("device", {}).get("cpu_id"), "target": protocol.describe(),
              "held_out": {"n": len(archs), "seed": args.seed, "minutes": round((time.monotonic() - t0) / 60, 2)},
              "detector": args.detector, "rows": []}
    rows = result["rows"]
    result["archs"] = [{"arch": a.name, "raw_us": round(r.value_us(protocol.statistic), 1),
                        "reference_us": r.reference_us and round(r.reference_us, 1)} for a, r in zip(archs, raws)]
    rows.append({"predictor": "source as is", "minutes": 0.0, **score(source, archs, raws, protocol.statistic, head)})
    table, minutes = calibrated(source, space, network, args.calibrate)
    rows.append({"predictor": f"global scale ({args.calibrate} networks)", "minutes": round(minutes, 2),
                 **score(table, archs, raws, protocol.statistic, head)})
    for n in (int(x) for x in args.networks.split(",")):
        adapted = _adapt_in_own_process(args, n, args.out / f"adapted_{n}.csv")
        rows.append({"predictor": f"adapted ({n} networks)", "minutes": adapted.header["adaptation"]["minutes"],
                     "ops": adapted.header["adaptation"]["ops"], **score(adapted, archs, raws, protocol.statistic,
                                                                           head)})
    if args.rebuilt:
        rebuilt = LatencyTable.load(args.rebuilt)
        rows.append({"predictor": f"rebuilt here ({args.rebuilt.name})", "minutes": None,
                     **score(rebuilt, archs, raws, protocol.statistic, head)})
    (args.out / "adapt_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['source']} ({result['source_cpu_id']}) -> {result['cpu_id']}, {result['target']}")
    print(f"{len(archs)} held-out {'detectors' if head else 'backbones'} (seed {args.seed})")
    print(f"{'predictor':32s} {'min':>5s} {'±10% norm':>9s} {'τ':>5s} {'±10% raw':>9s} {'τ raw':>6s} {'bias':>7s}")
    for r in rows:
        n, w = r["normalised"], r["raw"]
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        print(f"{r['predictor']:32s} {minutes:>5s} {n['within_10pct']:9.2f} {n['kendall_tau']:5.2f} "
              f"{w['within_10pct']:9.2f} {w['kendall_tau']:6.2f} {n['bias_pct']:+6.1f}%")


if __name__ == "__main__":
    main()
