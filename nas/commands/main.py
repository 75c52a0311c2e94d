"""The `nas` command: one sub-command module per verb; every user error is one line and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from nas.commands import arch, data, export, lut, pareto, quickstart, search, space, train, zoo
from nas.commands.common import configure_output
from nas.errors import NasError

VERBS = (zoo, arch, space, lut, search, pareto, export, train, data, quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nas", description="Hardware-aware architecture search for mobile YOLO detectors.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb in VERBS:
        verb.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = configure_output()
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
    finally:
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
