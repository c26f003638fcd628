"""Benchmark: one round with 1,000 devices on a three-node RabbitMQ cluster.

    python scripts/bench/rabbit_round.py [--devices 1000] [--nodes 3] [--hidden 64]
                                         [--concurrency 32] [--skip-raw]

Debian's rabbitmq-server (3.10, MQTT 3.1.1 only) started as ``--nodes`` Erlang nodes
on this machine (``broker/rabbit_cluster.py``); the devices' credentials are spread
round-robin over the nodes, the aggregator dials the first node and copies its
retained messages to the others (``broker/retained_mirror.py``).

- raw broker: a plain paho subscriber on the first node counts the updates that
  every device publishes to its own node: what the cluster alone delivers;
- fedmq: a real ``fedmq aggregator start`` process takes every signed update
  (validated, journaled with fsync, folded) and closes the round.

It prints the cluster's boot time, when each node held the retained model, the
round time, and per node: devices, CPU seconds its Erlang VM spent in the round and
its resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aggregator.checkpoint import RunDir  # noqa: E402
from broker import messages  # noqa: E402
from broker.rabbit_cluster import RabbitCluster, RabbitNode, rabbit_installed  # noqa: E402
from broker.retained import read_retained  # noqa: E402
from broker.topics import Topics  # noqa: E402
from fedmq.loadgen import broker_ceiling, memory_mb, publish_all, update_jobs  # noqa: E402
from fedmq.local import AGGREGATOR, LocalFederation  # noqa: E402
from fedmq.synthetic import mlp_task  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def node_pids(node: RabbitNode) -> list[int]:
    """The processes of a node's process group (its shell script, beam.smp, helpers)."""
    if node.proc is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == node.proc.pid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / TICKS


def node_figures(cluster: RabbitCluster) -> dict[str, tuple[float, float]]:
    """{node: (CPU seconds so far, resident MB)}."""
    out = {}
    for node in cluster.nodes:
        pids = node_pids(node)
        out[node.short] = (cpu_seconds(pids), sum(memory_mb(p) for p in pids))
    return out


def wait_for_model(fed: LocalFederation, cluster: RabbitCluster, start: float) -> dict:
    """Seconds (since ``start``) until each node held a retained model of round 1."""
    topic = Topics(fed.name).model
    seen: dict[str, float] = {}
    from dataclasses import replace

    settings = fed.settings(AGGREGATOR)
    deadline = time.monotonic() + 120
    while len(seen) < len(cluster.nodes):
        for node in cluster.nodes:
            if node.short in seen:
                continue
            local = replace(settings, port=node.mqtt_port, cluster=())
            payload = read_retained(local, [topic]).get(topic)
            if payload and messages.decode_model(payload).round == 1:
                seen[node.short] = time.monotonic() - start
        if time.monotonic() > deadline:
            raise SystemExit(f"the model never reached every node: {seen}")
        time.sleep(0.05)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64, help="MLP width (model size)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw-cluster pass")
    args = parser.parse_args()
    if not rabbit_installed():
        raise SystemExit("rabbitmq-server is not installed (apt-get install rabbitmq-server)")

    work = Path(tempfile.mkdtemp(prefix="fedmq-rabbit-bench-"))
    task_path = work / "task.toml"
    task_path.write_text(mlp_task([args.hidden, args.hidden]))
    devices = [f"d{i:04d}" for i in range(args.devices)]
    t0 = time.monotonic()
    print(f"provisioning {args.devices} devices...", flush=True)
    cluster = RabbitCluster.create(work / "cluster", "bench", devices, nodes=args.nodes)
    provisioned = time.monotonic() - t0
    t0 = time.monotonic()
    cluster.start()
    booted = time.monotonic() - t0
    print(
        f"cluster: {args.nodes} nodes ({', '.join(n.name for n in cluster.nodes)}) up in "
        f"{booted:.1f} s; {args.devices} accounts provisioned in {provisioned:.1f} s",
        flush=True,
    )
    fed = LocalFederation(cluster.home, "bench", devices)
    per_node = {n.short: 0 for n in cluster.nodes}
    for device in devices:
        per_node[cluster.node_of(device).short] += 1
    try:
        # one connection per node first: this process learns that the nodes speak MQTT
        # 3.1.1 only (one fallback each, logged), so neither pass below pays for it
        for node in cluster.nodes:
            device = next(d for d in devices if cluster.node_of(d) is node)
            read_retained(fed.settings(device), [Topics(fed.name).model])
        raw = None
        if not args.skip_raw:
            payload, _ = messages.encode_model(
                _initial(task_path), 1, _task(task_path), federation=fed.name, run_id="0" * 16
            )
            jobs = _jobs(fed, devices, messages.decode_model(payload))
            raw = broker_ceiling(
                fed.settings(AGGREGATOR), Topics(fed.name).updates_filter, jobs, args.concurrency
            )
            del jobs
        started = time.monotonic()
        proc = fed.spawn(
            "aggregator", "start", "--config", str(fed.credentials(AGGREGATOR)),
            "--task", str(task_path), "--rounds", "1", "--min-devices", str(args.devices),
            "--deadline", "0", "--run-dir", str(work / "run"), log=work / "aggregator.log",
        )  # fmt: skip
        model_at = wait_for_model(fed, cluster, started)
        run_id = json.loads((work / "run" / "run.json").read_text())["run_id"]
        topic = Topics(fed.name).model
        first_device = devices[0]
        payload = read_retained(fed.settings(first_device), [topic])[topic]
        model = messages.decode_model(payload)
        assert model.run_id == run_id
        jobs = _jobs(fed, devices, model)
        size_kb = len(jobs[0][2]) / 1024
        peak = [0.0]

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], memory_mb(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        before = node_figures(cluster)
        start = time.perf_counter()
        errors = publish_all(jobs, concurrency=args.concurrency)
        code = proc.wait(900)
        seconds = time.perf_counter() - start
        after = node_figures(cluster)
        sampler.join()
        if code != 0 or errors:
            print((work / "aggregator.log").read_text()[-3000:])
            raise SystemExit(f"round failed: exit {code}, publish errors {errors[:3]}")
        accepted = RunDir(work / "run").metrics()[0]["devices"]
        fallback = [
            line
            for line in (work / "aggregator.log").read_text().splitlines()
            if "MQTT 3.1.1" in line
        ]
    finally:
        fed.close()
        cluster.stop()

    print(f"{args.devices} updates of {size_kb:.0f} KiB, {args.concurrency} sessions at a time")
    print(
        "retained model of round 1 on each node after the aggregator started: "
        + ", ".join(f"{n} {s:.2f} s" for n, s in model_at.items())
    )
    if raw is not None:
        print(f"raw cluster : {args.devices / raw:8.0f} updates/s ({raw:.2f} s)")
    print(
        f"fedmq round : {args.devices / seconds:8.0f} updates/s ({seconds:.2f} s for "
        f"{accepted} accepted updates: validated, signature-checked, journaled, folded)"
    )
    print(f"aggregator  : peak {peak[0]:.0f} MB resident; {len(fallback)} fallback line(s):")
    for line in fallback:
        print("   ", line[:160])
    print("node         devices   CPU s in round   resident MB")
    for node in cluster.nodes:
        cpu = after[node.short][0] - before[node.short][0]
        print(
            f"{node.name:20} {per_node[node.short]:5d}   {cpu:14.1f}   {after[node.short][1]:11.0f}"
        )
    print(f"run directory: {work}")


def _task(path: Path):
    from broker.task import TaskSpec

    return TaskSpec.load(path)


def _initial(path: Path):
    from aggregator.service import initial_weights

    return initial_weights(_task(path))


def _jobs(fed: LocalFederation, devices: list[str], model) -> list:
    return update_jobs(fed.credentials, fed.name, devices, model)


if __name__ == "__main__":
    main()
