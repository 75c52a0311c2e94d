"""What the command modules share: the one arch reference resolver, JSON clean-up, and the output set-up that turns
the library's log records into one-line notices on stderr."""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

from nas.arch.spec import ArchSpec, load_arch
from nas.arch.zoo import ZOO, get_arch


def arch_ref(ref: str) -> ArchSpec:
    """An ArchSpec from 'zoo:NAME', a bare zoo name (unless a file of that name exists), or an arch YAML path."""
    if ref.startswith("zoo:") or (ref in ZOO and not Path(ref).exists()):
        return get_arch(ref.removeprefix("zoo:"))
    return load_arch(ref)


def json_clean(v: Any) -> Any:
    """NaN and infinities -> None, so the JSON is standard."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_clean(x) for x in v]
    return v


class OneLine(logging.Formatter):
    """'nas: warning: ...' for warnings and errors, the bare message for information."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"nas: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"nas: warning: {msg}"
        return msg


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (tests and the quickstart swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(OneLine())
        self.addFilter(_OnceEach())

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _OnceEach(logging.Filter):
    """A warning repeated word for word (a table checked by every worker, a data set loaded by every trial) is shown
    once, as Python's warnings were."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def configure_output(level: int = logging.INFO) -> Callable[[], None]:
    """Send the library's records ('nas' loggers) to stderr as one-line notices; returns the undo."""
    logger = logging.getLogger("nas")
    handler = _StderrHandler()
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before)

    return restore


def set_quiet(quiet: bool) -> None:
    """--quiet: only the library's warnings and errors are shown (configure_output's undo restores the level)."""
    if quiet:
        logging.getLogger("nas").setLevel(logging.WARNING)


def quiet_optuna() -> Callable[[], None]:
    """Optuna's per-trial INFO lines off (the search shows its own progress); returns the undo."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return lambda: optuna.logging.set_verbosity(before)


def add_run_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("run", nargs="?", help="run folder written by `nas search` (runs/NAME)")
    p.add_argument("--storage", help="Optuna storage URL (instead of, or overriding, the run folder's)")
    p.add_argument("--study", help="study name (default: the run's)")
    p.add_argument("--table", help="latency table (default: the one in the run's config.yaml)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
