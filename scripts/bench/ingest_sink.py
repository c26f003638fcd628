"""The broker's own ceiling: a plain paho subscriber that discards, in a process of its own.

    python scripts/bench/ingest_sink.py CREDENTIALS TOPIC_FILTER EXPECTED [--timeout S]

It subscribes at QoS 1 (paho acks each message on receipt), prints ``{"ready": true}``
once the broker has answered its SUBSCRIBE, then counts what arrives: which topic, how
many bytes, and when the last message came (``time.monotonic()``, comparable with the
publisher's clock). It stops at ``EXPECTED`` messages or after ``--timeout`` seconds and
prints one JSON line. It keeps nothing else: no hashing, no copies, nothing that would
lower the ceiling.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from broker.connection import connect_async, make_client
from broker.home import settings_from_credentials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("credentials", type=Path)
    parser.add_argument("topic_filter")
    parser.add_argument("expected", type=int)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    settings = settings_from_credentials(args.credentials)
    received: list[tuple[str, int]] = []
    last = [0.0]
    subscribed, complete = threading.Event(), threading.Event()
    client = make_client(settings, f"bench-ceiling-{secrets.token_hex(4)}", persistent=False)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            c.subscribe(args.topic_filter, options=mqtt.SubscribeOptions(qos=1))

    def on_message(c, userdata, msg) -> None:
        last[0] = time.monotonic()
        received.append((msg.topic, len(msg.payload)))
        if len(received) >= args.expected:
            complete.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        if not subscribed.wait(30):
            raise SystemExit("the ceiling subscriber could not subscribe")
        print(json.dumps({"ready": True}), flush=True)
        complete.wait(args.timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    print(json.dumps({"last": last[0], "received": received}), flush=True)


if __name__ == "__main__":
    main()
