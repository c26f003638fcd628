"""The operator's side of the control plane: read ``state``, send ``control``."""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import signals
from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import BrokerError, CodecError, FedmqError
from broker.retained import read_retained
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


def read_presence(
    settings: ConnectionSettings, federation: str, timeout: float = 5
) -> tuple[dict | None, signals.Presence | None]:
    """(the retained state, the aggregator's retained presence); None where there is none."""
    topics = Topics(federation)
    found = read_retained(
        settings, [topics.state, topics.aggregator], client_prefix="fedmq-operator", timeout=timeout
    )
    try:
        state = json.loads(found[topics.state]) if topics.state in found else None
    except ValueError:
        state = None
    try:
        presence = signals.parse_presence(found.get(topics.aggregator, b""))
    except CodecError:
        presence = None
    return (state if isinstance(state, dict) else None), presence


def read_state(settings: ConnectionSettings, federation: str, timeout: float = 5) -> dict:
    """The retained state, with ``aggregator``: whether one is running (from its presence)."""
    state, presence = read_presence(settings, federation, timeout)
    if state is None:
        raise FedmqError(
            f"connected to {settings.address}, but no aggregator state on "
            f"{Topics(federation).state} (has an aggregator ever run federation {federation!r}?)"
        )
    running = presence is not None and presence.status == "online"
    state["aggregator"] = {
        "running": running,
        "instance": presence.instance if presence else None,
        "host": presence.host if presence else None,
        "pid": presence.pid if presence else None,
        "last_seen": state.get("time"),
    }
    return state


def no_aggregator(federation: str, state: dict | None) -> str:
    """'no aggregator running ...' with when it was last seen and where it was."""
    if not state:
        return f"no aggregator running for federation {federation!r}"
    seen = state.get("time")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen))
        if isinstance(seen, (int, float))
        else "?"
    )
    return (
        f"no aggregator running for federation {federation!r} (last seen {when}, "
        f"round {state.get('round')} of {state.get('rounds')}, {state.get('phase')})"
    )


def send_control(
    settings: ConnectionSettings,
    federation: str,
    command: str,
    *,
    expect_phases: set[str],
    timeout: float = 10,
) -> dict:
    """Send a command to the running aggregator (it names that aggregator's instance, so no
    later one acts on it) and wait until the retained state shows one of ``expect_phases``."""
    state, presence = read_presence(settings, federation, timeout)
    if presence is None or presence.status != "online":
        raise FedmqError(no_aggregator(federation, state) + f"; {command!r} not sent")
    if state and state.get("phase") in ("done",) and command != "stop":
        raise FedmqError(f"the aggregator's run is already {state['phase']}")
    with StateWatcher(settings, federation) as watcher:
        state = watcher.next_state(timeout)  # also proves we are connected and subscribed
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = CONTROL_EXPIRY
        watcher.client.publish(
            watcher.topics.control,
            signals.encode_control(command, presence.instance),
            qos=1,
            properties=props,
        ).wait_for_publish(timeout)
        watcher.watch.raise_if_fatal()  # e.g. the ACL does not let this account send control
        deadline = time.monotonic() + timeout
        while state.get("phase") not in expect_phases:
            left = deadline - time.monotonic()
            try:
                state = watcher.next_state(max(left, 0.01))
            except BrokerError:
                raise
            except FedmqError:
                raise FedmqError(
                    f"the aggregator (pid {presence.pid} on {presence.host}) did not confirm "
                    f"{command!r} within {timeout:g}s"
                ) from None
        return state


__all__ = ["read_presence", "read_state", "send_control"]
