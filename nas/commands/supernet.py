"""`nas supernet train EXPERIMENT`: train the weight-sharing supernet of an experiment's search space (the sandwich
rule with in-place distillation); `nas supernet extract RUN ARCH.yaml`: a subnet as an ordinary detector checkpoint
with the weights it inherits."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nas.commands.common import arch_ref, json_clean


def cmd_supernet_train(args: argparse.Namespace) -> dict[str, Any]:
    from nas.detect.supernet import train_supernet
    from nas.search.experiment import load_experiment
    from nas.search.inherited import supernet_config

    exp = load_experiment(args.experiment)
    overrides = {"data": args.data, "epochs": args.epochs, "time_limit_s": args.time_limit_s, "device": args.device,
                 "workers": args.workers, "threads": args.threads, "progress": not args.quiet, "retain_heap": True}
    cfg = supernet_config(exp, **overrides)
    ev = exp.evaluator
    r = train_supernet(exp.space, cfg, n_random=args.random, calib_images=ev.calib_images)
    summary = {"run_dir": str(r.run_dir), "epochs": r.epochs, "seconds": round(r.seconds, 1),
               "largest_map50": r.map50, "largest_map50_95": r.map50_95, "best_epoch": r.best_epoch,
               "weights": str(r.last)}
    if args.json:
        print(json.dumps(json_clean(summary), indent=2))
    else:
        print(f"{r.run_dir}: supernet trained for {r.epochs} epoch{'s' if r.epochs != 1 else ''} in "
              f"{r.seconds / 60:.1f} min; largest subnet (BN recalibrated): mAP50 {r.map50:.4f}, "
              f"mAP50-95 {r.map50_95:.4f}")
        print(f"weights: {r.last}; search with it: evaluator: {{kind: supernet, run: {r.run_dir}}}")
    return summary


def cmd_supernet_extract(args: argparse.Namespace) -> dict[str, Any]:
    from nas.detect.inherit import load_supernet, save_subnet

    arch = arch_ref(args.arch)
    sn = load_supernet(args.run, args.device)
    out = Path(args.out) if args.out else Path(args.run) / "extracted" / arch.name
    r = save_subnet(sn, arch, out, args.calib_images)
    if args.json:
        print(json.dumps(json_clean(r), indent=2))
    else:
        print(f"{arch.name}: {r['params']:,} params, inherited val mAP50 {r['map50']:.4f}, mAP50-95 "
              f"{r['map50_95']:.4f} at {r['imgsz']} px")
        print(f"weights: {r['weights']} (arch: {r['arch']})")
    return r


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("supernet", help="train a weight-sharing supernet; extract subnets from it"
                                ).add_subparsers(dest="supernet_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train", help="train the supernet of an experiment's search space",
        description="Train one detector holding every subnet of the experiment's space: each step the largest "
                    "subnet learns from the labels, the smallest and --random random ones from the largest's head "
                    "outputs. Image size, batch, neck, data and epochs come from the experiment's evaluator "
                    "section; the run folder is evaluator.run (default RUN/supernet). Running it again resumes an "
                    "unfinished run with its own settings. One process (no torchrun).")
    t.add_argument("experiment", help="experiment YAML")
    t.add_argument("--data", help="data YAML (default: the evaluator's data, or DigitsDet of its sizes)")
    t.add_argument("--epochs", type=int, help="epochs (default: evaluator.epochs)")
    t.add_argument("--time-limit", type=float, dest="time_limit_s", metavar="SECONDS",
                   help="wall-clock budget; the epochs are re-planned after each one, as nas train --time-limit")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: the experiment's)")
    t.add_argument("--random", type=int, default=2, help="random subnets per step besides the largest and the "
                                                         "smallest (default 2)")
    t.add_argument("--workers", type=int, help="data loader processes (default 2)")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    t.set_defaults(func=cmd_supernet_train)

    e = sub.add_parser(
        "extract", help="a subnet as a nas train checkpoint, with inherited weights",
        description="Copy the weights ARCH uses out of a trained supernet into an ordinary detector, recalibrate its "
                    "BatchNorm statistics on training images, score it on the validation images and write "
                    "DIR/arch.yaml and DIR/weights/best.pt (loadable like a nas train checkpoint).")
    e.add_argument("run", help="the supernet's run folder (nas supernet train's output)")
    e.add_argument("arch", metavar="ARCH", help="arch YAML of a subnet of the supernet's space")
    e.add_argument("--out", help="output folder (default RUN/extracted/ARCH_NAME)")
    e.add_argument("--calib-images", type=int, default=256, dest="calib_images",
                   help="training images for the BatchNorm recalibration (default 256; 0 keeps the supernet's)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    e.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    e.set_defaults(func=cmd_supernet_extract)
