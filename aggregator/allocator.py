"""Keep the aggregator's heap from growing with the rounds it has seen.

glibc's malloc serves a large block from ``mmap`` and gives it back on ``free``, but
its threshold for "large" slides: after the first large block is freed, blocks up to
that size come from the heap instead. An aggregator allocates and frees a few blocks
of an update's size for every update (paho's receive buffers, the payload, the
decoded tensors), from two threads; served from the heap they fragment it, and the
process keeps what it once held. Measured with ``scripts/bench_round.py --devices
1000 --hidden 960`` (1,000 updates of 3.8 MB): the peak during the round grew
403 MB over the waiting process with the sliding threshold, 28 MB with a fixed one
at 1 MiB. At 128 KiB it is 18 MB (4.8 models, of which 3.8 anonymous): blocks
between the two (the close's 512 KiB chunks of float64, buffers of TLS and paho)
no longer pin freed heap under them (26 MB, 5.8 anonymous, at 1 MiB in the same
week's run).

``fix_mmap_threshold`` pins the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
stops the sliding). Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedmq.aggregator")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 128 * 1024  # blocks of at least this many bytes: mmap'd, returned on free


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Pin glibc's mmap threshold; True if it was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator, its rules
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the heap may grow with the rounds")
        return False
    return True
