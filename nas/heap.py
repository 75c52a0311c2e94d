"""Process-wide malloc tuning shared by latency measurement and training: keep freed memory in the process."""
from __future__ import annotations

import ctypes
import platform


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
