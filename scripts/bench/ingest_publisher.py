"""The ingest benchmark's devices, in a process of their own (``scripts/bench/ingest.py``).

    python scripts/bench/ingest_publisher.py JOBS.json --concurrency 16

``JOBS.json`` lists ``{"credentials", "topic", "payload"}`` (payload: a file). The
payloads are read into memory first; then the process prints ``{"ready": true}`` and
waits for a line on stdin, publishes every job as fast as it can (one MQTT session and
one QoS 1 publication per job, ``concurrency`` at a time: ``fedmq.loadgen.publish_all``)
and prints one JSON line: when it started (``time.monotonic()``, the same clock in every
process on this machine), when the last PUBACK came, how many PUBACKs came and the errors.

The same process publishes for the ceiling and for fedmq: the only difference between
the two runs is who receives.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", type=Path)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    from fedmq.loadgen import publish_all

    jobs = [
        (Path(j["credentials"]), j["topic"], Path(j["payload"]).read_bytes())
        for j in json.loads(args.jobs.read_text())
    ]
    acks = [0]
    lock = threading.Lock()

    def acked() -> None:
        with lock:
            acks[0] += 1

    print(json.dumps({"ready": True}), flush=True)
    if not sys.stdin.readline():
        return  # the coordinator went away
    started = time.monotonic()
    errors = publish_all(jobs, concurrency=args.concurrency, on_published=acked, timeout=120)
    done = time.monotonic()
    print(
        json.dumps(
            {
                "started": started,
                "done": done,
                "jobs": len(jobs),
                "acked": acks[0],
                "errors": errors[:5],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
