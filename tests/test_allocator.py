"""The aggregator pins glibc's mmap threshold so that its heap does not keep what a busy
round held (``aggregator/allocator.py``). At scale the bench shows it (1,000 updates of
3.8 MB: +403 MB sliding, +28 MB pinned); here, a small copy of the pattern: a network
thread that builds each payload in a growing buffer and hands it to a loop that copies it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aggregator.allocator import fix_mmap_threshold

PATTERN = """
import os, queue, sys, threading
from aggregator.allocator import fix_mmap_threshold

def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "pinned":
    assert fix_mmap_threshold()
handed = queue.Queue(maxsize=2)

def network():
    for _ in range(300):
        packet = bytearray()
        for _ in range(64):
            packet += b"p" * (64 << 10)
        payload = bytes(packet[2:])
        del packet
        handed.put(payload)
    handed.put(None)

threading.Thread(target=network).start()
kept, peak = [], 0.0
while (item := handed.get()) is not None:
    decoded = bytearray(item)
    kept.append(b"k" * 2000)  # a small allocation that outlives the buffers around it
    peak = max(peak, rss())
    del decoded, item
print(peak, rss())
"""


def _rss(mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True
    )
    peak, end = out.stdout.split()
    return float(peak), float(end)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_pinned_mmap_threshold_gives_freed_payload_buffers_back():
    assert fix_mmap_threshold()  # glibc here: the call takes
    sliding, pinned = _rss("sliding"), _rss("pinned")
    print(f"MB (peak, after): sliding {sliding}, pinned {pinned}")
    assert pinned[0] <= sliding[0]
    assert pinned[1] < sliding[1]
