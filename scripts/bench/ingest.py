"""Ingest: how fast fedmq takes in signed updates, beside the broker's own ceiling.

    python scripts/bench/ingest.py [--sizes 0.1,1,10] [--devices 64] [--concurrency 16]
                                   [--reps 3]

For each update size (MB), on one secured mosquitto, ``--reps`` pairs of runs, the
order alternating (ceiling first, then fedmq first, ...):

- ceiling: a publisher process (``ingest_publisher.py``: ``--devices`` synthetic devices,
  one TLS session and one QoS 1 publication each, ``--concurrency`` at a time) publishes
  updates of that size as fast as it can to a plain paho subscriber in a process of its
  own (``ingest_sink.py``) that discards them: what the broker alone delivers;
- fedmq: the same publisher process publishes valid signed updates to a real ``fedmq
  aggregator start`` process, whose round needs all of them.

Every run's clock starts when the publisher starts publishing and stops when the last
update arrived at the subscriber, or when the last update's fate is in the aggregator's
round journal (committed with fsync; its ack follows). Every run is checked against an
independent record: the PUBACKs the publisher got, and the topics and sizes the
subscriber counted, or the journal's payload digests against those of the payloads sent.

It prints, per size, the medians of MB/s and of the ratio of each pair (goal: >= 0.8 at
1 MB) with their spread (min-max) and the load average around the runs; then the
aggregator's serial work per small update, measured in-process (goal: <= 0.5 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import serial_costs  # noqa: E402

import broker  # noqa: E402
from aggregator.service import initial_weights  # noqa: E402
from broker import messages  # noqa: E402
from broker.connection import connect_async, make_client  # noqa: E402
from broker.errors import FedmqError  # noqa: E402
from broker.retained import read_retained  # noqa: E402
from broker.task import TaskSpec  # noqa: E402
from broker.topics import Topics  # noqa: E402
from fedmq.loadgen import signed_update  # noqa: E402
from fedmq.local import AGGREGATOR, LocalFederation  # noqa: E402
from fedmq.synthetic import mlp_task  # noqa: E402

CHILD_TIMEOUT = 300.0  # seconds any one run may take


def hidden_for(megabytes: float) -> int:
    """MLP width whose float32 weights come to about ``megabytes`` (64 in, 8 out)."""
    return max(1, round(megabytes * 1e6 / 4 / (64 + 1 + 8)))


# -- the record of one run, and what the runs of a size come to (pure) -------------------
@dataclass
class Run:
    kind: str  # "ceiling" or "fedmq"
    seconds: float
    updates: int  # published
    update_bytes: int
    acked: int  # PUBACKs the publisher got
    received: int  # distinct updates the receiver counted (journal lines for fedmq)
    load: tuple[float, float]  # 1-minute load average before and after

    @property
    def mb_s(self) -> float:
        return self.updates * self.update_bytes / 1e6 / self.seconds


@dataclass
class SizeResult:
    update_bytes: int
    updates: int
    runs: list[Run] = field(default_factory=list)

    def of(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]

    def ratios(self) -> list[float]:
        """fedmq MB/s over ceiling MB/s, pair by pair (the runs side by side)."""
        return [f.mb_s / c.mb_s for c, f in zip(self.of("ceiling"), self.of("fedmq"))]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)"""
    return statistics.median(values), min(values), max(values)


def check_ceiling(sent: dict[str, int], acked: int, received: list[tuple[str, int]]) -> int:
    """Distinct updates the subscriber got; raises unless every published update came
    acked and arrived whole (a QoS 1 duplicate is counted once)."""
    got = {topic: size for topic, size in received}
    if acked != len(sent):
        raise RuntimeError(f"ceiling: {acked} PUBACKs for {len(sent)} updates published")
    if got != sent:
        missing = sorted(set(sent) - set(got))[:3]
        raise RuntimeError(f"ceiling: the subscriber got {len(got)} of {len(sent)}: {missing}")
    return len(got)


def check_journal(sent_digests: set[str], acked: int, journal_lines: list[dict]) -> int:
    """Updates the aggregator accepted; raises unless every published update came acked
    and its payload (by SHA-256) is in the journal once, accepted, and nothing else is."""
    if acked != len(sent_digests):
        raise RuntimeError(f"fedmq: {acked} PUBACKs for {len(sent_digests)} updates published")
    digests = [e["digest"] for e in journal_lines]
    outcomes = sorted({e["outcome"] for e in journal_lines})
    if sorted(digests) != sorted(sent_digests) or outcomes != ["accepted"]:
        raise RuntimeError(
            f"fedmq: the journal holds {len(set(digests) & sent_digests)} of the "
            f"{len(sent_digests)} updates sent, outcomes {outcomes}"
        )
    return len(digests)


# -- child processes --------------------------------------------------------------------
class Child:
    """A child process that speaks one JSON object a line on stdout."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # the children run the same code as this process (and as the aggregator it spawns)
        root = str(Path(broker.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
            )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def line(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            raise RuntimeError(f"{self.log.name}: no answer; {self.log.read_text()[-1500:]}")
        return json.loads(line)

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def write_jobs(here: Path, jobs: list[tuple[Path, str, bytes]]) -> Path:
    """The publisher's job list, each payload in a file of its own."""
    here.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, (creds, topic, payload) in enumerate(jobs):
        path = here / f"{i:05d}.bin"
        path.write_bytes(payload)
        listing.append({"credentials": str(creds), "topic": topic, "payload": str(path)})
    (here / "jobs.json").write_text(json.dumps(listing))
    return here / "jobs.json"


def start_publisher(jobs_file: Path, concurrency: int) -> Child:
    child = Child(
        [str(BENCH / "ingest_publisher.py"), str(jobs_file), "--concurrency", str(concurrency)],
        jobs_file.parent / "publisher.log",
    )
    child.line(60)  # ready: its payloads are in memory
    return child


# -- the two kinds of run ----------------------------------------------------------------
def ceiling_run(fed: LocalFederation, jobs_file: Path, sent: dict[str, int], concurrency: int):
    load0 = os.getloadavg()[0]
    sink = Child(
        [
            str(BENCH / "ingest_sink.py"),
            str(fed.credentials(AGGREGATOR)),
            Topics(fed.name).updates_filter,
            str(len(sent)),
            "--timeout",
            str(CHILD_TIMEOUT),
        ],
        jobs_file.parent / "sink.log",
    )
    publisher = None
    try:
        sink.line(60)  # subscribed
        publisher = start_publisher(jobs_file, concurrency)
        publisher.go()
        published = publisher.line(CHILD_TIMEOUT)
        got = sink.line(CHILD_TIMEOUT)
    finally:
        for child in (sink, publisher):
            if child is not None:
                child.stop()
    if published["errors"]:
        raise RuntimeError(f"ceiling: publishing failed: {published['errors']}")
    received = check_ceiling(sent, published["acked"], [tuple(r) for r in got["received"]])
    return Run(
        "ceiling",
        got["last"] - published["started"],
        len(sent),
        next(iter(sent.values())),
        published["acked"],
        received,
        (load0, os.getloadavg()[0]),
    )


def fedmq_run(
    fed: LocalFederation, here: Path, names: list[str], concurrency: int, keep: bool = False
) -> Run:
    """A real aggregator (one round that needs every device) takes in ``names``' updates."""
    load0 = os.getloadavg()[0]
    here.mkdir(parents=True)
    run_dir = here / "run"
    proc = fed.spawn_aggregator(
        "--task",
        str(here.parent / "task.toml"),
        "--rounds",
        "1",
        "--min-devices",
        str(len(names)),
        "--deadline",
        "0",
        "--run-dir",
        str(run_dir),
        log=here / "aggregator.log",
    )
    publisher = None
    try:
        model = announced_model(fed, run_dir, proc, here / "aggregator.log")
        jobs = []
        for i, device in enumerate(names):
            device_id, update = signed_update(
                fed.credentials(device), model, num_samples=10, scale=0.001 * (i % 7)
            )
            jobs.append((fed.credentials(device), Topics(fed.name).update(device_id), update))
        digests = {hashlib.sha256(payload).hexdigest() for _, _, payload in jobs}
        size = len(jobs[0][2])
        publisher = start_publisher(write_jobs(here / "jobs", jobs), concurrency)
        del jobs
        journal = run_dir / "rounds" / "000001" / "journal.jsonl"
        seen = [b""]

        def committed() -> int:
            try:
                seen[0] = journal.read_bytes()
            except FileNotFoundError:  # not yet made, or removed once the round closed
                pass
            return seen[0].count(b"\n")

        publisher.go()
        went = time.monotonic()
        while committed() < len(names):
            if proc.poll() is not None or time.monotonic() - went > CHILD_TIMEOUT:
                raise RuntimeError((here / "aggregator.log").read_text()[-2000:])
            time.sleep(0.002)
        ended = time.monotonic()
        published = publisher.line(CHILD_TIMEOUT)
    finally:
        if publisher is not None:
            publisher.stop()
        if proc.poll() is None:
            proc.terminate()  # closing the round is not ingest
            proc.wait(60)
        forget_session(fed)
    if published["errors"]:
        raise RuntimeError(f"fedmq: publishing failed: {published['errors']}")
    lines = [json.loads(line) for line in seen[0].decode().splitlines()]
    received = check_journal(digests, published["acked"], lines)
    if not keep:
        for path in (run_dir / "rounds", here / "jobs"):
            subprocess.run(["rm", "-rf", str(path)], check=False)
    return Run(
        "fedmq",
        ended - published["started"],
        len(names),
        size,
        published["acked"],
        received,
        (load0, os.getloadavg()[0]),
    )


def announced_model(
    fed: LocalFederation, run_dir: Path, proc: subprocess.Popen, log: Path
) -> messages.ModelMessage:
    """The retained model once it is this aggregator's (its run's id): it has subscribed."""
    deadline = time.monotonic() + 120
    topic = Topics(fed.name).model
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the aggregator did not announce: {log.read_text()[-2000:]}")
        if (run_dir / "run.json").exists():
            run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
            try:
                found = read_retained(fed.settings(AGGREGATOR), [topic], client_prefix="bench")
            except FedmqError:
                found = {}
            if topic in found:
                model = messages.decode_model(found[topic])
                if model.run_id == run_id:
                    return model
        time.sleep(0.2)


def forget_session(fed: LocalFederation) -> None:
    """End the aggregator's persistent session, or the broker keeps queueing updates (the
    ceiling's too) for it and the next run's aggregator gets them."""
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


def ceiling_jobs(fed: LocalFederation, task: TaskSpec, names: list[str]):
    """Updates of the same size for the ceiling, signed for a run id of the same length as
    a real one's (nobody checks them)."""
    payload, _ = messages.encode_model(
        initial_weights(task), 1, task, federation=fed.name, run_id="0" * 16
    )
    model = messages.decode_model(payload)
    return [
        (
            fed.credentials(d),
            Topics(fed.name).update(d),
            signed_update(fed.credentials(d), model, num_samples=10, scale=0.001)[1],
        )
        for d in names
    ]


def measure(
    work: Path,
    sizes: list[float],
    devices: int,
    concurrency: int,
    updates: int,
    reps: int = 3,
    progress=None,
) -> tuple[list[SizeResult], dict]:
    progress = progress or (lambda run: None)
    names = [f"d{i:04d}" for i in range(devices)]
    results = []
    with LocalFederation.create(work / "broker", "ingest", names) as fed:
        for mb in sizes:
            here = work / f"{mb:g}MB"
            here.mkdir()
            (here / "task.toml").write_text(mlp_task([hidden_for(mb)]))
            task = TaskSpec.load(here / "task.toml")
            jobs = ceiling_jobs(fed, task, names)
            sent = {topic: len(payload) for _, topic, payload in jobs}
            ceiling_file = write_jobs(here / "ceiling", jobs)
            del jobs
            result = SizeResult(next(iter(sent.values())), devices)
            for rep in range(reps):
                order = ("ceiling", "fedmq") if rep % 2 == 0 else ("fedmq", "ceiling")
                for kind in order:
                    if kind == "ceiling":
                        run = ceiling_run(fed, ceiling_file, sent, concurrency)
                    else:
                        run = fedmq_run(fed, here / f"fedmq-{rep}", names, concurrency)
                    result.runs.append(run)
                    progress(run)
            subprocess.run(["rm", "-rf", str(here / "ceiling")], check=False)
            results.append(result)
    load0 = os.getloadavg()[0]
    serial = serial_costs.per_update(work / "serial", updates, 64)
    serial["load"] = (load0, os.getloadavg()[0])
    return results, serial


def report(results: list[SizeResult], serial: dict) -> str:
    lines = [
        "update size  updates  reps  broker ceiling MB/s    fedmq MB/s            "
        "fedmq/ceiling        load avg",
        "                            median [min-max]       median [min-max]      median [min-max]",
    ]
    for r in results:
        c = spread([run.mb_s for run in r.of("ceiling")])
        f = spread([run.mb_s for run in r.of("fedmq")])
        q = spread(r.ratios())
        loads = [x for run in r.runs for x in run.load]
        lines.append(
            f"{r.update_bytes / 1e6:7.2f} MB  {r.updates:7d}  {len(r.ratios()):4d}  "
            f"{c[0]:7.1f} [{c[1]:5.1f}-{c[2]:5.1f}]   {f[0]:7.1f} [{f[1]:5.1f}-{f[2]:5.1f}]  "
            f"{q[0]:5.2f} [{q[1]:.2f}-{q[2]:.2f}]   {min(loads):.1f}-{max(loads):.1f}"
        )
    lines.append(
        "every run: PUBACKs = updates published = updates received (subscriber) or "
        "accepted in the journal (fedmq, by payload digest)"
    )
    lines.append(
        f"aggregator serial work per small update ({serial['update_bytes'] / 1024:.0f} KiB, "
        f"{serial['updates']} in-process, 64 at a time): {serial['ms_per_update']:.3f} ms "
        f"(load avg {serial['load'][0]:.1f}-{serial['load'][1]:.1f})"
    )
    return "\n".join(lines)


def describe(run: Run) -> str:
    return (
        f"  {run.update_bytes / 1e6:6.2f} MB {run.kind:8s} {run.seconds:7.2f} s "
        f"{run.mb_s:7.1f} MB/s  acked {run.acked} received {run.received}  "
        f"load {run.load[0]:.1f}-{run.load[1]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,10", help="update sizes in MB, comma-separated")
    parser.add_argument("--devices", type=int, default=64, help="devices (updates) per run")
    parser.add_argument("--concurrency", type=int, default=16, help="sessions at a time")
    parser.add_argument("--reps", type=int, default=3, help="pairs of runs per size")
    parser.add_argument("--updates", type=int, default=2000, help="for the serial cost")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes!r}")
    if not sizes or min(sizes) <= 0 or args.devices < 1 or args.reps < 1:
        parser.error("--sizes, --devices and --reps must be positive")
    work = Path(tempfile.mkdtemp(prefix="fedmq-ingest-"))
    print(f"work directory (broker, aggregator logs, run directories): {work}", file=sys.stderr)
    results, serial = measure(
        work,
        sizes,
        args.devices,
        args.concurrency,
        args.updates,
        args.reps,
        progress=lambda run: print(describe(run), file=sys.stderr, flush=True),
    )
    print(report(results, serial))
    if args.json:
        print(
            json.dumps(
                {
                    "sizes": [
                        {**r.__dict__, "runs": [{**x.__dict__} for x in r.runs]} for r in results
                    ],
                    "serial": serial,
                }
            )
        )


if __name__ == "__main__":
    main()
