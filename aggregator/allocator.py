"""Keep the aggregator's heap from growing with the rounds it has seen.

glibc's malloc serves a large block from ``mmap`` and gives it back on ``free``, but
its threshold for "large" slides: after the first large block is freed, blocks up to
that size come from the heap instead. An aggregator allocates and frees a few blocks
of an update's size for every update (paho's receive buffers, the payload, the
decoded tensors), from two threads; served from the heap they fragment it, and the
process keeps what it once held. Measured with ``scripts/bench_round.py --devices
1000 --hidden 960`` (1,000 updates of 3.8 MB): the peak during the round grew
403 MB over the waiting process with the sliding threshold, 28 MB with a fixed one
at 1 MiB. A threshold of 128 KiB held the close's 512 KiB float64 temporaries out of
the heap too (26 MB over waiting → 18 MB), but mapping every block over 128 KiB afresh
cost a fifth of the ingest rate of 1 MB updates (``scripts/bench/ingest.py --sizes 1``:
0.64-0.71 of the broker's ceiling against 0.83-0.88); the close now reuses one scratch
buffer instead (``aggregator/fedavg.py``: 20 MB at 1 MiB).

``fix_mmap_threshold`` pins the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
stops the sliding). Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedmq.aggregator")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1024 * 1024  # blocks of at least this many bytes: mmap'd, returned on free


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
