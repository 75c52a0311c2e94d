"""The process and the machine: usable CPUs, the user cache folder, a cross-process file lock, and malloc tuning
(heap retention) for callers that ask for it."""
from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
