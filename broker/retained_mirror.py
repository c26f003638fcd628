"""Retained messages on every node of a cluster that keeps them node-local (RabbitMQ).

RabbitMQ (3.10 and later 3.x) routes a message to subscribers on every node, but
stores a retained message only on the node that received it: a device that
connects to another node later finds no model, or an old one, and sits out the
round. So a publisher of retained messages (the aggregator: model, state,
presence, round) keeps one more connection to each other node (``cluster`` in
its credentials file) and publishes every retained message there too.

The price: each node's copy is also routed to every live subscriber, so a device
receives the model once per node (and re-sends its update for each copy it
sees after training; the aggregator counts it once), and the state and presence
as often. Devices and the operator need nothing: they read their own node.
RabbitMQ also never sends retained messages to a wildcard subscription, so the
aggregator's ``status/+`` brings no device's retained status, on any node; it
reads them by exact topic on every node instead (``read_on_every_node``) for
the devices it knows (its ``device_keys``), before its first round.

The copies carry the publisher's last will too, so every node says "offline"
when the aggregator dies. Topics in ``throttle`` (the state, republished every
quarter second while a round runs) are copied at most once per interval: a
reader on another node sees a state at most that old, and the last one is
copied at ``stop``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from broker.connection import (
    ConnectionSettings,
    ConnectionWatch,
    connect_async,
    make_client,
    parse_address,
)
from broker.retained import read_retained


def read_on_every_node(
    settings: ConnectionSettings,
    topics: list[str],
    *,
    client_prefix: str,
    timeout: float,
    log: logging.Logger,
) -> list[dict[str, bytes]]:
    """The retained messages on ``topics`` as each node of ``settings.cluster`` holds them
    (one {topic: payload} per node, in the cluster's order), the nodes read at once: a
    subscription to 1,000 exact topics takes RabbitMQ 3.10 about 4 s here."""
    from concurrent.futures import ThreadPoolExecutor

    def read(address: str) -> dict[str, bytes]:
        host, port = parse_address(address)
        node = replace(settings, host=host, port=port, cluster=())
        return read_retained(node, topics, client_prefix=client_prefix, timeout=timeout, log=log)

    addresses = list(settings.cluster or (settings.address,))
    with ThreadPoolExecutor(len(addresses)) as pool:
        return list(pool.map(read, addresses))


class _Node:
    """One other node: its client, and the copies waiting for it to be connected."""

    def __init__(self, address: str, settings: ConnectionSettings, client, watch) -> None:
        self.address = address
        self.settings = settings
        self.client = client
        self.watch = watch
        self.connected = False
        self.waiting: dict[str, tuple[bytes, int]] = {}  # topic -> latest copy (offline)


class RetainedMirror:
    """One clean-session client per other node of ``settings.cluster``."""

    def __init__(
        self,
        settings: ConnectionSettings,
        client_id: str,
        log: logging.Logger,
        *,
        will: tuple[str, bytes] | None = None,
        throttle: dict[str, float] | None = None,
    ) -> None:
        self.log = log
        self.throttle = dict(throttle or {})
        self._last_copy: dict[str, float] = {}
        self._held: dict[str, tuple[bytes, int]] = {}  # throttled: the latest not yet copied
        self._pending: list = []  # MQTTMessageInfo not yet acknowledged
        self._lock = threading.Lock()
        self.published = 0  # copies handed to paho (all nodes)
        self.nodes: list[_Node] = []
        for i, address in enumerate(a for a in settings.cluster if a != settings.address):
            host, port = parse_address(address)
            node_settings = replace(settings, host=host, port=port, cluster=())
            client = make_client(
                node_settings, f"{client_id}-node{i + 1}", persistent=False, will=will
            )

            def fatal(exc, address=address) -> None:
                log.error("retained copies on the cluster node %s stopped: %s", address, exc)

            node = _Node(address, node_settings, client, None)
            client.on_connect = lambda c, u, f, rc, p, node=node: self._on_connect(node, rc)
            client.on_disconnect = lambda c, u, f, rc, p, node=node: self._on_disconnect(node)
            node.watch = ConnectionWatch(
                client, node_settings, log, on_fatal=fatal, log_connect=False
            )
            self.nodes.append(node)

    def __bool__(self) -> bool:
        return bool(self.nodes)

    # -- network threads ---------------------------------------------------------------
    def _on_connect(self, node: _Node, reason_code) -> None:
        if reason_code.is_failure:
            return
        with self._lock:
            node.connected = True
            waiting, node.waiting = node.waiting, {}
            for topic, (payload, qos) in waiting.items():
                self._send(node, topic, payload, qos)

    def _on_disconnect(self, node: _Node) -> None:
        with self._lock:
            node.connected = False

    # -- the publisher's side ----------------------------------------------------------
    def start(self) -> None:
        for node in self.nodes:
            connect_async(node.client, node.settings, persistent=False)
            node.client.loop_start()
        if self.nodes:
            self.log.info(
                "clustered broker: retained messages are also published to %s",
                ", ".join(n.address for n in self.nodes),
            )

    def attach(self, client) -> None:
        """Copy every retained message ``client`` publishes to the other nodes."""
        if not self.nodes:
            return
        publish = client.publish

        def publish_and_copy(topic, payload=None, qos=0, retain=False, properties=None):
            info = publish(topic, payload, qos, retain, properties)
            if retain:
                self.publish(topic, payload, qos)
            return info

        client.publish = publish_and_copy

    def publish(self, topic: str, payload: bytes, qos: int = 1, *, held: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            interval = self.throttle.get(topic)
            if interval is not None and not held:
                if now - self._last_copy.get(topic, -interval) < interval:
                    self._held[topic] = (payload, qos)
                    return
                self._held.pop(topic, None)
            self._last_copy[topic] = now
            self._pending = [i for i in self._pending if not i.is_published()]
            for node in self.nodes:
                if node.connected:
                    self._send(node, topic, payload, qos)
                else:  # sent when it connects: only the latest of each topic matters
                    node.waiting[topic] = (payload, qos)

    def _send(self, node: _Node, topic: str, payload: bytes, qos: int) -> None:
        info = node.client.publish(topic, payload, qos=qos, retain=True)
        if info.rc == 0:
            self._pending.append(info)
            self.published += 1
        else:  # the link dropped under us: on the next connect
            node.waiting[topic] = (payload, qos)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) until every node has the last copies, then disconnect."""
        deadline = time.monotonic() + timeout
        for topic, (payload, qos) in list(self._held.items()):
            self.publish(topic, payload, qos, held=True)
        self._held.clear()
        with self._lock:
            pending = list(self._pending)
        for info in pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            info.wait_for_publish(left)
        late = sum(1 for i in pending if not i.is_published())
        late += sum(len(n.waiting) for n in self.nodes)
        if late and timeout > 0:
            self.log.warning("%d retained copies not acknowledged by the other nodes", late)
        for node in self.nodes:
            node.client.disconnect()
            node.client.loop_stop()
