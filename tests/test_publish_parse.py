"""A large PUBLISH is copied once on its way in (``broker/publish_parse.py``).

The header parser agrees with paho's own on valid packets and never raises on broken
ones; over a real mosquitto, large messages arrive whole on MQTT 5 and 3.1.1, QoS 0 and
1, with their properties, while the receiving process holds about two copies of the
payload at its peak (paho's receive buffer and the payload) where paho alone held four.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import tracemalloc

import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.connection import connect_async, make_client
from broker.publish_parse import payload_offset
from broker.topics import Topics
from fedmq.local import AGGREGATOR

PAYLOAD = 8 * 2**20


def publish_packet(topic: bytes, qos: int, mid: int, props: bytes | None, payload: bytes):
    """A PUBLISH after its fixed header, as a broker sends it."""
    out = len(topic).to_bytes(2, "big") + topic
    if qos:
        out += mid.to_bytes(2, "big")
    return bytearray(out + (props if props is not None else b"") + payload)


def properties(rng: random.Random) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    if rng.random() < 0.5:
        props.UserProperty = [("k" * rng.randint(1, 200), "v" * rng.randint(0, 300))]
    if rng.random() < 0.5:
        props.MessageExpiryInterval = rng.randint(1, 10**6)
    return props.pack()


def test_the_payload_starts_where_paho_says_it_does():
    rng = random.Random(0)
    for _ in range(500):
        mqtt5, qos = rng.random() < 0.5, rng.randint(0, 1)
        topic = bytes(rng.randint(97, 122) for _ in range(rng.randint(1, 300)))
        payload = rng.randbytes(rng.randint(0, 2000))
        packet = publish_packet(
            topic, qos, rng.randint(1, 65535), properties(rng) if mqtt5 else None, payload
        )
        version = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
        theirs = _packet.decode_publish(qos << 1, bytes(packet), version)
        start = payload_offset(packet, qos, mqtt5)
        assert start is not None and packet[start:] == theirs.payload == payload


def test_a_broken_header_is_left_to_paho_and_never_raises():
    rng = random.Random(1)
    refused = 0
    for _ in range(3000):
        mqtt5, qos = rng.random() < 0.5, rng.randint(0, 1)
        packet = publish_packet(
            b"fedmq/x/updates/d", qos, 7, properties(rng) if mqtt5 else None, b"p" * 50
        )
        for _ in range(rng.randint(1, 4)):  # flip bytes in the header, or cut the packet
            if rng.random() < 0.3:
                del packet[rng.randint(0, len(packet)) :]
            elif packet:
                packet[rng.randrange(min(len(packet), 40))] = rng.randrange(256)
        start = payload_offset(packet, qos, mqtt5)
        if start is None:
            refused += 1
        else:
            assert 0 <= start <= len(packet)
    assert refused > 300  # the mutations did reach the length checks


def sender(credentials, topic: str, qos: int, version: int) -> str:
    """A separate process publishing one PAYLOAD-byte message with a user property: the
    receiver's memory is then only its own."""
    return f"""
import sys, threading, dataclasses
sys.path.insert(0, {str(sys.path[0])!r})
from broker.connection import connect_async, make_client
from broker.home import settings_from_credentials
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
s = dataclasses.replace(settings_from_credentials({str(credentials)!r}), mqtt_version={version})
tx = make_client(s, client_id="big-tx", persistent=False)
up = threading.Event()
tx.on_connect = lambda c, u, f, rc, p: up.set() if not rc.is_failure else print("refused:", rc)
connect_async(tx, s, persistent=False)
tx.loop_start()
assert up.wait(10)
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = ("k", "v")
payload = bytes(range(256)) * ({PAYLOAD} // 256)
info = tx.publish({topic!r}, payload, qos={qos}, properties=props)
info.wait_for_publish(60)  # returns at the timeout without raising: say so
sys.exit(0 if info.is_published() else "the broker did not take it within 60 s")
"""


@pytest.mark.mosquitto
@pytest.mark.parametrize(("version", "qos"), [(5, 1), (5, 0), (3, 1)])
def test_a_large_message_arrives_whole_with_two_copies_at_most(federation, version, qos):
    fed = federation()
    settings = dataclasses.replace(fed.settings(AGGREGATOR), mqtt_version=version)
    topic = Topics(fed.name).round
    got, arrived, subscribed = [], threading.Event(), threading.Event()
    rx = make_client(settings, client_id="big-rx", persistent=False)
    rx.on_message = lambda c, u, msg: (got.append(msg), arrived.set())
    rx.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    rx.on_subscribe = lambda *args: subscribed.set()
    connect_async(rx, settings, persistent=False)
    rx.loop_start()
    try:
        assert subscribed.wait(10)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        code = sender(fed.credentials(AGGREGATOR), topic, qos, version)
        sent = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
        assert sent.returncode == 0, sent.stderr.decode()[-2000:]
        assert arrived.wait(60)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        rx.disconnect()
        rx.loop_stop()
    msg = got[0]
    assert msg.topic == topic and msg.qos == qos
    assert msg.payload == bytes(range(256)) * (PAYLOAD // 256)
    if version == 5:
        assert msg.properties.UserProperty == [("k", "v")]
    # paho's receive buffer and the payload; paho's own parse held four copies at its peak
    assert peak < 2.5 * PAYLOAD, f"{peak / PAYLOAD:.2f} payloads"
