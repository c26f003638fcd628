"""Benchmark: one round with many devices, fedmq's aggregator against the raw broker.

    python scripts/bench_round.py [--devices 1000] [--hidden 256] [--concurrency 32]
                                  [--skip-raw] [--rounds 1|2]

Both measurements run in the same process on the same secured mosquitto, with signed
updates of the same size published by the same pool of device sessions:

- raw broker: a plain paho subscriber (aggregator account, QoS 1, automatic
  acks) counts the updates: what the broker alone delivers;
- fedmq: the aggregator decodes and validates each update, checks its
  signature, journals it with fsync, folds it into the running FedAvg sum,
  acks it, then aggregates and checkpoints the round.

It prints updates per second for both, their ratio, and the aggregator's
resident memory before and after the round (FedAvg holds one running sum,
not one model per device). ``--rounds 2`` measures the second round of a run
(updates signed against the model the aggregator announced for it), the first
unmeasured: every round of a run but its first finds the close's code paged in.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from aggregator.checkpoint import RunDir
from aggregator.service import initial_weights
from broker import messages
from broker.retained import read_retained
from broker.task import TaskSpec
from broker.topics import Topics
from fedmq.loadgen import broker_ceiling, memory_mb, publish_all, update_jobs
from fedmq.local import AGGREGATOR, LocalFederation
from fedmq.synthetic import mlp_task


def fedmq_round(
    fed: LocalFederation,
    work: Path,
    task_path: Path,
    devices: list[str],
    concurrency: int,
    rounds: int = 1,
):
    """Seconds for a real aggregator process to take every update of its last round and
    close it, and its memory in that round (sampled from /proc while it runs). Each
    round's updates are signed against the model the aggregator announced for it (read
    from the broker), before that round's clock starts. With ``rounds`` 2 the first round
    runs unmeasured: memory is then measured in a round of an aggregator that has run one
    (its code paged in), beside the first round's figure of a one-round run."""
    proc = fed.spawn_aggregator(
        "--task",
        str(task_path),
        "--rounds",
        str(rounds),
        "--min-devices",
        str(len(devices)),
        "--deadline",
        "0",
        "--run-dir",
        str(work / "run"),
        log=work / "aggregator.log",
    )
    metrics = work / "run" / "metrics.jsonl"
    peak = [0.0, 0.0]  # in the measured round; after it (the run's plots are drawn at the end)
    anon = [0.0]  # the round's peak of anonymous memory (heap: not code or mapped files)
    split = [0.0, 0.0]  # (anonymous, file-backed) at the round's peak of resident memory
    measuring = threading.Event()  # set when the measured round's updates start

    def sample() -> None:
        while proc.poll() is None:
            after = _lines(metrics) >= rounds  # the measured round is committed
            rss = memory_mb(proc.pid)
            if measuring.is_set() and not after:
                now_anon = memory_mb(proc.pid, "RssAnon")
                anon[0] = max(anon[0], now_anon)
                if rss > peak[0]:
                    split[:] = [now_anon, memory_mb(proc.pid, "RssFile")]
                    peak[0] = rss
            elif after:
                peak[1] = max(peak[1], rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reader = fed.settings(devices[0])
    for round_ in range(1, rounds + 1):
        # devices publish once the model is out: its subscription is in place by then
        _wait(
            lambda r=round_: f"round {r}: announced model" in _read(work / "aggregator.log"),
            proc,
            work,
        )
        found = read_retained(reader, [Topics(fed.name).model], client_prefix="bench-model")
        model = messages.decode_model(found[Topics(fed.name).model])
        assert model.round == round_, (model.round, round_)
        jobs = update_jobs(fed.credentials, fed.name, devices, model)
        if round_ == rounds:
            idle = memory_mb(proc.pid)
            idle_anon = memory_mb(proc.pid, "RssAnon")
            idle_file = memory_mb(proc.pid, "RssFile")
            measuring.set()
            start = time.perf_counter()
        _publish(jobs, concurrency, proc)
        del jobs
        _wait(lambda r=round_: _lines(metrics) >= r, proc, work)
    assert proc.wait(600) == 0, (work / "aggregator.log").read_text()[-2000:]
    seconds = time.perf_counter() - start
    sampler.join()
    assert RunDir(work / "run").metrics()[-1]["devices"] == len(devices)
    return seconds, idle, peak, (idle_anon, anon[0]), (split[1] - idle_file, split[0] - idle_anon)


def _publish(jobs: list, concurrency: int, proc) -> None:
    errors = publish_all(jobs, concurrency=concurrency)
    for _ in range(3):  # as a device would: a session that failed tries again
        if not errors:
            return
        print(f"{len(errors)} publications failed ({errors[0]}); trying them again", flush=True)
        failed = {e.split(":", 1)[0] for e in errors}
        errors = publish_all([j for j in jobs if j[0].stem in failed], concurrency=concurrency)
    if errors:
        proc.kill()
        raise SystemExit(f"{len(errors)} updates could not be published: {errors[:3]}")


def _wait(done, proc, work: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit((work / "aggregator.log").read_text()[-2000:])
        time.sleep(0.02)


def _lines(path: Path) -> int:
    return len(_read(path).splitlines())


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
    parser.add_argument(
        "--rounds",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: an unmeasured first round, then the measured one (the aggregator's code "
        "already paged in, as in every round but a run's first)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-"))
    task_path = work / "task.toml"
    task_path.write_text(mlp_task([args.hidden, args.hidden]))
    task = TaskSpec.load(task_path)
    devices = [f"d{i:04d}" for i in range(args.devices)]
    print(f"provisioning {args.devices} devices...", flush=True)
    with LocalFederation.create(work / "broker", "bench", devices) as fed:
        # the raw broker's: updates of the same size, bound to no aggregator's run
        payload, _ = messages.encode_model(
            initial_weights(task), 1, task, federation=fed.name, run_id="0" * 16
        )
        jobs = update_jobs(fed.credentials, fed.name, devices, messages.decode_model(payload))
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
            fedmq_round(fed, work, task_path, devices, args.concurrency, rounds=args.rounds)
        )

    if raw is not None:
        print(f"raw broker : {args.devices / raw:8.0f} updates/s ({raw:.2f} s)")
    which = "fedmq round" if args.rounds == 1 else "fedmq round 2 (after an unmeasured 1)"
    print(
        f"{which}: {args.devices / ours:8.0f} updates/s ({ours:.2f} s, validated, "
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
        f"+{file_up:.0f} MB (pages of code and libraries"
        + (" the round runs for the first time)" if args.rounds == 1 else ")")
    )


if __name__ == "__main__":
    main()
