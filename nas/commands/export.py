"""`nas export RUN --pick best|knee|trial:N`: a searched architecture as arch YAML with its provenance and the
latency measured here now (+ the backbone as ONNX)."""
from __future__ import annotations

import argparse
import json

from nas.commands.common import add_run_args


def cmd_export(args: argparse.Namespace) -> None:
    from nas.report.export import export_trial
    from nas.report.runs import open_run

    r = open_run(args.run, args.storage, args.study)
    e = export_trial(r, args.pick, args.out, table=args.table, measure=not args.no_measure, onnx=args.onnx)
    if args.json:
        print(json.dumps(e.to_dict(), indent=2))
        return
    measured = f", measured {e.measured_ms:.3f} ms here" if e.measured_ms is not None else ""
    if e.measured_normalised_ms is not None:
        measured += f" ({e.measured_normalised_ms:.3f} ms at the table's reference speed)"
    print(f"trial {e.trial} ({e.pick}): predicted {e.predicted_ms:.3f} ms{measured}")
    print(f"wrote {e.path}")
    if e.onnx is not None:
        print(f"wrote {e.onnx} (ONNX Runtime matches torch, max |diff| {e.onnx_max_diff:.2g})")
    neck = f" --neck {e.head.neck}" if e.head is not None else ""
    print(f"train it: nas train {e.path}{neck}  (DigitsDet by default; --data DATA.yaml for yours)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a searched architecture as arch YAML with provenance (+ backbone ONNX)",
                       description="Export one trial of a search as an arch YAML `nas train` reads, with its study, "
                                   "trial, table, predicted latency and the latency measured on this machine now.")
    add_run_args(p, "output folder (default: RUN/export)")
    p.add_argument("--pick", default="knee", help="best | knee | trial:N (default knee)")
    p.add_argument("--onnx", action="store_true",
                   help="also the backbone as ONNX (untrained, weights seeded with 0), checked against torch with "
                        "ONNX Runtime")
    p.add_argument("--no-measure", action="store_true", help="skip measuring the latency on this machine")
    p.set_defaults(func=cmd_export)
