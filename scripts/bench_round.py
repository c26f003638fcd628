"""Benchmark: one round with many devices, fedmq's aggregator against the raw broker.

    python scripts/bench_round.py [--devices 1000] [--hidden 256] [--concurrency 32]

Both measurements run in the same process on the same secured mosquitto, with
the same signed update payloads published by the same pool of device sessions:

- raw broker: a plain paho subscriber (aggregator account, QoS 1, automatic
  acks) counts the updates: what the broker alone delivers;
- fedmq: the aggregator decodes and validates each update, checks its
  signature, journals it with fsync, folds it into the running FedAvg sum,
  acks it, then aggregates and checkpoints the round.

It prints updates per second for both, their ratio, and the aggregator's
resident memory before and after the round (FedAvg holds one running sum,
not one model per device).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from aggregator.checkpoint import RunDir
from aggregator.service import initial_weights
from broker import messages
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.loadgen import broker_ceiling, memory_mb, publish_all, update_jobs
from fedmq.local import AGGREGATOR, LocalFederation
from fedmq.synthetic import mlp_task


def fedmq_round(fed: LocalFederation, work: Path, task_path: Path, make_jobs, concurrency: int):
    """Seconds for a real aggregator process to take every update and close the round,
    and its peak resident memory (sampled from /proc while it runs). Updates are bound
    to the run, whose id the aggregator draws: ``make_jobs(run_id)`` signs them then,
    before the clock starts."""
    proc = fed.spawn_aggregator(
        "--task",
        str(task_path),
        "--rounds",
        "1",
        "--min-devices",
        str(len(make_jobs.devices)),
        "--deadline",
        "0",
        "--run-dir",
        str(work / "run"),
        log=work / "aggregator.log",
    )
    peak = [0.0, 0.0]  # in the round; after it (the run's plots are drawn at the end)
    anon = [0.0]  # the round's peak of anonymous memory (heap: not code or mapped files)
    split = [0.0, 0.0]  # (anonymous, file-backed) at the round's peak of resident memory
    model_seen = threading.Event()

    def sample() -> None:
        while proc.poll() is None:
            after = (work / "run" / "metrics.jsonl").exists()  # the round is committed
            rss = memory_mb(proc.pid)
            if not after:
                now_anon = memory_mb(proc.pid, "RssAnon")
                anon[0] = max(anon[0], now_anon)
                if rss > peak[0]:
                    split[:] = [now_anon, memory_mb(proc.pid, "RssFile")]
            peak[after] = max(peak[after], rss)
            log_file = work / "aggregator.log"  # devices publish once the model is out:
            if not model_seen.is_set() and "announced model" in _read(log_file):
                model_seen.set()  # its subscription is in place (state.json comes earlier)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert model_seen.wait(60), (work / "aggregator.log").read_text()
    run_id = json.loads((work / "run" / "run.json").read_text())["run_id"]
    jobs = make_jobs(run_id)
    idle = memory_mb(proc.pid)
    idle_anon = memory_mb(proc.pid, "RssAnon")
    idle_file = memory_mb(proc.pid, "RssFile")
    start = time.perf_counter()
    errors = publish_all(jobs, concurrency=concurrency)
    for _ in range(3):  # as a device would: a session that failed tries again
        if not errors:
            break
        print(f"{len(errors)} publications failed ({errors[0]}); trying them again", flush=True)
        failed = {e.split(":", 1)[0] for e in errors}
        errors = publish_all([j for j in jobs if j[0].stem in failed], concurrency=concurrency)
    if errors:
        proc.kill()
        raise SystemExit(f"{len(errors)} updates could not be published: {errors[:3]}")
    assert proc.wait(600) == 0, (work / "aggregator.log").read_text()[-2000:]
    seconds = time.perf_counter() - start
    sampler.join()
    assert RunDir(work / "run").metrics()[0]["devices"] == len(jobs)
    return seconds, idle, peak, (idle_anon, anon[0]), (split[1] - idle_file, split[0] - idle_anon)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (model size)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--skip-raw",
        action="store_true",
        help="skip the raw-broker pass (big models: its payloads would double the memory)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-"))
    task_path = work / "task.toml"
    task_path.write_text(mlp_task([args.hidden, args.hidden]))
    task = TaskSpec.load(task_path)
    devices = [f"d{i:04d}" for i in range(args.devices)]
    print(f"provisioning {args.devices} devices...", flush=True)
    with LocalFederation.create(work / "broker", "bench", devices) as fed:

        def make_jobs(run_id: str) -> list:
            """One signed update per device, trained (nudged) from the run's first model."""
            payload, _ = messages.encode_model(
                initial_weights(task), 1, task, federation=fed.name, run_id=run_id
            )
            model = messages.decode_model(payload)
            return update_jobs(fed.credentials, fed.name, devices, model)

        make_jobs.devices = devices
        jobs = make_jobs("0" * 16)  # the raw broker's: same sizes, no aggregator to bind to
        size_kb = len(jobs[0][2]) / 1024
        print(
            f"{args.devices} updates of {size_kb:.0f} KiB, {args.concurrency} sessions at a time",
            flush=True,
        )
        raw = (
            None
            if args.skip_raw
            else broker_ceiling(
                fed.settings(AGGREGATOR), Topics(fed.name).updates_filter, jobs, args.concurrency
            )
        )
        del jobs
        ours, rss_idle, (rss_peak, rss_after), (anon_idle, anon_peak), (file_up, anon_up) = (
            fedmq_round(fed, work, task_path, make_jobs, args.concurrency)
        )

    if raw is not None:
        print(f"raw broker : {args.devices / raw:8.0f} updates/s ({raw:.2f} s)")
    print(
        f"fedmq round: {args.devices / ours:8.0f} updates/s ({ours:.2f} s, validated, "
        "signature-checked, journaled with fsync, folded, checkpointed)"
    )
    if raw is not None:
        print(f"ratio fedmq/raw: {raw / ours:.2f}")
    print(
        f"aggregator process memory: {rss_idle:.0f} MB waiting, {rss_peak:.0f} MB peak in the "
        f"round ({args.devices} updates x {size_kb:.0f} KiB = "
        f"{args.devices * size_kb / 1024:.0f} MB if it kept them all)"
    )
    model_mb = size_kb / 1024
    print(
        f"over waiting: {rss_peak - rss_idle:.0f} MB = {(rss_peak - rss_idle) / model_mb:.1f} "
        f"models (goal <= 4); after the round (drawing the run's plots): {rss_after:.0f} MB peak"
    )
    print(
        f"of which anonymous memory (heap and buffers; the rest is code and files mapped): "
        f"{anon_idle:.0f} MB waiting, {anon_peak:.0f} MB peak, over waiting "
        f"{anon_peak - anon_idle:.0f} MB = {(anon_peak - anon_idle) / model_mb:.1f} models"
    )
    print(
        f"at the peak of resident memory: anonymous +{anon_up:.0f} MB, file-backed "
        f"+{file_up:.0f} MB (pages of code and libraries the round runs for the first time)"
    )


if __name__ == "__main__":
    main()
