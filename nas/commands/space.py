"""`nas space info`: the size of a search space and the ops a latency table must cover."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def register(sub: argparse._SubParsersAction) -> None:
    space = sub.add_parser("space", help="search spaces").add_subparsers(dest="space_command", metavar="ACTION",
                                                                         required=True)
    s = space.add_parser("info", help="size of a search space and the ops a latency table must cover")
    s.add_argument("file", type=Path, help="search space YAML (e.g. search_spaces/uib_yolo.yaml)")
    s.add_argument("--json", action="store_true", help="print a JSON object with log10_size and num_ops")
    s.set_defaults(func=cmd_space_info)
