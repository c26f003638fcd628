"""The operator's side of the control plane: read ``state``, send ``control``."""

from __future__ import annotations

import json
import logging
import queue
import secrets

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import BrokerError, FedmqError
from broker.topics import Topics

log = logging.getLogger("fedmq.operator")

CONTROL_EXPIRY = 60  # seconds: a command is not delivered to an aggregator that starts later


class StateWatcher:
    """A short-lived client that subscribes to the retained state and queues each version.

    Impatient: any connection problem (nothing listening, TLS, credentials, ACL)
    ends the wait at once with a BrokerError saying which."""

    def __init__(self, settings: ConnectionSettings, federation: str) -> None:
        self.topics = Topics(federation)
        self.states: queue.Queue[dict | BrokerError] = queue.Queue()
        self.subscribed: queue.Queue[bool] = queue.Queue()
        self.client = make_client(settings, f"fedmq-operator-{secrets.token_hex(4)}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.put(True)
        self.client.on_message = self._on_message
        self.settings = settings
        self.watch = ConnectionWatch(
            self.client, settings, log, on_fatal=self.states.put, patient=False, log_connect=False
        )

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # the watch says why
            return
        client.subscribe(self.topics.state, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.states.put(json.loads(msg.payload))
        except ValueError:
            pass

    def __enter__(self) -> StateWatcher:
        connect_async(self.client, self.settings, persistent=False)
        self.client.loop_start()
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def next_state(self, timeout: float) -> dict:
        try:
            item = self.states.get(timeout=timeout)
        except queue.Empty:
            self.watch.raise_if_fatal()
            if not self.watch.connected.is_set():
                raise BrokerError(
                    f"no answer from the broker at {self.settings.address} within {timeout:g}s"
                ) from None
            raise FedmqError(
                f"connected to {self.settings.address}, but no aggregator state on "
                f"{self.topics.state} within {timeout:g}s (is an aggregator running for "
                f"federation {self.topics.federation!r}?)"
            ) from None
        if isinstance(item, BrokerError):
            raise item
        return item


def read_state(settings: ConnectionSettings, federation: str, timeout: float = 5) -> dict:
    with StateWatcher(settings, federation) as watcher:
        return watcher.next_state(timeout)


def send_control(
    settings: ConnectionSettings,
    federation: str,
    command: str,
    *,
    expect_phases: set[str],
    timeout: float = 10,
) -> dict:
    """Publish a command and wait until the retained state shows one of ``expect_phases``."""
    with StateWatcher(settings, federation) as watcher:
        state = watcher.next_state(timeout)  # also proves we are connected and subscribed
        if state.get("phase") in ("done",) and command != "stop":
            raise FedmqError(f"the aggregator's run is already {state['phase']}")
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = CONTROL_EXPIRY
        watcher.client.publish(
            watcher.topics.control, json.dumps({"command": command}), qos=1, properties=props
        ).wait_for_publish(timeout)
        watcher.watch.raise_if_fatal()  # e.g. the ACL does not let this account send control
        while state.get("phase") not in expect_phases:
            state = watcher.next_state(timeout)
        return state


__all__ = ["read_state", "send_control"]
