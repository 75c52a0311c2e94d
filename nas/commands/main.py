"""The `nas` command: one sub-command module per verb; every user error is one line and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
import threading

from nas.commands import arch, data, device, export, lut, pareto, quickstart, search, space, supernet, train, zoo
from nas.commands.common import configure_output
from nas.errors import NasError
from nas.system import no_space

VERBS = (zoo, arch, space, lut, search, pareto, export, train, supernet, data, device, quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nas", description="Hardware-aware architecture search for mobile YOLO detectors.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb in VERBS:
        verb.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore, hook = configure_output(), threading.excepthook
    # TensorBoard's writer thread dies with a traceback on a full disk; the command reports it in one line
    threading.excepthook = lambda a: None if no_space(a.exc_value) else hook(a)
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
    except Exception as e:  # a full disk where the library did not say which file: still one line, no traceback
        reason = no_space(e)
        if reason is None:
            raise
        print(f"nas: error: {_filename(e) or 'a write'}: {reason}; free space and run the same command again",
              file=sys.stderr)
        return 2
    finally:
        threading.excepthook = hook
        restore()
    return 0


def _filename(e: BaseException | None) -> str | None:
    """The file an OSError in `e`'s chain names (a failed open does; a failed write or close does not)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # a chain can loop back on itself
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
