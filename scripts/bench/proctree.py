"""CPU seconds and resident memory of a process tree (Linux).

psutil is not among fedmq's dependencies. CPU time is each live process's POSIX CPU clock
(``clock_getcpuclockid``: every thread's, in nanoseconds), where ``/proc/<pid>/stat``
counts in clock ticks of 10 ms, more than a small round's CPU: a smoke run of 3 clients
read 0 between two rounds. Resident memory is ``/proc/<pid>/statm``. A process that
exits takes its CPU time with it (its parent's ``cutime`` gets it only once reaped), so
compare samples taken while the same processes live: the benchmark's steady rounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (not ``root`` itself), found by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cpu_clock(pid: int) -> int:
    """The clock id ``clock_getcpuclockid(pid)`` returns: the process's CPU time, summed
    over its threads, live and exited (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return ((~pid) << 3) | 2


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the live processes among ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(_cpu_clock(pid))
        except OSError:  # gone, or a kernel without process CPU clocks: /proc's ticks
            fields = _stat_fields(pid)
            if fields is not None:
                total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of the resident set sizes of the live processes among ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total
