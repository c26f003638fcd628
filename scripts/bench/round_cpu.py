"""Where a steady round's CPU goes: each process of a fedmq run of the peer workload.

    python scripts/bench/round_cpu.py [--rounds 200] [--clients 10]

Runs fedmq as ``peer.py`` does (secured mosquitto, one agent process per client, the
aggregator process, devices' evaluation off) for ``--rounds`` rounds, reads every
process's and thread's CPU time (user + system, from ``/proc``) when round 20 is
committed and again 10 rounds before the end, and prints the CPU each spent per round
in between: the agents' main threads and their other threads (paho's network loop),
the aggregator's loop and its other threads (network, fsync pool), mosquitto; and the
wall time per round over the same rounds. /proc counts CPU in clock ticks (10 ms here):
over the default's 170 rounds that is 0.06 ms a round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import peer  # noqa: E402
import workload  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
FIRST = 20  # rounds before the first reading: start-up and first rounds left out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, stack = _children(), [], list(_children().get(root, []))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += kids.get(pid, [])
    return out


def _role(pid: int) -> str:
    """broker, aggregator (it holds its run directory's lock) or python (an agent, or the
    zygote they are forked from)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto":
            return "broker"
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            if os.readlink(fd).endswith("/run/.lock"):
                return "aggregator"
    except OSError:
        return "gone"
    return "python"


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds of the process's main thread and of all its other threads."""
    out = {"main": 0.0, "other threads": 0.0}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICKS
            out["main" if int(task.name) == pid else "other threads"] += cpu
    except OSError:
        pass
    return out


def _reading() -> dict[int, tuple[str, dict[str, float]]]:
    kids = _children()
    out = {}
    for pid in _descendants(os.getpid()):
        role = _role(pid)
        if role == "python" and kids.get(pid):  # the zygote: it forks the others, then waits
            role = "zygote"
        out[pid] = (role, _threads(pid))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < FIRST + 20:
        raise SystemExit(f"--rounds must be at least {FIRST + 20}")
    work = Path(tempfile.mkdtemp(prefix="fedmq-round-cpu-"))
    data = work / "data"
    workload.prepare(data, args.clients)
    last = args.rounds - 10
    readings: dict[int, tuple[float, dict]] = {}

    def watch() -> None:
        metrics = work / "fedmq" / "run" / "metrics.jsonl"
        while len(readings) < 2:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            for at in (FIRST, last):
                if done >= at and at not in readings:
                    readings[at] = (time.monotonic(), _reading())
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    (work / "fedmq").mkdir()
    run = peer.run_fedmq(work / "fedmq", data, args.rounds, args.clients)
    if len(readings) < 2:
        raise SystemExit("the run ended before both readings were taken")
    (t0, before), (t1, after) = readings[FIRST], readings[last]
    rounds = last - FIRST
    rows: dict[tuple[str, str], list[float]] = {}
    for pid, (role, threads) in after.items():
        if pid not in before or role in ("gone", "zygote"):
            continue
        for name, cpu in threads.items():
            spent = (cpu - before[pid][1][name]) / rounds * 1000
            rows.setdefault((role, name), []).append(spent)
    print(
        f"{args.clients} clients, rounds {FIRST + 1}..{last}: "
        f"{(t1 - t0) / rounds * 1000:.1f} ms a round (wall); final accuracy {run.accuracy:.3f}"
    )
    print("| process | thread | processes | CPU a round, each (mean) | all of them |")
    print("|---|---|---|---|---|")
    total = 0.0
    for (role, name), spent in sorted(rows.items()):
        label = "agents" if role == "python" else role
        print(
            f"| {label} | {name} | {len(spent)} | {sum(spent) / len(spent):.2f} ms "
            f"| {sum(spent):.2f} ms |"
        )
        total += sum(spent)
    print(f"CPU a round, all processes: {total:.1f} ms")


if __name__ == "__main__":
    main()
