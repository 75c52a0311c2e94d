"""`nas arch info`: validate an arch YAML (or zoo:NAME) and print its params and MACs block by block."""
from __future__ import annotations

import argparse
import json

from nas.commands.common import arch_ref


def cmd_arch_info(args: argparse.Namespace) -> None:
    from nas.arch.cost import arch_cost

    arch = arch_ref(args.arch)
    cost = arch_cost(arch, args.resolution)
    res = args.resolution or arch.resolution
    if args.json:
        print(json.dumps({"name": arch.name, "resolution": res, "params": cost.params, "macs": cost.macs,
                          "features": list(arch.features), "feature_channels": arch.feature_channels(),
                          "blocks": [{"name": b.name, "params": b.params, "macs": b.macs, "out_shape": list(b.out_shape)}
                                     for b in cost.blocks]}, indent=2))
        return
    ops = {"stem": arch.stem, **{f"{s}.{i}": b for s, i, b, _ in arch.blocks()}}
    print(f"{arch.name}: backbone at {res}x{res}, features {', '.join(arch.features)} "
          f"(channels {arch.feature_channels()})")
    print(f"{'block':8s} {'op':9s} {'out shape':>14s} {'params':>10s} {'MACs':>11s}")
    for b in cost.blocks:
        shape = "x".join(map(str, b.out_shape))
        print(f"{b.name:8s} {ops[b.name].op:9s} {shape:>14s} {b.params:10,d} {b.macs / 1e6:10.2f}M")
    print(f"{'total':8s} {'':9s} {'':>14s} {cost.params:10,d} {cost.macs / 1e6:10.2f}M")


def register(sub: argparse._SubParsersAction) -> None:
    arch = sub.add_parser("arch", help="architecture configs").add_subparsers(dest="arch_command", metavar="ACTION",
                                                                               required=True)
    a = arch.add_parser("info", help="validate an arch YAML and print params and MACs per block")
    a.add_argument("arch", help="arch YAML path, or zoo:NAME")
    a.add_argument("--resolution", type=int, help="input resolution (default: the arch's own)")
    a.add_argument("--json", action="store_true", help="print a JSON object")
    a.set_defaults(func=cmd_arch_info)
