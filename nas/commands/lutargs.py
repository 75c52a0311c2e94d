"""What the `nas lut` actions read from the command line: the measurement protocol, the ops to cover (spaces,
archs, the detector's neck+head) and the head config."""
from __future__ import annotations

import argparse
from pathlib import Path

from nas.commands.int8 import calibration_images, int8_flags
from nas.errors import ConfigError
from nas.latency.protocol import BACKENDS


def protocol_from(args: argparse.Namespace):
    from nas.latency.protocol import Protocol

    return Protocol(backend=args.backend, threads=args.threads, batch=args.batch, repeats=args.repeats,
                    min_time_s=args.min_time, warmup_runs=args.warmup, warmup_s=args.warmup_time, pin_cpu=args.pin_cpu,
                    reference=args.backend != "openvino-cpu" if args.reference is None else args.reference,
                    statistic=args.statistic, dtype=args.dtype,
                    calibration=calibration_images(args.data) if args.dtype == "int8" else None)


def head_from(args: argparse.Namespace):
    """The detector head config of --neck/--width/--depth/--classes (None without --detector)."""
    from nas.arch.headconfig import HeadConfig

    if not getattr(args, "detector", False):
        return None
    try:
        return HeadConfig(args.neck, args.width, args.depth, args.classes)
    except ConfigError as e:
        flag = {"num_classes": "--classes"}.get(e.field, f"--{e.field}")
        raise ConfigError("command line", flag, e.message) from None


def ops_from(args: argparse.Namespace) -> list:
    """Ops of --space and/or --arch files; with --detector also their neck+head ops."""
    from nas.commands.common import arch_ref
    from nas.latency.coverage import arch_ops, neckhead_op, space_neckhead_ops
    from nas.space import load_space

    head = head_from(args)
    ops: list = []
    for s in args.space or []:
        space = load_space(s)
        ops.extend(space.ops())
        if head is not None:
            ops.extend(space_neckhead_ops(space, head))
    for a in args.arch or []:
        for arch in [arch_ref(a)] if not args.resolution else [arch_ref(a).with_resolution(r)
                                                                   for r in args.resolution]:
            ops.extend((b, sh) for _, b, sh in arch_ops(arch))
            if head is not None:
                ops.append(neckhead_op(arch, head))
    if not ops:
        raise ConfigError("command line", "--space/--arch", "name at least one search space or arch to cover")
    return ops


def measuring_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement protocol")
    g.add_argument("--backend", default="torch-cpu", help=f"{' | '.join(BACKENDS)} (default torch-cpu; openvino-cpu "
                                                          f"needs pip install 'hwnas-yolo[openvino]')")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    g.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    g.add_argument("--repeats", type=int, default=20, help="minimum timed runs per op (default 20)")
    g.add_argument("--min-time", type=float, default=0.04, help="minimum timed seconds per op (default 0.04)")
    g.add_argument("--warmup", type=int, default=3, help="minimum warm-up runs (default 3)")
    g.add_argument("--warmup-time", type=float, default=0.01, help="minimum warm-up seconds (default 0.01)")
    g.add_argument("--pin-cpu", type=int, default=None, help="pin to this core (and the next threads-1)")
    g.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="time the reference workload alongside each op, to normalise machine-speed drift (default: on, "
                        "off for openvino-cpu, whose tables track end-to-end runs only without it)")
    g.add_argument("--statistic", choices=("p10", "median"), default="p10",
                   help="what an op's latency is: the 10th percentile (default: noise only adds time) or median")
    int8_flags(g, "fp32")


def detector_flags(p: argparse.ArgumentParser, what: str) -> None:
    from nas.arch.headconfig import NECKS, HeadConfig

    d = HeadConfig()
    g = p.add_argument_group("whole detector")
    g.add_argument("--detector", action="store_true", help=what)
    g.add_argument("--neck", choices=NECKS, default=d.neck, help=f"neck type (default {d.neck})")
    g.add_argument("--width", type=float, default=d.width, help=f"neck width multiplier (default {d.width})")
    g.add_argument("--depth", type=float, default=d.depth, help=f"neck depth multiplier (default {d.depth})")
    g.add_argument("--classes", type=int, default=d.num_classes,
                   help=f"classes the head predicts (default {d.num_classes}, DigitsDet)")


def covering_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", action="append", type=Path, help="search space YAML whose ops to cover (repeatable)")
    p.add_argument("--arch", action="append", help="arch YAML or zoo:NAME whose ops to cover (repeatable)")
    p.add_argument("--resolution", action="append", type=int,
                   help="cover each --arch at this input resolution instead of its own (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    detector_flags(p, "also the detector's neck+head op for every feature-channel combination and resolution of "
                 "each space (and for each arch): what budgets on the whole detector need")
