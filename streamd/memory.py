"""glibc malloc thresholds for frame-sized buffers, applied once when a daemon starts.

Every decoded RGB frame is a multi-megabyte buffer (2.7 MB at 720p) allocated in a decoder thread and freed
later on the event loop. With glibc's defaults freed frames go back to the kernel (trimmed or unmapped) and the
next ones are faulted in again: hundreds of page faults and about 1 ms of system CPU per frame. Fixed thresholds
keep freed frames in the heap for reuse (the same as MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456). Nothing is changed where the C library is not glibc, when either MALLOC_*
variable is set (it wins), or with STREAMD_MALLOPT=0.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MMAP_THRESHOLD_B = 32 << 20  # glibc's largest: blocks below this come from the heap, 4K frames included
TRIM_THRESHOLD_B = 256 << 20  # free memory kept at the top of a heap before it is returned to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's mmap and trim thresholds for this process. Returns True when they were set."""
    if environ.get("STREAMD_MALLOPT", "1") == "0" or any(v in environ for v in ENV_VARS):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_B)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_B))
    except (ValueError, OSError, AttributeError):  # no confstr name, no libc handle or no mallopt: not glibc
        return False


def trim_heap() -> None:
    """Give the heap's free memory back to the kernel now (glibc's malloc_trim; nothing where it is missing):
    `streamd bench` does before each step, so that the memory a step measures is its own."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
