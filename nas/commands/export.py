"""`nas export RUN --pick best|knee|trial:N`: a searched architecture as arch YAML with its provenance and the
latency measured here now (+ the backbone as ONNX)."""
from __future__ import annotations

import argparse
import json

from nas.commands.common import add_run_args
from nas.errors import ConfigError


def cmd_export(args: argparse.Namespace) -> None:
    from nas.report.export import export_trial
    from nas.report.runs import open_run

    if args.int8 and not args.format:
        raise ConfigError("command line", "--int8", "goes with --format FORMATS (e.g. --format onnx,openvino --int8)")
    r = open_run(args.run, args.storage, args.study)
    e = export_trial(r, args.pick, args.out, table=args.table, measure=not args.no_measure, onnx=args.onnx)
    deployed = _deploy(args, e) if args.format else None
    if args.json:
        print(json.dumps({**e.to_dict(), **({"exports": deployed} if deployed is not None else {})}, indent=2))
        return
    measured = f", measured {e.measured_ms:.3f} ms here" if e.measured_ms is not None else ""
    if e.measured_normalised_ms is not None:
        measured += f" ({e.measured_normalised_ms:.3f} ms at the table's reference speed)"
    print(f"trial {e.trial} ({e.pick}): predicted {e.predicted_ms:.3f} ms{measured}")
    print(f"wrote {e.path}")
    if e.onnx is not None:
        print(f"wrote {e.onnx} (ONNX Runtime matches torch, max |diff| {e.onnx_max_diff:.2g})")
    if deployed is not None:
        from nas.report.deploy import summary_lines

        for line in summary_lines(deployed):
            print(line)
        if args.data and not args.weights:
            print("(untrained weights: no mAP; give --weights RUN/weights/best.pt of `nas train` for the val mAP and "
                  "the int8 drop)")
    neck = f" --neck {e.head.neck}" if e.head is not None else ""
    print(f"train it: nas train {e.path}{neck}  (DigitsDet by default; --data DATA.yaml for yours)")


def _deploy(args: argparse.Namespace, e) -> list[dict]:
    """--format: the trial's detector (trained --weights, else seeded untrained weights) in each format."""
    import torch

    from nas.arch.detector import Detector
    from nas.arch.headconfig import HeadConfig
    from nas.detect.checkpoint import load_detector
    from nas.report.deploy import deploy, parse_formats

    formats = parse_formats(args.format)
    if args.weights:
        model = load_detector(args.weights)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Detector(e.arch, e.head or HeadConfig())
    out = e.path.with_name(e.path.stem)
    deployed = deploy(model, e.arch.resolution, out, formats, data=args.data, int8=args.int8,
                      evaluate=args.weights is not None)
    return [d.to_dict() for d in deployed]


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
    p.add_argument("--format", metavar="FORMATS",
                   help="also the whole detector as onnx, openvino and/or litert (comma-separated; the .tflite takes "
                        "NHWC images) into OUT/trial-N/, raw head outputs checked against torch (atol 1e-3)")
    p.add_argument("--int8", action="store_true", help="with --format: also int8 files, calibrated on --data images")
    p.add_argument("--data", help="data YAML: training images calibrate int8, val images check the export (and with "
                                  "--weights give the val mAP through each runtime and the int8 drop)")
    p.add_argument("--weights", help="trained detector checkpoint of this arch (`nas train` RUN/weights/best.pt) "
                                     "to export instead of seeded untrained weights")
    p.set_defaults(func=cmd_export)
