"""Read the retained messages of a few topics once, with a short-lived clean session.

Used before the long-lived session starts (is another aggregator running?) and by
the operator's commands. The broker answers a SUBSCRIBE with its SUBACK and then
the retained messages; a second SUBSCRIBE that asks for no retained messages
(retain handling 2) is answered after those, so its SUBACK marks the end: no
sleeping, no guessing how long to wait.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from broker.connection import ConnectionSettings, ConnectionWatch, connect_async, make_client
from broker.errors import BrokerError


def read_retained(
    settings: ConnectionSettings,
    topics: list[str],
    *,
    client_prefix: str = "fedmq-probe",
    timeout: float = 10.0,
    log: logging.Logger | None = None,
    stopped: Callable[[], bool] | None = None,
) -> dict[str, bytes]:
    """{topic: payload} of the retained messages on ``topics`` (absent: no retained message).

    Connection problems raise BrokerError saying exactly what is wrong (see diagnose.py):
    at once when permanent or without ``log``; with ``log``, a transient one is logged and
    retried until ``timeout``, or until ``stopped()`` (then: {})."""
    found: dict[str, bytes] = {}
    done = threading.Event()
    failure: list[str] = []
    client = make_client(settings, f"{client_prefix}-{secrets.token_hex(4)}", persistent=False)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            failure.append(f"broker refused the connection: {reason_code}")
            done.set()
            return
        c.subscribe([(t, mqtt.SubscribeOptions(qos=0)) for t in topics])

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:
        if userdata.setdefault("subacks", 0) == 0:
            userdata["subacks"] = 1
            c.subscribe(topics[0], options=mqtt.SubscribeOptions(qos=0, retainHandling=2))
        else:
            done.set()

    def on_message(c, userdata, msg) -> None:
        if msg.retain:
            found[msg.topic] = msg.payload

    client.user_data_set({})
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    watch = ConnectionWatch(
        client,
        settings,
        log or logging.getLogger("fedmq.probe"),
        patient=log is not None,
        log_connect=False,
    )
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        if not watch.wait_connected(timeout, stopped=stopped):
            return {}
        if not done.wait(timeout):
            raise BrokerError(
                f"no answer from the broker at {settings.address} within {timeout:g}s"
            )
        if failure:
            raise BrokerError(failure[0])
        return {t: p for t, p in found.items() if p}
    finally:
        client.disconnect()
        client.loop_stop()
