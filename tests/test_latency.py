"""Small messages cross the broker at once: no Nagle stall on either hop.

Without TCP_NODELAY, the tail of every message that does not fill a segment waits for
the ack of the previous one, and the receiver delays that ack by up to 40 ms: a model
announced to the devices arrived 40-50 ms late, a third of the round of
``scripts/bench/peer.py``. fedmq's clients set the option on their socket and the
broker's configuration sets it on its own (``set_tcp_nodelay``).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from broker.connection import connect_async, make_client
from broker.topics import Topics
from fedmq.local import AGGREGATOR

MESSAGES = 20
SIZE = 20_000  # about the peer benchmark's model: a few segments and a partial one


def test_a_20kb_message_crosses_the_broker_in_milliseconds(federation):
    fed = federation()
    settings = fed.settings(AGGREGATOR)
    topic = Topics(fed.name).round  # the aggregator account may read and write it
    arrived = threading.Event()
    receiver = make_client(settings, client_id="latency-rx")
    receiver.on_message = lambda client, userdata, msg: arrived.set()
    subscribed = threading.Event()
    receiver.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    receiver.on_subscribe = lambda *args: subscribed.set()
    sender = make_client(settings, client_id="latency-tx")
    connected = threading.Event()
    sender.on_connect = lambda *args: connected.set()
    for client in (receiver, sender):
        connect_async(client, settings, persistent=False)
        client.loop_start()
    try:
        assert subscribed.wait(10) and connected.wait(10)
        for client in (receiver, sender):  # our side of each hop
            assert client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        payload = bytes(SIZE)
        seconds = []
        for _ in range(MESSAGES):
            arrived.clear()
            started = time.perf_counter()
            sender.publish(topic, payload, qos=1)
            assert arrived.wait(5)
            seconds.append(time.perf_counter() - started)
    finally:
        for client in (receiver, sender):
            client.disconnect()
            client.loop_stop()
    # with Nagle on either hop the median is 40 ms or more; without, a few ms here
    assert statistics.median(seconds) < 0.02, [round(s * 1000, 1) for s in seconds]
