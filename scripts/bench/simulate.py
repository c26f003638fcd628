"""Benchmark: a whole federation of N simulated devices on this machine, in one command.

    python scripts/bench/simulate.py --devices 10000 --rounds 2 [--processes 4] [--rate 300]

Starts, on free loopback ports: a secured mosquitto (its broker home provisioned
in bulk with N device accounts), a real `fedmq aggregator start` process
(--min-devices N, no deadline) and `fedmq simulate`'s worker processes (every
device a TLS MQTT client with its own account, persistent session, last will and
signing key). It prints:

- provisioning time (N accounts: password, Ed25519 key, identity cert, credentials);
- mosquitto's open-files limit;
- connections per second over the ramp (first dial to the last device's CONNACK);
- each round's time (the aggregator's, announce to checkpoint);
- the broker's and the aggregator's CPU seconds and peak RSS, the simulator's too;
- the load average before and after (the machine is shared);
- whether every round's model equals the exact FedAvg of the devices' synthetic
  updates from the previous round's model (max abs difference, must be <= 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aggregator.checkpoint import RunDir  # noqa: E402
from broker.home import BrokerHome  # noqa: E402
from fedmq import simulate as sim  # noqa: E402
from fedmq.cli_simulate import summary  # noqa: E402
from fedmq.local import AGGREGATOR, LocalFederation  # noqa: E402
from fedmq.secagg_fleet import expected_fedavg  # noqa: E402
from fedmq.synthetic import blobs_task  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (/proc/<pid>/stat), 0.0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Timeline(threading.Thread):
    """CPU seconds of named groups of processes, sampled every 0.2 s with the wall time,
    to say who used the CPU during each round."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.groups: dict[str, list[int]] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.last: dict[int, float] = {}  # a process's last CPU reading (it survives exit)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            reading = {}
            for name, pids in list(self.groups.items()):
                total = 0.0
                for pid in pids:
                    cpu = cpu_seconds(pid)
                    if cpu:
                        self.last[pid] = cpu
                    total += self.last.get(pid, 0.0)
                reading[name] = total
            self.samples.append((time.time(), reading))
            time.sleep(0.2)

    def at(self, when: float) -> dict[str, float]:
        """The reading nearest before ``when``."""
        best = self.samples[0][1]
        for t, reading in self.samples:
            if t > when:
                break
            best = reading
        return best

    def between(self, start: float, end: float) -> dict[str, float]:
        a, b = self.at(start), self.at(end)
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}


def wait_with_usage(proc, timeout: float) -> tuple[int, float, float]:
    """Reap the aggregator ourselves: (exit code, CPU seconds, peak RSS MB) from wait4."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        time.sleep(0.1)
    raise TimeoutError(f"the aggregator did not finish within {timeout:g} s")


def spawn_profiled(fed: LocalFederation, out: Path):
    """``fed.spawn`` under cProfile (the aggregator's rounds run on its main thread)."""

    def spawn(*args: str, log: Path | None = None):
        with open(log or os.devnull, "ab") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "fedmq.cli", *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        fed.procs.append(proc)
        return proc

    return spawn


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=300, help="connections/s (0: no pacing)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--subscribe-state",
        action="store_true",
        help="devices also subscribe to the aggregator's state (what agents did before)",
    )
    parser.add_argument(
        "--run-dir-tmpfs",
        action="store_true",
        help="the aggregator's run directory in /dev/shm: its fsyncs cost nothing",
    )
    parser.add_argument(
        "--profile-aggregator",
        type=Path,
        help="run the aggregator under cProfile, its stats written to this file",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedmq-simbench-"))
    print(f"work directory {work}; load average {loadavg()}", flush=True)
    home = BrokerHome.create(work / "home", "sim")
    started = time.perf_counter()
    home.add_devices([f"sim{i:05d}" for i in range(args.devices)])
    provision = time.perf_counter() - started
    print(f"provisioning: {args.devices:,} devices in {provision:.1f} s", flush=True)
    run_path = work / "run"
    if args.run_dir_tmpfs:
        run_path = Path(tempfile.mkdtemp(prefix="fedmq-simbench-run-", dir="/dev/shm"))
        print(f"aggregator run directory on tmpfs: {run_path}")
    fed = LocalFederation(home, "sim", [])
    ok = True
    with fed:
        timeline = Timeline()
        timeline.groups["broker"] = [fed.broker.pid]
        timeline.start()
        print(f"mosquitto pid {fed.broker.pid}: open-files limit {fed.broker.fd_limit:,}")
        cpu_broker_idle = cpu_seconds(fed.broker.pid)
        agg = (
            spawn_profiled(fed, args.profile_aggregator) if args.profile_aggregator else fed.spawn
        )(
            "aggregator",
            "start",
            "--config",
            str(fed.credentials(AGGREGATOR)),
            "--task",
            str(blobs_task(work)),
            "--rounds",
            str(args.rounds),
            "--min-devices",
            str(args.devices),
            "--deadline",
            "0",
            "--run-dir",
            str(run_path),
            log=work / "aggregator.log",
        )
        timeline.groups["aggregator"] = [agg.pid]
        report = sim.run(
            sim.fleet(home, args.devices, "sim"),
            processes=args.processes,
            rate=args.rate,
            timeout=args.timeout,
            subscribe_state=args.subscribe_state,
            on_start=lambda pids: timeline.groups.__setitem__("simulator", pids),
        )
        try:
            code, agg_cpu, agg_rss = wait_with_usage(agg, 120)
        except TimeoutError as exc:
            print(f"FAILED: {exc}; log tail:\n{(work / 'aggregator.log').read_text()[-2000:]}")
            return 1
        broker_cpu = cpu_seconds(fed.broker.pid) - cpu_broker_idle
        broker_rss = peak_rss_mb(fed.broker.pid)
        timeline.stop.set()
    for line in summary(report):
        print(line)
    rate = report.connections_per_second
    print(
        f"connections: {report.totals.get('ever_connected', 0):,} in "
        f"{report.connect_seconds or 0:.1f} s = {rate or 0:.0f}/s at ramp-up "
        f"(pacing {args.rate:g}/s, {args.processes} processes)"
    )
    if code != 0 or not report.complete:
        print(f"FAILED: aggregator exit {code}; simulator errors {report.errors[:3]}")
        print((work / "aggregator.log").read_text()[-2000:])
        return 1
    run = RunDir(run_path)
    models = report.totals.get("model_times", {})
    acks = report.totals.get("ack_times", {})
    for m in run.metrics():
        r = m["round"]
        print(f"round {r}: {m['devices']:,} updates in {m['seconds']:.2f} s (aggregator's clock)")
        if r in models and r + 1 in models:
            start, end = models[r][0], models[r + 1][0]
            cpu = timeline.between(start, end)
            print(
                f"  first device's model to the next model: {end - start:.1f} s wall; CPU s: "
                + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
                + f"; every update acked by the broker {acks[r][1] - start:.1f} s in"
            )
    indices = list(range(args.devices))
    for r in range(1, args.rounds + 1):
        expected = expected_fedavg(run.checkpoint(r - 1), indices)
        got = run.checkpoint(r)
        diff = max(float((got[k].double() - expected[k]).abs().max()) for k in got)
        good = diff <= 1e-6
        ok &= good
        print(
            f"round {r}: model vs exact FedAvg: max abs diff {diff:.2e} ({'ok' if good else 'BAD'})"
        )
    sim_cpu = sum(w.get("cpu_seconds", 0.0) for w in report.workers)
    sim_rss = sum(w.get("peak_rss_mb", 0.0) for w in report.workers)
    print(f"broker (mosquitto): {broker_cpu:.1f} s CPU, peak RSS {broker_rss:.0f} MB")
    print(f"aggregator: {agg_cpu:.1f} s CPU, peak RSS {agg_rss:.0f} MB")
    print(
        f"simulator: {sim_cpu:.1f} s CPU, peak RSS {sim_rss:.0f} MB in {len(report.workers)} "
        f"processes ({sim_rss / max(1, args.devices) * 1024:.0f} KB a device, torch included)"
    )
    print(f"wall: {report.seconds:.1f} s for the simulator; load average now {loadavg()}")
    (work / "results.json").write_text(
        json.dumps(
            {
                "devices": args.devices,
                "provision_s": provision,
                "connections_per_s": rate,
                "rounds": [
                    {k: v for k, v in m.items() if k != "contributors"} for m in run.metrics()
                ],
                "broker_cpu_s": broker_cpu,
                "broker_rss_mb": broker_rss,
                "aggregator_cpu_s": agg_cpu,
                "aggregator_rss_mb": agg_rss,
                "simulator_cpu_s": sim_cpu,
                "simulator_rss_mb": sim_rss,
            },
            default=str,
        )
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        if args.run_dir_tmpfs:
            shutil.rmtree(run_path, ignore_errors=True)
    print("OK" if ok else "FAILED: a round's model is not the exact FedAvg")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
