"""The `nas` command: parses arguments and calls the library; every user error is one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nas.errors import NasError


def _arch_source(ref: str):
    """An ArchSpec from 'zoo:NAME', a zoo name, or an arch YAML path."""
    from nas.arch.spec import load_arch
    from nas.arch.zoo import ZOO, get_arch

    if ref.startswith("zoo:") or ref in ZOO:
        return get_arch(ref.removeprefix("zoo:"))
    return load_arch(ref)


# ---------------------------------------------------------------- zoo

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


def cmd_arch_info(args: argparse.Namespace) -> None:
    from nas.arch.cost import arch_cost

    arch = _arch_source(args.arch)
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


# ---------------------------------------------------------------- space

def cmd_space_info(args: argparse.Namespace) -> None:
    from nas.space import load_space

    space = load_space(args.file)
    info = space.describe()
    if args.json:
        print(json.dumps({"name": info["name"], "log10_size": info["log10_size"], "num_ops": info["num_ops"],
                          "parameters": info["parameters"]}, indent=2))
        return
    print(f"search space {info['name']!r} ({args.file})")
    print(f"  size: 10^{info['log10_size']:.2f} architectures")
    print(f"  ops a latency table must cover: {info['num_ops']}")
    print(f"  parameters drawn per trial: {len(info['parameters'])}")
    for k, v in info["parameters"].items():
        print(f"    {k:18s} {v}")


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nas", description="Hardware-aware architecture search for mobile YOLO detectors.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    zoo = sub.add_parser("zoo", help="reference architectures (MobileNet V1-V4)").add_subparsers(
        dest="zoo_command", metavar="ACTION", required=True)
    z = zoo.add_parser("list", help="name, params and MACs of every zoo model against the published figures")
    z.add_argument("--json", action="store_true", help="print a JSON list of objects")
    z.set_defaults(func=cmd_zoo_list)
    z = zoo.add_parser("show", help="print a zoo model's arch YAML")
    z.add_argument("name", help="zoo model name (see `nas zoo list`)")
    z.set_defaults(func=cmd_zoo_show)

    arch = sub.add_parser("arch", help="architecture configs").add_subparsers(dest="arch_command", metavar="ACTION",
                                                                               required=True)
    a = arch.add_parser("info", help="validate an arch YAML and print params and MACs per block")
    a.add_argument("arch", help="arch YAML path, or zoo:NAME")
    a.add_argument("--resolution", type=int, help="input resolution (default: the arch's own)")
    a.add_argument("--json", action="store_true", help="print a JSON object")
    a.set_defaults(func=cmd_arch_info)

    space = sub.add_parser("space", help="search spaces").add_subparsers(dest="space_command", metavar="ACTION",
                                                                         required=True)
    s = space.add_parser("info", help="size of a search space and the ops a latency table must cover")
    s.add_argument("file", type=Path, help="search space YAML (e.g. search_spaces/uib_yolo.yaml)")
    s.add_argument("--json", action="store_true", help="print a JSON object with log10_size and num_ops")
    s.set_defaults(func=cmd_space_info)

    from nas.detect import commands as detect_commands
    from nas.latency import commands as lut_commands
    from nas.search import commands as search_commands
    from nas import quickstart, report_commands

    lut_commands.register(sub)
    search_commands.register(sub)
    report_commands.register(sub)
    detect_commands.register(sub)
    quickstart.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NasError as e:
        print(f"nas: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nas ... | head`: the reader left, that is fine
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
