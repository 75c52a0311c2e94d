"""The process and the machine: usable CPUs, the user cache folder, a cross-process file lock, files replaced
atomically (and a full disk told in one line), and malloc tuning (heap retention) for callers that ask for it."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO

from nas.errors import NoSpaceError

# A write refused for want of space, as the errno says it (EDQUOT: a disk quota; EFBIG: over the file size limit)
NO_SPACE = {errno.ENOSPC: ("disk full", "ENOSPC"), errno.EFBIG: ("file too large / disk full", "EFBIG"),
            errno.EDQUOT: ("disk quota exceeded", "EDQUOT")}


def retain_heap() -> bool:
    """Keep freed memory in the process (glibc mallopt); False where that is not possible (musl, macOS, Windows).

    With glibc's defaults every tensor over the dynamic mmap threshold is a fresh mmap, page-faulted in on first
    touch and unmapped on free, so each forward/backward pays thousands of page faults. This is process-wide and
    permanent (forked DataLoader workers inherit it); the price is that the process keeps its peak heap.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
        # Never trim the heap top, grow it in big steps, and serve tensors up to 32 MB (glibc's maximum
        # threshold on 64-bit) from the heap instead of a fresh mmap per call.
        return bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
            and libc.mallopt(m_top_pad, 64 << 20)
            and libc.mallopt(m_mmap_threshold, 32 << 20)
        )
    except (OSError, AttributeError):
        return False


def usable_cpus() -> int:
    """CPUs this process may run on (taskset / cgroup affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def exclusive_lock(lock_path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on lock_path; the OS releases it if the process dies, so a crash leaves no stale lock.
    With wait=False, BlockingIOError at once when another process (or another open of the file) holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; local workers there would race on the first generation
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_dir() -> Path:
    """$NAS_CACHE, else $XDG_CACHE_HOME/nas, else ~/.cache/nas."""
    if os.environ.get("NAS_CACHE"):
        return Path(os.environ["NAS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "nas"


def no_space(e: BaseException | None) -> str | None:
    """Why `e`, or an exception it wraps or was raised while handling, is a write refused for want of space, in a few
    words; None for any other error. torch.save keeps the OSError only as its RuntimeError's context (when it writes to
    a file object), and SQLite has no errno: a full disk is SQLITE_FULL, a refused write (over the file size limit)
    an I/O error, SQLITE_IOERR_WRITE."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            words, code = NO_SPACE[e.errno]
            return f"{words} ({code}{_size_limit()})"
        name = getattr(e, "sqlite_errorname", None)
        if name == "SQLITE_FULL":
            return f"database or disk is full ({name}{_size_limit()})"
        if name == "SQLITE_IOERR_WRITE":
            return (f"disk I/O error ({name}: a write refused, the disk full or a file over its size "
                    f"limit{_size_limit()})")
        # SQLAlchemy keeps the driver's error as .orig; an error raised `from None` still has its context
        e = getattr(e, "orig", None) or e.__cause__ or e.__context__
    return None


def _size_limit() -> str:
    """The file size limit of this process (ulimit -f), when it has one: a refused write may be that, not the disk."""
    try:
        import resource
    except ImportError:  # Windows
        return ""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "" if soft == resource.RLIM_INFINITY else f"; ulimit -f: files of at most {soft} bytes"


def write_atomically(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None], what: str, fix: str) -> Path:
    """Write `data` (text as UTF-8, bytes, or a function writing to a binary file) to PATH.tmp, then rename it over
    `path`: a crash or a full disk never leaves half a file, and the previous one stays whole. A write refused for want
    of space removes the temp file (it would only take space) and raises NoSpaceError: `path`, the cause, while `what`,
    and `fix` (what to run once there is space again)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = no_space(e)
        if reason is None:
            raise
        raise NoSpaceError(f"{p}: {reason} while {what}; {fix}") from e
    return p


def import_without(name: str, blocked: str) -> ModuleType:
    """import `name` with the module `blocked` unimportable during that first import (a telemetry module that writes
    into the user's home as it is imported); afterwards `blocked` imports as usual. ImportError of `name` propagates."""
    block = name not in sys.modules and blocked not in sys.modules
    if block:
        sys.modules[blocked] = None  # type: ignore[assignment]  # makes its import raise ImportError
    try:
        __import__(name)  # the import statement's path (builtins.__import__), as a test faking absence expects
        return sys.modules[name]
    finally:
        if block:
            del sys.modules[blocked]
