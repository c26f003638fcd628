"""Ingest: how fast fedmq takes in signed updates, beside the broker's own ceiling.

    python scripts/bench/ingest.py [--sizes 0.1,1,10] [--devices 64] [--concurrency 16]

For each update size (MB), on one secured mosquitto, interleaved:

- ceiling: ``--devices`` synthetic devices (``fedmq/loadgen.py``: one TLS session per
  update, QoS 1) publish updates of that size as fast as they can, and a plain paho
  subscriber (QoS 1, automatic acks) that discards them counts them: what the broker
  alone delivers;
- fedmq: the same devices publish valid signed updates to a real ``fedmq aggregator
  start`` process, whose round needs all of them; the clock stops when the last one's
  fate is committed to the round's journal (it is acked right after).

It prints MB/s for both and their ratio (goal: >= 0.8 at 1 MB), then the aggregator's
serial work per small update measured in-process (goal: <= 0.5 ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serial_costs  # noqa: E402

from aggregator.service import initial_weights  # noqa: E402
from broker import messages  # noqa: E402
from broker.connection import connect_async, make_client  # noqa: E402
from broker.task import TaskSpec  # noqa: E402
from broker.topics import Topics  # noqa: E402
from fedmq.loadgen import broker_ceiling, publish_all, signed_update  # noqa: E402
from fedmq.local import AGGREGATOR, LocalFederation  # noqa: E402
from fedmq.synthetic import mlp_task  # noqa: E402


def hidden_for(megabytes: float) -> int:
    """MLP width whose float32 weights come to about ``megabytes`` (64 in, 8 out)."""
    return max(1, round(megabytes * 1e6 / 4 / (64 + 1 + 8)))


def fedmq_ingest(
    fed: LocalFederation, work: Path, task: TaskSpec, devices: list[str], concurrency: int
) -> tuple[float, int]:
    """(seconds until every update's fate is committed by a real aggregator, update bytes)."""
    run_dir = work / "run"
    proc = fed.spawn_aggregator(
        "--task",
        str(work / "task.toml"),
        "--rounds",
        "1",
        "--min-devices",
        str(len(devices)),
        "--deadline",
        "0",
        "--run-dir",
        str(run_dir),
        log=work / "aggregator.log",
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "state.json").exists() or not (run_dir / "run.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / "aggregator.log").read_text()[-2000:])
        time.sleep(0.05)
    time.sleep(1.0)  # the aggregator connects and announces round 1 after writing its run
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    payload, _ = messages.encode_model(
        initial_weights(task), 1, task, federation=fed.name, run_id=run_id
    )
    model = messages.decode_model(payload)
    jobs = []
    for i, device in enumerate(devices):
        device_id, update = signed_update(
            fed.credentials(device), model, num_samples=10, scale=0.001 * (i % 7)
        )
        jobs.append((fed.credentials(device), Topics(fed.name).update(device_id), update))
    journal = run_dir / "rounds" / "000001" / "journal.jsonl"

    seen = [b""]

    def committed() -> int:
        try:
            seen[0] = journal.read_bytes()
        except FileNotFoundError:  # not yet made, or removed once the round closed
            pass
        return seen[0].count(b"\n")

    start = time.perf_counter()
    errors = publish_all(jobs, concurrency=concurrency)
    while committed() < len(jobs):
        if proc.poll() is not None or time.perf_counter() - start > 300:
            raise RuntimeError((work / "aggregator.log").read_text()[-2000:])
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    proc.terminate()  # closing the round and drawing its plots is not ingest
    proc.wait(60)
    forget_session(fed)
    if errors:
        raise RuntimeError(f"publishing failed: {errors[:3]}")
    outcomes = [json.loads(line)["outcome"] for line in seen[0].decode().splitlines()]
    if outcomes != ["accepted"] * len(jobs):
        raise RuntimeError(f"not every update was accepted: {sorted(set(outcomes))}")
    return seconds, len(jobs[0][2])


def forget_session(fed: LocalFederation) -> None:
    """End the aggregator's persistent session, or the broker keeps queueing this size's
    updates (the ceiling's too) for it and the next size's aggregator gets them."""
    settings = fed.settings(AGGREGATOR)
    client = make_client(settings, f"fedmq-aggregator-{fed.name}", persistent=False)
    done = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: done.set()
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        if not done.wait(10):
            raise RuntimeError("could not end the aggregator's session")
    finally:
        client.disconnect()
        client.loop_stop()


def measure(work: Path, sizes: list[float], devices: int, concurrency: int, updates: int):
    names = [f"d{i:04d}" for i in range(devices)]
    rows = []
    with LocalFederation.create(work / "broker", "ingest", names) as fed:
        for mb in sizes:
            here = work / f"{mb:g}MB"
            here.mkdir()
            (here / "task.toml").write_text(mlp_task([hidden_for(mb)]))
            task = TaskSpec.load(here / "task.toml")
            ours, size = fedmq_ingest(fed, here, task, names, concurrency)
            # the ceiling's payloads: the same size, signed for no run (nobody checks them)
            model = messages.decode_model(
                messages.encode_model(initial_weights(task), 1, task, federation=fed.name)[0]
            )
            jobs = [
                (
                    fed.credentials(d),
                    Topics(fed.name).update(d),
                    signed_update(fed.credentials(d), model, num_samples=10, scale=0.001)[1],
                )
                for d in names
            ]
            raw = broker_ceiling(
                fed.settings(AGGREGATOR), Topics(fed.name).updates_filter, jobs, concurrency
            )
            total_mb = size * devices / 1e6
            rows.append(
                {
                    "update_mb": size / 1e6,
                    "updates": devices,
                    "ceiling_mb_s": total_mb / raw,
                    "fedmq_mb_s": total_mb / ours,
                    "ratio": raw / ours,
                }
            )
    serial = serial_costs.per_update(work / "serial", updates, 64)
    return rows, serial


def report(rows: list[dict], serial: dict) -> str:
    lines = [
        "update size   updates   broker ceiling   fedmq        fedmq/ceiling",
    ]
    for r in rows:
        lines.append(
            f"{r['update_mb']:8.2f} MB  {r['updates']:7d}   {r['ceiling_mb_s']:8.1f} MB/s   "
            f"{r['fedmq_mb_s']:6.1f} MB/s  {r['ratio']:6.2f}"
        )
    lines.append(
        f"aggregator serial work per small update ({serial['update_bytes'] / 1024:.0f} KiB, "
        f"{serial['updates']} in-process, 64 at a time): {serial['ms_per_update']:.3f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,10", help="update sizes in MB, comma-separated")
    parser.add_argument("--devices", type=int, default=64, help="devices (updates) per size")
    parser.add_argument("--concurrency", type=int, default=16, help="sessions at a time")
    parser.add_argument("--updates", type=int, default=2000, help="for the serial cost")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="fedmq-ingest-"))
    rows, serial = measure(work, sizes, args.devices, args.concurrency, args.updates)
    print(report(rows, serial))
    if args.json:
        print(json.dumps({"rows": rows, "serial": serial}))


if __name__ == "__main__":
    main()
