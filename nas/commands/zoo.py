"""`nas zoo list | show`: the reference architectures (MobileNet V1-V4, YOLOv8-n CSP) against published figures."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_zoo_list(args: argparse.Namespace) -> None:
    from nas.arch.cost import arch_cost
    from nas.arch.zoo import ZOO, get_arch, get_reference

    rows = []
    for name in ZOO:
        ref = get_reference(name)
        if ref is None:  # detection-only baseline: backbone figures, nothing published to compare with
            arch = get_arch(name)
            cost = arch_cost(arch)
            rows.append({"name": name, "params": cost.params, "macs": cost.macs, "resolution": arch.resolution,
                         "ref_params": None, "ref_macs": None, "params_diff_pct": None, "macs_diff_pct": None,
                         "ref_params_source": None, "ref_macs_source": None})
            continue
        cost = arch_cost(get_arch(name), ref.resolution, classifier=True)
        rows.append({"name": name, "params": cost.params, "macs": cost.macs, "resolution": ref.resolution,
                     "ref_params": ref.params, "ref_macs": int(ref.macs),
                     "params_diff_pct": round(100 * (cost.params / ref.params - 1), 3),
                     "macs_diff_pct": round(100 * (cost.macs / ref.macs - 1), 3),
                     "ref_params_source": ref.params_source, "ref_macs_source": ref.macs_source})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':28s} {'res':>4s} {'params':>12s} {'ref params':>12s} {'diff':>7s} {'MACs':>9s} {'ref MACs':>9s} {'diff':>7s}")
    for r in rows:
        if r["ref_params"] is None:
            print(f"{r['name']:28s} {r['resolution']:4d} {r['params']:12,d} {'-':>12s} {'':7s} {r['macs'] / 1e6:8.1f}M "
                  f"{'-':>9s}  (backbone only)")
            continue
        print(f"{r['name']:28s} {r['resolution']:4d} {r['params']:12,d} {r['ref_params']:12,d} {r['params_diff_pct']:+6.2f}% "
              f"{r['macs'] / 1e6:8.1f}M {r['ref_macs'] / 1e6:8.1f}M {r['macs_diff_pct']:+6.2f}%")
    print("params: 1000-class classifier head; MACs at the published resolution. Sources: docs/ZOO.md")


def cmd_zoo_show(args: argparse.Namespace) -> None:
    from nas.arch.spec import dumps_arch
    from nas.arch.zoo import get_arch

    sys.stdout.write(dumps_arch(get_arch(args.name)))


def register(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="reference architectures (MobileNet V1-V4)").add_subparsers(
        dest="zoo_command", metavar="ACTION", required=True)
    z = zoo.add_parser("list", help="name, params and MACs of every zoo model against the published figures")
    z.add_argument("--json", action="store_true", help="print a JSON list of objects")
    z.set_defaults(func=cmd_zoo_list)
    z = zoo.add_parser("show", help="print a zoo model's arch YAML")
    z.add_argument("name", help="zoo model name (see `nas zoo list`)")
    z.set_defaults(func=cmd_zoo_show)
